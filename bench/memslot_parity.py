"""Parity of kselftest_py.memslot_perf with upstream's memslot_perf_test (target: within 10 %).

Upstream's binary is built from Debian's linux-source-6.1 at run time
(bench/upstream_selftests.py, cached, never committed) and both run in the same guest,
interleaved run by run (upstream, Python, upstream, Python, ...) so drift hits both.
Compared: per-iteration time of unmap, unmap chunked, move active area and move
inactive area, and the slot setup time (of the whole-area tests), at 10 and 509 slots.
Both print the same "Test took … for slot setup + …" and "Done N iterations, avg …"
lines, so one parser reads both.

    python bench/memslot_parity.py [--kernel debian:bookworm] [--runs 3] [--seconds 3] [--json FILE]
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream_selftests  # noqa: E402

TESTS = {1: "unmap", 2: "unmap chunked", 3: "move active area", 4: "move inactive area"}
SLOTS = (10, 509)
TOOK = re.compile(r"Test took (\d+\.\d+)s for slot setup \+ (\d+\.\d+)s all iterations")
DONE = re.compile(r"Done (\d+) iterations, avg (\d+\.\d+)s each")
MARK = re.compile(r"^=== (\S+) slots=(\d+) test=(\d+) run=(\d+)$")


#: A guest shell function: run a command, and if it is still going after a deadline,
#: print every thread's kernel stack (where it is stuck) and kill it.
WITH_DEADLINE = """with_deadline() {
  limit=$1; shift
  "$@" & pid=$!
  ( sleep "$limit"; if kill -0 $pid 2>/dev/null; then
      echo "HUNG after ${limit}s: $*"
      for t in /proc/$pid/task/*; do echo "  thread $(cat $t/comm):"; sed 's/^/    /' $t/stack; done
      kill -9 $pid; fi ) & watcher=$!
  wait $pid; kill $watcher 2>/dev/null; wait $watcher 2>/dev/null
}"""
HUNG = re.compile(r"^HUNG after")


def guest_job(runs: int, seconds: int) -> str:
    lines = [WITH_DEADLINE]
    deadline = 20 * seconds + 60
    for slots in SLOTS:
        for test in TESTS:
            for run in range(runs):
                for impl, command in (
                    ("upstream", "/opt/kvmlab/add/memslot_perf_test"),
                    ("python", "python3 -m kselftest_py.memslot_perf"),
                ):
                    lines.append(f"echo '=== {impl} slots={slots} test={test} run={run}'")
                    lines.append(f"with_deadline {deadline} {command} -s {slots} -f {test} -e {test} "
                                 f"-l {seconds} 2>&1 || true")
    return "\n".join(lines)


def parse(output: str) -> list[dict]:
    """One record per (implementation, slots, test, run) block of the guest's output."""
    records, current = [], None
    for line in output.splitlines():
        if mark := MARK.match(line):
            current = {"impl": mark[1], "slots": int(mark[2]), "test": TESTS[int(mark[3])],
                       "run": int(mark[4])}
            records.append(current)
        elif current and (took := TOOK.search(line)):
            current["slot_setup_s"] = float(took[1])
        elif current and (done := DONE.search(line)):
            current["iterations"], current["iteration_s"] = int(done[1]), float(done[2])
        elif current and HUNG.match(line):
            current["hung"] = True
            current.setdefault("stacks", [])
        elif current and current.get("hung") and line.startswith("    "):
            current["stacks"].append(line.strip())
    return records


def compare(records: list[dict]) -> list[dict]:
    """Median per (slots, measure) for each implementation, and Python / upstream."""
    rows = []
    for slots in SLOTS:
        mine = [r for r in records if r["slots"] == slots]
        measures = [(test, "iteration_s", [r for r in mine if r["test"] == test]) for test in TESTS.values()]
        whole_area = [r for r in mine if r["test"].startswith("move")]
        measures.append(("slot setup", "slot_setup_s", whole_area))
        for name, field, group in measures:
            values = {impl: [r[field] for r in group if r["impl"] == impl and field in r]
                      for impl in ("upstream", "python")}
            if not values["upstream"] or not values["python"]:
                rows.append({"slots": slots, "measure": name, "missing": True})
                continue
            upstream, python = statistics.median(values["upstream"]), statistics.median(values["python"])
            rows.append({"slots": slots, "measure": name, "upstream_s": upstream, "python_s": python,
                         "ratio": python / upstream, "runs": len(values["python"])})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="debian:bookworm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    binary = upstream_selftests.build(("memslot_perf_test",))["memslot_perf_test"]
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-m", "kvmlab.cli", "run", args.kernel, "--timeout", "3600", "--out", out,
             "--add", str(binary), "--", "sh", "-c", guest_job(args.runs, args.seconds)],
            capture_output=True, text=True, check=False,
        )
    if done.returncode != 0:  # e.g. a stalled guest: report what finished before it
        print(f"kvmlab run exited {done.returncode}; partial results:", file=sys.stderr)
        said = [line for line in done.stderr.splitlines() if line.startswith("kvmlab:")]
        print("\n".join(said), file=sys.stderr)
    records = parse(done.stdout)
    rows = compare(records)
    for hung in (r for r in records if r.get("hung")):
        print(f"HUNG: {hung['impl']} {hung['test']} at {hung['slots']} slots, run {hung['run']}; "
              f"kernel stack: {' <- '.join(hung['stacks'][:6])}")
    print(f"kernel {args.kernel}, {args.runs} interleaved runs of {args.seconds} s, medians")
    print("| slots | measure | upstream (C) | kselftest_py | Python / C |")
    print("|---|---|---|---|---|")
    for row in rows:
        if row.get("missing"):
            print(f"| {row['slots']} | {row['measure']} | – | – | missing |")
            continue
        print(f"| {row['slots']} | {row['measure']} | {row['upstream_s'] * 1e3:.3f} ms | "
              f"{row['python_s'] * 1e3:.3f} ms | {row['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"kernel": args.kernel, "records": records, "rows": rows}, indent=2))
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
