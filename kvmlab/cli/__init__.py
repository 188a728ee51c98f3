"""The ``kvmlab`` command line: one module per verb, each parse → call → print."""

import argparse
import signal
import sys
import tempfile
import traceback

from kvmlab.cli import gc, inspect, kernel, qualify, run, trace
from kvmlab.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, KvmlabError
from traces.errors import TraceError

#: The longest error line kvmlab prints.
MAX_ERROR = 500


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kvmlab", description=__doc__)
    sub = top.add_subparsers(dest="verb", required=True)
    for verb in (kernel, run, inspect, trace, qualify, gc):
        verb.add_parsers(sub)
    return top


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C must always reach us, even when started with SIGINT ignored (a background
    # job of a non-interactive shell): it is what kills QEMU and cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = parser().parse_args(argv)
    if command:
        args.command = command
    try:
        return args.func(args)
    except KvmlabError as err:
        print(f"kvmlab: error: {_short(str(err))}", file=sys.stderr)
        return err.exit_code
    except TraceError as err:
        print(f"kvmlab: error: {_short(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvmlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # the host said no: a full disk, a read-only or missing path
        where = f"{err.filename}: " if err.filename else ""
        print(f"kvmlab: error: {_short(where + str(err.strerror or err))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        saved = _save_traceback()
        print(f"kvmlab: internal error: {type(err).__name__}: {err} (a bug in kvmlab; "
              f"traceback in {saved})", file=sys.stderr)
        return EXIT_INTERNAL


def _short(message: str) -> str:
    """An error as one line a terminal can show: what it quotes may be a 5,000-character
    spec, so the middle of a long line goes (its start names the problem, its end the
    way out)."""
    message = " ".join(message.splitlines())
    if len(message) <= MAX_ERROR:
        return message
    half = (MAX_ERROR - 5) // 2
    return f"{message[:half]} […] {message[-half:]}"


def _save_traceback() -> str:
    """Keep the traceback for the bug report, out of the one line the user reads."""
    handle, path = tempfile.mkstemp(prefix="kvmlab-traceback-", suffix=".txt")
    with open(handle, "w") as out:
        out.write(f"kvmlab {' '.join(sys.argv[1:])}\n")
        traceback.print_exc(file=out)
    return path


if __name__ == "__main__":
    sys.exit(main())
