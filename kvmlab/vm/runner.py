"""Boot a kernel in QEMU, run one command in the guest, and say how it went.

The flow reads top to bottom in ``run``: check the kernel, assemble the initramfs
(cached image + cached modules + per-run layer), start QEMU, follow the guest's
streams until the job reports its exit code, the VM dies or the timeout passes, then
collect results and read the console for kernel splats (``lifecycle`` watches and
judges). QEMU never outlives a failed or interrupted run: it is killed in ``finally``
and, unless kept, also dies with us through PR_SET_PDEATHSIG.
"""

import sys
import threading
import time
from pathlib import Path

from kvmlab.kernels.model import Kernel
from kvmlab.vm import boot, lifecycle, results, runs, vmcore
from kvmlab.vm.boot import RunOptions
from kvmlab.vm.lifecycle import RunResult


def run(kernel: Kernel, options: RunOptions, log=sys.stderr) -> RunResult:
    """Boot ``kernel``, run ``options.argv`` in the guest, return how it ended."""
    vm = boot.start(kernel, options, log)
    print(f"kvmlab: booting {kernel.release} ({kernel.spec}); run directory {vm.run_dir}", file=log)
    followers = _follow_streams(vm.run_dir, options.stream)
    checker = options.checker(vm.machine) if options.checker else None
    liveness = lifecycle.Liveness(vm.process, vm.run_dir, options.timeout_s, options.stall_s, vm.started)
    kept = False
    try:
        try:
            while not liveness.over():
                liveness.run_check(checker)
                time.sleep(0.05)
        except KeyboardInterrupt:
            runs.record(vm.run_dir, state="interrupted")
            raise
        status = liveness.status
        kept = options.keep and status.exit_code is not None
        if status.exit_code is not None and not kept:
            lifecycle.wait_for_exit(vm.process, lifecycle.POWEROFF_GRACE_S)
        dump = _dump_if_panicked(vm, status, options, log)
    finally:
        if not kept:
            lifecycle.kill(vm.process)
        for follower in followers:
            follower.finish()
        # QEMU loaded these at start; the image and modules stay cached elsewhere.
        for archive in (vm.machine.initrd, vm.run_dir / "layer.cpio"):
            archive.unlink(missing_ok=True)
    result = lifecycle.judge(status, vm.run_dir, vm.started, kept, vm.machine.qmp_socket,
                             options.timeout_s, options.stall_s)
    if checker is not None:
        lifecycle.judge_checks(result, checker.report)
    if dump is not None:
        result.note_vmcore(dump)
    _collect_results(vm.run_dir, options.out, log, job_ended=status.exit_code is not None)
    runs.record(vm.run_dir, state=result.outcome, exit_code=result.exit_code,
                job_code=result.job_code, boot_s=result.boot_s, ready_s=result.ready_s,
                total_s=result.total_s)
    return result


def _dump_if_panicked(vm: boot.Booted, status: lifecycle.Status, options: RunOptions, log):
    """The panicked guest's vmcore, saved before QEMU is ended (None: it did not panic)."""
    if not status.panicked:
        return None
    print("kvmlab: the guest kernel panicked; saving its memory for drgn", file=log)
    return vmcore.save(vm.run_dir, vm.machine.qmp_socket, vm.process, options.memory_mb)


def _collect_results(run_dir: Path, out: Path | None, log, job_ended: bool) -> None:
    """Unpack results.tar into ``out`` (default: the run directory's results/); when the
    guest stopped mid-job, say which of its files it had sent."""
    target = out or run_dir / "results"
    archive = run_dir / "results.tar"
    unpacked = results.unpack(archive, target)
    if job_ended and unpacked.cut is None:
        return
    why = f"the results archive is cut short ({unpacked.cut})" if unpacked.cut else "the job did not end"
    names = ", ".join(unpacked.files[:5]) + (" …" if len(unpacked.files) > 5 else "")
    print(f"kvmlab: {why}: kept the {len(unpacked.files)} result files the guest had sent, in {target}"
          f"{': ' + names if names else ''}", file=log)


class _Follower:
    """Copy a file QEMU is writing to one of our streams as it grows."""

    def __init__(self, path: Path, sink):
        self.path, self.sink = path, sink
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        offset = 0
        while True:
            finishing = self._done.is_set()
            if self.path.exists():
                with open(self.path, "rb") as source:
                    source.seek(offset)
                    chunk = source.read()
                if chunk:
                    offset += len(chunk)
                    self.sink.write(chunk)
                    self.sink.flush()
            if finishing:
                return
            self._done.wait(0.05)

    def finish(self) -> None:
        self._done.set()
        self._thread.join()


def _follow_streams(run_dir: Path, stream: bool) -> list[_Follower]:
    if not stream:
        return []
    return [
        _Follower(run_dir / "stdout", sys.stdout.buffer),
        _Follower(run_dir / "stderr", sys.stderr.buffer),
    ]
