"""The ``kvmlab`` command line: one module per verb, each parse → call → print."""

import argparse
import signal
import sys

from kvmlab.cli import gc, inspect, kernel, qualify, run, trace
from kvmlab.errors import EXIT_USAGE, KvmlabError
from traces.errors import TraceError

EXIT_INTERRUPTED = 130


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
        print(f"kvmlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except TraceError as err:
        print(f"kvmlab: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvmlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
