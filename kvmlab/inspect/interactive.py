"""``kvmlab inspect -i``: drgn's own interactive shell on a lab VM, with memslot helpers.

drgn's CLI (``drgn.cli.run_interactive``) runs the session: its completion, history and
pretty-printing, ``prog`` and drgn's Linux helpers are all there. kvmlab attaches first
(the debug QMP socket, the kernel's DWARF) and adds the helpers of ``Helpers``, each
listed in the banner by the first line of its docstring.

The guest keeps running between calls. Each helper that reads memslots pauses it for
the read, as ``kvmlab inspect`` does, unless ``pause()`` already holds it paused. A
helper never raises into the shell: an error is one line, and a VM that went away is
said once, plainly, while the session stays open on what was read before.

The session runs in drgn's reader process (``kvmlab.inspect.reader``): kvmlab's process
keeps the deadline on the attach and ends everything on SIGTERM, resuming the guest if a
helper had paused it; in the shell, Ctrl-C is the shell's. A guest that ``pause()`` still
holds when the session ends is resumed.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from kvmlab.errors import KvmlabError
from kvmlab.inspect import reader
from kvmlab.inspect.attach import Inspector, Target
from kvmlab.vm import runs


def _helper(method):
    """Run a helper for the shell: its errors become one line on stderr, never a traceback."""
    @functools.wraps(method)
    def wrapper(self: Helpers, *args, **kwargs):
        if self.gone:
            print(f"kvmlab: {self.where.name} has gone away; nothing more to read (Ctrl-D ends the session)",
                  file=sys.stderr)
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # drgn's FaultError, QMP, bad arguments: one line for the user
            if not self.alive():
                self.gone = True
                print(f"kvmlab: {self.where.name} has gone away (its QEMU ended); "
                      "nothing more to read (Ctrl-D ends the session)", file=sys.stderr)
            else:
                reason = str(err).splitlines()[0] if str(err) else ""
                print(f"kvmlab: {method.__name__}: {type(err).__name__}: {reason}", file=sys.stderr)
            return None
    return wrapper


class Helpers:
    """The memslot helpers of one session, bound to one attached VM."""

    def __init__(self, inspector: Inspector):
        self.inspector = inspector
        self.where: Target = inspector.where
        self.held = False  # paused by pause(), not by a read
        self.gone = False

    # -- the helpers, in banner order --------------------------------------------------
    @_helper
    def vms(self) -> None:
        """List the VMs on the kernel's vm_list: index, struct kvm address, pid, slots."""
        found = self._read_all()
        if not found:
            print("no VMs on vm_list")
        for number, vm in enumerate(found):
            counts = ", ".join(f"as {space.as_id}: {len(space.slots)}" for space in vm.address_spaces)
            layout = vm.address_spaces[0].layout if vm.address_spaces else "?"
            print(f"[{number}] VM {vm.address:#x} pid {vm.pid}: {layout} layout, slots {counts}")

    @_helper
    def memslots(self, vm: int = 0, as_id: int = 0) -> list:
        """Return VM number vm's memslots (address space as_id) as Slot records, in gfn order."""
        return self._read(vm).address_spaces[as_id].slots

    @_helper
    def dump(self, vm: int | None = None) -> None:
        """Print the memslot tables of one VM (or all), as kvmlab inspect does."""
        from drgn_scripts import memslots

        found = self._read_all() if vm is None else [self._read(vm)]
        print(memslots.render(found))

    @_helper
    def check(self, vm: int | None = None) -> list:
        """Check the memslot invariants of one VM (or all); return the violations."""
        from drgn_scripts import memslot_invariants

        found = self._read_all() if vm is None else [self._read(vm)]
        violations = [v for record in found for v in memslot_invariants.check_vm(record)]
        print(memslot_invariants.render(violations) if violations else
              f"{len(found)} VMs checked, no violations")
        return violations

    @_helper
    def gfn_tree(self, vm: int = 0, as_id: int = 0) -> None:
        """Print the active gfn tree root first, indented by depth (5.10: memslots[] in order)."""
        from drgn_scripts import memslot_lookup

        with self._paused():
            nodes = memslot_lookup.gfn_tree(self._kvm(vm), as_id)
        for depth, slot in nodes:
            print(f"{'  ' * depth}{slot.id} [{slot.base_gfn:#x}, {slot.gfn_end:#x})")
        print(f"{len(nodes)} slots, depth {max((d for d, _ in nodes), default=-1) + 1}")

    @_helper
    def lookup(self, gfn: int, vm: int = 0, as_id: int = 0):
        """Find gfn's memslot as KVM does (tree descent, or lru then binary search); return it."""
        from drgn_scripts import memslot_lookup

        with self._paused():
            found = memslot_lookup.lookup(self._kvm(vm), gfn, as_id)
        print(found.render())
        return found.slot

    @_helper
    def kvm(self, vm: int = 0):
        """Return VM number vm's struct kvm * as a drgn Object, to read anything else."""
        return self._kvm(vm)

    @_helper
    def pause(self) -> None:
        """Pause the guest (QMP stop) until resume(); reads then see one frozen state."""
        self._require_control("pause")
        self.inspector.pause()
        self.held = True
        print(f"{self.where.name}: paused")

    @_helper
    def resume(self) -> None:
        """Let the guest run again (QMP cont)."""
        self._require_control("resume")
        self.inspector.resume()
        self.held = False
        print(f"{self.where.name}: running")

    NAMES = ("vms", "memslots", "dump", "check", "gfn_tree", "lookup", "kvm", "pause", "resume")

    # -- plumbing ---------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether the VM is still there: its QEMU (a kvmlab run) or its QMP socket."""
        if self.where.vmcore is not None:
            return True
        if self.where.run_dir is not None:
            pid = runs.read(self.where.run_dir).get("qemu_pid")
            return runs.is_pid(pid) and runs.qemu_alive(self.where.run_dir, pid)
        return Path(self.where.debug_socket).is_socket()

    def _read(self, vm: int):
        from drgn_scripts import memslots

        with self._paused():
            return memslots.read_vm(self._kvm(vm), memslots.layout(self.inspector.prog))

    def _read_all(self) -> list:
        from drgn_scripts import memslots

        with self._paused():
            return memslots.read_vms(self.inspector.prog)

    def _kvm(self, vm: int):
        from drgn_scripts import memslots

        found = memslots.kvms(self.inspector.prog)
        if not 0 <= vm < len(found):
            raise KvmlabError(f"no VM number {vm}: vms() lists {len(found)}")
        return found[vm]

    @contextlib.contextmanager
    def _paused(self):
        """Pause the guest around a read, unless the user holds it paused already."""
        pausing = self.where.control_socket is not None and not self.held
        if pausing:
            self.inspector.pause()
        try:
            yield
        finally:
            if pausing:
                self.inspector.resume()

    def _require_control(self, what: str) -> None:
        if self.where.control_socket is None:
            why = "it is a vmcore" if self.where.vmcore else "not a kvmlab run (no control socket)"
            raise KvmlabError(f"cannot {what} {self.where.name}: {why}")


def banner(helpers: Helpers) -> str:
    kernel = helpers.inspector.kernel
    where = helpers.where
    state = ("running; helpers pause it while they read" if where.control_socket else
             f"as it panicked, from {where.vmcore}" if where.vmcore else
             "not a kvmlab run: reads do not pause it and may be inconsistent")
    lines = [f"kvmlab inspect: {where.name}, kernel {kernel.release} ({where.kernel_spec}), guest {state}.",
             "Helpers (help(NAME) for more):"]
    for name in Helpers.NAMES:
        method = getattr(Helpers, name)
        doc = method.__doc__.strip().splitlines()[0]
        lines.append(f"  {name}{_signature(method)}: {doc}")
    return "\n".join(lines)


def _signature(method) -> str:
    import inspect

    parameters = list(inspect.signature(method).parameters.values())[1:]
    return "(" + ", ".join(str(p).split(":")[0] + (f"={p.default}" if p.default is not p.empty else "")
                           for p in parameters) + ")"


def run(where: Target, timeout_s: float) -> int:
    """Attach to ``where`` and hand the terminal to drgn's shell until it ends; returns the
    session's exit code. Both happen in a reader process (``kvmlab.inspect.reader``)."""
    return reader.Reader(where, timeout_s).run(shell)


def shell(inspector: Inspector, send: Callable[[tuple], None]) -> int:
    """(In the reader process) attach, then drgn's shell with the helpers until it ends."""
    import drgn.cli

    inspector.attach()
    helpers = Helpers(inspector)

    def add_helpers(namespace: dict) -> dict:
        return {**namespace, **{name: getattr(helpers, name) for name in Helpers.NAMES}}

    send((reader.SHELL,))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is the shell's now
    try:
        drgn.cli.run_interactive(inspector.prog, banner_func=lambda default: f"{default}\n{banner(helpers)}",
                                 globals_func=add_helpers)
    finally:
        if helpers.held and not helpers.gone:
            helpers.resume()
    return 0
