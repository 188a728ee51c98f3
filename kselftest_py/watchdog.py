"""A watchdog for test runs that may wedge in the kernel.

If a run is still going after its limit, the watchdog prints every Python thread's
stack and every thread's kernel stack (/proc/self/task/*/stack: where a stuck ioctl
sleeps), then ends the process with KSFT_FAIL. A hung memslot update is a finding,
not a reason for the whole lab run to wait for the host's timeout.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

from kselftest_py.ktap import KSFT_FAIL


def kernel_stacks() -> str:
    lines = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        base = f"/proc/self/task/{tid}"
        try:
            name = open(f"{base}/comm").read().strip()
            stack = open(f"{base}/stack").read()
        except OSError as err:
            stack = f"({err.strerror})\n"
            name = "?"
        lines.append(f"# thread {tid} ({name}):")
        lines += [f"#   {line}" for line in stack.splitlines()]
    return "\n".join(lines)


class Watchdog:
    """``with Watchdog(seconds, what):`` — ends the process if the block overruns."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        print(f"# watchdog: {self.what} still running after {self.seconds:g} s; stacks follow", flush=True)
        sys.stdout.flush()
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        print(kernel_stacks(), flush=True)
        print(f"not ok - {self.what} hung", flush=True)
        os._exit(KSFT_FAIL)
