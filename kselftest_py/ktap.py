"""A small KTAP v1 writer and the kselftest exit codes.

Output follows Documentation/dev-tools/ktap.rst, the format kselftest and KUnit
print, so kvmlab (and any kselftest runner) can parse results from the guest
console without knowing about kselftest_py::

    KTAP version 1
    1..3
    # nr_memslots: 32764
    ok 1 nr_memslots
    not ok 2 vcpu_run
    ok 3 big_slots # SKIP needs 8194 slots, KVM allows 509

The exit code is the kselftest one: a failure anywhere fails the suite, a suite
where everything was skipped is a skip, and a suite that did not report every
planned test is a failure (a silent crash must not read as success).
"""

from __future__ import annotations

import sys

__all__ = [
    "FAIL",
    "KSFT_FAIL",
    "KSFT_PASS",
    "KSFT_SKIP",
    "KSFT_XFAIL",
    "KSFT_XPASS",
    "PASS",
    "SKIP",
    "XFAIL",
    "KtapWriter",
    "suite_exit_code",
]

# tools/testing/selftests/kselftest.h
KSFT_PASS = 0
KSFT_FAIL = 1
KSFT_XFAIL = 2
KSFT_XPASS = 3
KSFT_SKIP = 4

# Result of one test point, as stored and as written to JSON.
PASS = "pass"
FAIL = "fail"
SKIP = "skip"
XFAIL = "xfail"
RESULTS = (PASS, FAIL, SKIP, XFAIL)


def suite_exit_code(results, planned: int | None = None) -> int:
    """The kselftest exit code of a suite whose test points ended with ``results``.

    Any fail, or fewer/more results than ``planned``, gives KSFT_FAIL; all skipped
    (including no test at all) gives KSFT_SKIP; otherwise KSFT_PASS. An expected
    failure (xfail) counts as a pass, as in kselftest.
    """
    results = list(results)
    unknown = [r for r in results if r not in RESULTS]
    if unknown:
        raise ValueError(f"unknown test results {unknown}; known: {', '.join(RESULTS)}")
    if FAIL in results or (planned is not None and len(results) != planned):
        return KSFT_FAIL
    if all(r == SKIP for r in results):
        return KSFT_SKIP
    return KSFT_PASS


def _one_line(text: str) -> str:
    """Test descriptions and directives must stay on their line and not start a directive."""
    return " ".join(str(text).replace("#", "").split())


class KtapWriter:
    """Writes one KTAP v1 document to ``stream`` (stdout by default), numbering tests.

    Lines are flushed as they are written, so a guest that dies mid-suite still
    leaves every finished result on the console.
    """

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.planned: int | None = None
        self.results: list[tuple[str, str]] = []

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def header(self) -> None:
        self._line("KTAP version 1")

    def plan(self, count: int) -> None:
        self.planned = count
        self._line(f"1..{count}")

    def diag(self, text: str) -> None:
        """Diagnostic lines ``# ...``; multi-line text becomes several of them."""
        for line in str(text).splitlines() or [""]:
            self._line(f"# {line}".rstrip())

    def _result(self, ok: bool, name: str, result: str, directive: str = "") -> None:
        self.results.append((name, result))
        line = f"{'ok' if ok else 'not ok'} {len(self.results)} {_one_line(name)}"
        if directive:
            line += f" # {directive}"
        self._line(line)

    def ok(self, name: str) -> None:
        self._result(True, name, PASS)

    def not_ok(self, name: str) -> None:
        self._result(False, name, FAIL)

    def skip(self, name: str, reason: str) -> None:
        self._result(True, name, SKIP, f"SKIP {_one_line(reason)}")

    def xfail(self, name: str, reason: str) -> None:
        self._result(True, name, XFAIL, f"XFAIL {_one_line(reason)}")

    def exit_code(self) -> int:
        return suite_exit_code((result for _, result in self.results), self.planned)

    def finish(self) -> int:
        """Print kselftest's totals line and return the suite's exit code."""
        counts = {result: 0 for result in RESULTS}
        for _, result in self.results:
            counts[result] += 1
        self.diag(
            f"Totals: pass:{counts[PASS]} fail:{counts[FAIL]} "
            f"xfail:{counts[XFAIL]} xpass:0 skip:{counts[SKIP]} error:0"
        )
        return self.exit_code()
