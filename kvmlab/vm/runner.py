"""``kvmlab run``: start a guest, run one command in it, and say how it went.

By default the guest is restored from a template (``guest.Guest`` with the role
``ROLE``: a guest booted once to its agent and saved), and the command is one
streamed request to its agent: it starts within a second instead of after a boot.
``--fresh-boot`` and ``--keep`` boot the kernel instead, with the command as the
init's job (a kept guest stays up with its init, after its job, for drgn or a person).
Either way the guest's streams are followed as they come, its results collected, and
its end judged by ``guest.Guest.close``. QEMU never outlives a failed or interrupted
run: it is killed on the way out and, unless kept, also dies with us
(PR_SET_PDEATHSIG).
"""

import sys
import threading
from dataclasses import replace
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab.kernels.model import Kernel
from kvmlab.vm import boot, results, runs
from kvmlab.vm.boot import RunOptions
from kvmlab.vm.guest import Guest, GuestDown
from kvmlab.vm.lifecycle import RunResult

ROLE = "run"


def run(kernel: Kernel, options: RunOptions, log=sys.stderr) -> RunResult:
    """Start a guest of ``kernel``, run ``options.argv`` in it, return how it ended."""
    if options.keep or options.fresh_boot:
        return _run_job(kernel, options, log)
    # The template holds none of this run's own things: they go with the request.
    bare = replace(options, env={}, files={}, trace=None, added=[])
    guest = Guest(kernel, bare, log, role=ROLE)
    try:
        guest.start()
    except GuestDown as down:  # the template's boot went down
        return down.result
    _say_started(guest, kernel, log)
    runs.record(guest.run_dir, command=options.argv)
    followers = _follow_streams(guest.run_dir, options.stream)
    code = None
    try:
        named = {**options.files, **(boot.trace_files(options.trace) if options.trace else {})}
        files = {f"{protocol.GUEST_ROOT}/{name}": text.encode() for name, text in named.items()}
        argv = boot.traced(options.argv) if options.trace else options.argv
        reply = guest.request(argv, timeout_s=options.timeout_s, env=options.env, put=files,
                              added=options.added, stream=True)
        code = reply.code
        result = guest.close(job_code=code)
    except GuestDown as down:
        result = down.result
    except BaseException:  # Ctrl-C, or a bug of ours: QEMU goes now, not after a grace
        guest.kill("interrupted")
        raise
    finally:
        for follower in followers:
            follower.finish()
    _collect_results(guest.run_dir, options.out, log, job_ended=code is not None)
    return result


def _run_job(kernel: Kernel, options: RunOptions, log) -> RunResult:
    """Boot ``kernel`` with ``options.argv`` as its init's job and follow it to its end."""
    guest = Guest(kernel, options, log, agent=False)
    guest.start()
    _say_started(guest, kernel, log)
    followers = _follow_streams(guest.run_dir, options.stream)
    try:
        guest.wait()
    finally:
        result = guest.close()
        for follower in followers:
            follower.finish()
    _collect_results(guest.run_dir, options.out, log, job_ended=guest.status.exit_code is not None)
    return result


def _say_started(guest: Guest, kernel: Kernel, log) -> None:
    how = f"restored from template {guest.template.name}" if guest.template else "booting"
    print(f"kvmlab: {how}: {kernel.release} ({kernel.spec}); run directory {guest.run_dir}", file=log)


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
