"""Attach drgn to a lab VM's kernel, and read or check its KVM memslots.

drgn reads the guest's memory through QEMU over the run's second QMP socket (QEMU serves
one client per socket and drgn keeps its connection; the first socket stays free for
kvmlab's ``stop``/``cont``), or from the vmcore of a run whose kernel panicked, with the
DWARF of the kernel's -dbg package from the kernel cache, fetched on first use.

A snapshot pauses the guest (QMP ``stop``) while it reads: a running guest changes its
memslots under the reader, and the invariants only hold for a structure read whole.
The time spent paused is returned, so that callers that watch the guest's heartbeat do
not count it as a stall.

Every wait on QEMU is bounded by the inspector's timeout: the greeting and drgn's
handshake on the debug socket, each answer to drgn's commands and memory reads (the
socket's own timeout, ``qmp.limit_waits``, which holds inside drgn's C code) and
kvmlab's ``stop``/``cont``. Signals are another matter: drgn's C code holds the GIL and
retries a read that a signal interrupts, so ``kvmlab inspect`` runs the inspector in a
process of its own (``kvmlab.inspect.reader``), which it tells what it is doing.
"""

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab import kernels
from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel
from kvmlab.vm import qmp, runs, vmcore

#: How long QEMU may take to answer: to greet drgn on the debug QMP socket (it greets at
#: once when free), and each command and read after that.
TIMEOUT_S = 10.0

# What an inspector tells its ``tell`` callback, as it happens (``kvmlab.inspect.reader``):
HANDSHAKE = "handshake"
"""drgn's QMP handshake begins (on a socket that greeted): QEMU must answer within the timeout."""
LOADING = "loading"
"""The handshake is over; loading the DWARF is local work, of no fixed length."""
PAUSED = "paused"
"""kvmlab is about to pause the guest (said before ``stop`` is sent, so never too late)."""
RUNNING = "running"
"""The guest runs again (said once ``cont`` was answered)."""


@dataclass
class Target:
    """A VM to inspect: the socket drgn reads through, the one to pause it through (None
    for a QEMU that kvmlab did not start), and its kernel."""

    debug_socket: Path | None
    control_socket: Path | None
    kernel_spec: str
    name: str
    run_dir: Path | None = None
    """The kvmlab run directory, None for a QMP socket kvmlab did not start."""
    vmcore: Path | None = None
    """A dead run's vmcore (``kvmlab.vm.vmcore``): drgn reads it instead of a live guest."""


@dataclass
class Snapshot:
    vms: list = field(default_factory=list)
    """``drgn_scripts.memslot_model.VmMemslots``, one per VM on the kernel's vm_list."""
    violations: list = field(default_factory=list)
    """``drgn_scripts.memslot_invariants.Violation`` (empty unless checked)."""
    paused_s: float = 0.0
    read_s: float = 0.0


def target(name: str | None, kernel_spec: str | None = None) -> Target:
    """A run (name or directory), a QMP socket, or (None) the newest kept VM."""
    if name is None:
        kept = runs.kept()
        if not kept:
            raise KvmlabError("no kept VM is running: name a run or a QMP socket "
                              "(start one with kvmlab run --keep)")
        return _run_target(kept[-1].run_dir, kernel_spec)
    path = Path(name)
    if path.is_socket():
        if (path.parent / "run.json").exists():
            return _run_target(path.parent, kernel_spec)
        if not kernel_spec:
            raise KvmlabError(f"{name} is not in a kvmlab run directory: say which kernel it runs "
                              f"with --kernel SPEC")
        return Target(path, None, kernel_spec, name)
    return _run_target(runs.resolve(name), kernel_spec)


def _run_target(run_dir: Path, kernel_spec: str | None) -> Target:
    info = runs.read(run_dir)
    spec = kernel_spec or info.get("kernel_exact") or info.get("kernel")
    if not isinstance(spec, str):
        raise KvmlabError(f"{run_dir / 'run.json'} names no kernel: say which it runs with --kernel SPEC")
    pid = info.get("qemu_pid")
    if not runs.is_pid(pid) or not runs.qemu_alive(run_dir, pid):
        if (run_dir / vmcore.FILE).is_file() and info.get("vmcore"):
            return Target(None, None, spec, run_dir.name, run_dir, run_dir / vmcore.FILE)
        skipped = f"; {info['vmcore_skipped']}" if isinstance(info.get("vmcore_skipped"), str) else ""
        raise KvmlabError(f"run {run_dir.name} has no running VM and no vmcore "
                          f"(state: {info.get('state', 'unknown')}{skipped})")
    if "debug_qmp" not in info:
        raise KvmlabError(f"run {run_dir.name} was started by an older kvmlab without a QMP socket for drgn")
    return Target(_socket(run_dir, info, "debug_qmp"), _socket(run_dir, info, "qmp"), spec,
                  run_dir.name, run_dir)


def _socket(run_dir: Path, info: dict, key: str) -> Path:
    """A QMP socket run.json names; a record that names none is damaged, said in one line."""
    path = info.get(key)
    if not isinstance(path, str) or not path:
        raise KvmlabError(f"{run_dir / 'run.json'} is damaged: {key!r} wants a socket path, found {path!r}")
    return Path(path)


def debug_files(kernel: Kernel) -> list[Path]:
    """vmlinux and kvm.ko with DWARF (no kvm.ko: KVM is built in)."""
    if kernel.vmlinux is None:
        raise KvmlabError(f"no debuginfo for {kernel.spec}")
    return [kernel.vmlinux] + ([kernel.kvm_debug] if kernel.kvm_debug is not None else [])


def no_answer(socket: Path | None, timeout_s: float) -> str:
    """What to say when QEMU left a wait on ``socket`` unanswered for ``timeout_s``."""
    return (f"QEMU did not answer on {socket} within {timeout_s:g} s: it is wedged, or it is not "
            "QEMU (--timeout S allows longer)")


def _hung_up(err: BaseException) -> bool:
    """Whether ``err`` says the peer closed the QMP connection under drgn."""
    if isinstance(err, OSError) and err.errno in (errno.EPIPE, errno.ECONNRESET):
        return True
    return "connection closed unexpectedly" in str(err)


def _unanswered(err: BaseException) -> bool:
    """Whether ``err`` is a socket timeout (``qmp.limit_waits``) raised through drgn."""
    if isinstance(err, OSError) and err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return True
    return "Resource temporarily unavailable" in str(err)  # drgn's FaultError keeps only the text


class Inspector:
    """One drgn Program on one VM, attached once and read as often as asked."""

    def __init__(self, where: Target, timeout_s: float = TIMEOUT_S,
                 tell: Callable[[str], None] | None = None):
        self.where = where
        self.timeout_s = timeout_s
        self.tell = tell or (lambda event: None)
        """Told ``HANDSHAKE``, ``LOADING``, ``PAUSED`` and ``RUNNING`` as they happen."""
        self.prog = None
        self.kernel: Kernel | None = None
        self.conn = None
        """The greeted connection drgn is to be given (``prepare``), until ``attach`` gives it."""

    @property
    def who(self) -> str:
        return f"drgn cannot attach to {self.where.name}"

    def prepare(self) -> None:
        """The steps before drgn, in Python that Ctrl-C interrupts: QEMU's greeting on the
        connection drgn will use, then the kernel's debuginfo (fetching the -dbg package
        if needed). The socket comes first, so that a VM drgn cannot reach is said before a
        debuginfo download, and drgn, whose wait for a greeting has no deadline, is given
        a connection that was greeted."""
        if self.where.vmcore is None and self.conn is None:
            self.conn = qmp.connect_greeted(self.where.debug_socket, self.timeout_s, self.who)
        if self.kernel is None:
            try:
                self.kernel = kernels.fetch(self.where.kernel_spec, debuginfo=True)
            except BaseException:
                if self.conn is not None:
                    qmp.hang_up(self.conn)
                    self.conn = None
                raise

    def attach(self) -> None:
        """Prepare (if not done), then give drgn the greeted connection and the DWARF."""
        import drgn  # host side only; imported here so the rest of kvmlab runs without it

        self.prepare()
        files = debug_files(self.kernel)
        prog = drgn.Program()
        try:
            if self.where.vmcore is not None:
                prog.set_core_dump(str(self.where.vmcore))
            else:
                self.tell(HANDSHAKE)
                conn, self.conn = self.conn, None
                prog.set_qemu_qmp(conn.detach())  # drgn owns the descriptor now, and closes it
                self.tell(LOADING)
        except Exception as err:  # drgn raises OSError, ValueError or its own errors
            socket = self.where.debug_socket
            reason = (no_answer(socket, self.timeout_s) if _unanswered(err) else
                      f"{socket} hung up in drgn's QMP handshake: QEMU ended, or it is not QEMU"
                      if _hung_up(err) else err)
            raise KvmlabError(f"{self.who}: {reason}") from None
        try:
            prog.load_debug_info([str(f) for f in files])
        except drgn.MissingDebugInfoError:
            pass  # it names other modules too; the lookups below say if ours are missing
        try:
            prog["vm_list"]
        except (KeyError, LookupError) as err:
            raise KvmlabError(
                f"drgn found no KVM in {self.where.name}'s kernel ({err}); is kvm loaded, and "
                f"qemu_fw_cfg (for vmcoreinfo)?") from None
        self.prog = prog

    def snapshot(self, check: bool = False, pid: int | None = None) -> Snapshot:
        """Pause the guest, read every VM's memslots (and check them), resume it."""
        from drgn_scripts import memslot_invariants, memslots

        if self.prog is None:
            self.attach()
        result = Snapshot()
        paused_at = time.monotonic()
        self.pause()
        try:
            started = time.monotonic()
            try:
                result.vms = memslots.read_vms(self.prog, pid)
            except Exception as err:  # drgn's FaultError, LookupError...: one line for the user
                reason = (no_answer(self.where.debug_socket, self.timeout_s) if _unanswered(err)
                          else f"{type(err).__name__}: {err}")
                raise KvmlabError(f"drgn could not read {self.where.name}'s memslots: {reason}") from None
            result.read_s = time.monotonic() - started
        finally:
            self.resume()
            result.paused_s = time.monotonic() - paused_at
        if check:
            result.violations = [v for vm in result.vms for v in memslot_invariants.check_vm(vm)]
        return result

    def pause(self) -> None:
        """Pause the guest (QMP ``stop``), where kvmlab started it (it has a control socket)."""
        if self.where.control_socket is not None:
            self.tell(PAUSED)
            qmp.execute(self.where.control_socket, "stop", timeout_s=self.timeout_s)

    def resume(self) -> None:
        """Let the guest run again (QMP ``cont``)."""
        if self.where.control_socket is not None:
            qmp.execute(self.where.control_socket, "cont", timeout_s=self.timeout_s)
            self.tell(RUNNING)
