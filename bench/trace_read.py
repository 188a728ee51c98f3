"""Reading a trace.dat into pandas vs ``trace-cmd report`` (target: at least as many events/s; goal 2x).

Times traces.tracedat.read_events (the whole read: file, headers, decompression, the
DataFrame) and ``trace-cmd report > /dev/null`` on the same file, each the median of
``--repeat`` runs, in the same process run. Meant for a function_graph trace of at
least a million events.

    python bench/trace_read.py [TRACE.dat] [--repeat 3] [--json FILE]

Without a path it records one in the lab first (cached under the kvmlab cache's
``bench`` area): memslot_perf's unmap test for 10 s on debian:bookworm with the
memslot-lookup probe set, about 1.8 M events.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traces.tracedat import TraceFile, read_events  # noqa: E402

MIN_EVENTS = 1_000_000


def median_seconds(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def trace_cmd_report(path: Path) -> None:
    subprocess.run(["trace-cmd", "report", "-i", str(path)], stdout=subprocess.DEVNULL, check=True)


def recorded_trace() -> Path:
    """A big function_graph trace from the lab, recorded once."""
    from kvmlab import cache

    out = cache.area("bench") / "trace-read"
    trace = out / "trace.dat"
    if not trace.exists():
        subprocess.run([sys.executable, "-m", "kvmlab.cli", "run", "debian:bookworm",
                        "--trace", "memslot-lookup", "--out", str(out), "--",
                        "python3", "-m", "kselftest_py.memslot_perf",
                        "-s", "10", "-f", "1", "-e", "1", "-l", "10"], check=True)
    return trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, help="a trace.dat (default: record one in the lab)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("trace-cmd") is None:
        print("trace-cmd is not installed", file=sys.stderr)
        return 2
    args.path = args.path or recorded_trace()
    trace = TraceFile.open(args.path)
    events = len(read_events(args.path))
    ours = median_seconds(lambda: read_events(args.path), args.repeat)
    theirs = median_seconds(lambda: trace_cmd_report(args.path), args.repeat)
    result = {
        "path": str(args.path), "version": trace.version, "compression": trace.compression,
        "events": events, "repeat": args.repeat,
        "read_events_s": ours, "trace_cmd_report_s": theirs,
        "read_events_per_s": events / ours, "trace_cmd_report_per_s": events / theirs,
        "ratio": theirs / ours,
    }
    print(f"{args.path}: v{trace.version} {trace.compression}, {events} events"
          + ("" if events >= MIN_EVENTS else f" (fewer than {MIN_EVENTS}: record a bigger trace)"))
    print(f"read_events        {ours:7.3f} s  {result['read_events_per_s']:12,.0f} events/s")
    print(f"trace-cmd report   {theirs:7.3f} s  {result['trace_cmd_report_per_s']:12,.0f} events/s")
    print(f"ratio {result['ratio']:.2f}x (target >= 1, goal >= 2)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ratio"] >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
