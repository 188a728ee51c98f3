"""The errors kvmlab reports to its user, and the exit codes that go with them.

Exit codes (also in the README's exit-code table):

- the guest command's own exit code passes through unchanged when the run is clean;
- 2: bad usage or setup — unknown kernel spec, missing package, QEMU missing, a
  kernel without KVM. Nothing was booted or the boot was refused. Also: damaged input,
  the host refusing a write or a removal (a full or read-only disk, an immutable file:
  ``kvmlab gc``), and a QEMU that does not answer ``kvmlab inspect`` within its
  ``--timeout`` (another client holds the socket, or QEMU is wedged);
- 123: ``--check-invariants-every``: the guest kernel's memslots broke an invariant, or
  the checks that were asked for could not run;
- 124: the guest did not finish within ``--timeout`` (a hang), as timeout(1) does;
- 125: the guest kernel crashed or complained (panic, Oops, BUG, WARNING, KASAN,
  UBSAN, RCU stall, hung task) — even when the command itself exited 0;
- 126: the VM was lost: QEMU died or the guest powered off without reporting a status;
- 130: interrupted, by Ctrl-C (SIGINT) or SIGTERM; what kvmlab started is stopped, and
  a guest that ``kvmlab inspect`` paused is resumed;
- 70: an internal error, a bug in kvmlab (EX_SOFTWARE of sysexits.h): one line names it
  and where its traceback was saved. Distinct from qualify's 1 ("regressed"), so CI can
  tell a crash of the tool from a verdict.
"""

EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INVARIANT = 123
EXIT_HANG = 124
EXIT_SPLAT = 125
EXIT_LOST = 126
EXIT_INTERRUPTED = 130


class KvmlabError(Exception):
    """A failure kvmlab explains in one line; ``exit_code`` says what kind it was."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class WriteFailed(KvmlabError):
    """The host refused a write (a full or read-only disk): ``path`` and the OS's ``reason``
    kept apart, so that a caller writing into a scratch directory can name the real place."""

    def __init__(self, path, reason: str, hint: str = ""):
        super().__init__(f"cannot write {path}: {reason}{hint}")
        self.path, self.reason = path, reason


class UnknownSpec(KvmlabError):
    """A kernel spec that names nothing kvmlab can fetch or find."""


class MissingTool(KvmlabError):
    """A host program kvmlab needs (qemu-system-x86_64, mmdebstrap, bsdtar...) is absent."""


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a one-line error quotes what it found,
    and what it found may be a 5,000-character spec or a 400-digit number."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"
