"""Parity of kselftest_py.memslot_perf with upstream's memslot_perf_test (target: within 10 %).

Upstream's binary is built from Debian's linux-source-6.1 at run time
(bench/upstream_selftests.py, cached, never committed) and both run in the same guest,
interleaved run by run (upstream, Python, upstream, Python, ...) so drift hits both,
one boot per slot count and test.
Compared: per-iteration time of unmap, unmap chunked, move active area and move
inactive area, and the slot setup time (of the whole-area tests), at 10 and 509 slots.
Both print the same "Test took … for slot setup + …" and "Done N iterations, avg …"
lines, so one parser reads both.

    python bench/memslot_parity.py [--kernel debian:bookworm] [--runs 5] [--seconds 3]
                                   [--clock icount] [--cpus 1] [--json FILE]

Under ``--clock icount`` (the default) both count emulated instructions, so the ratio
is a ratio of work, repeatable to a fraction of a percent.
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
from kvmlab_guest import protocol  # noqa: E402

from kselftest_py import memslot_perf  # noqa: E402

#: memslot_perf test number → name: the four tests upstream's C test has too (unmap .. move inactive).
TESTS = {number: test.name for number, test in enumerate(memslot_perf.TESTS) if 1 <= number <= 4}
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


def guest_job(slots: int, test: int, runs: int, seconds: int) -> str:
    """Shell for one boot: ``runs`` interleaved pairs of upstream and Python runs."""
    lines = [WITH_DEADLINE]
    deadline = 20 * seconds + 60
    for run in range(runs):
        for impl, command in (
            ("upstream", f"{protocol.ADDED}/memslot_perf_test"),
            ("python", "python3 -m kselftest_py.memslot_perf"),
        ):
            lines.append(f"echo '=== {impl} slots={slots} test={test} run={run}'")
            lines.append(f"with_deadline {deadline} {command} -s {slots} -f {test} -e {test} "
                         f"-l {seconds} 2>&1 || true")
    return "\n".join(lines)


def run_block(kernel: str, binary: Path, slots: int, test: int, runs: int, seconds: int,
              machine: list[str]) -> list[dict]:
    """One guest boot per (slots, test), so that a guest that livelocks (docs/known-problems.md)
    costs one block, which is booted once more; finished runs of a stalled boot count."""
    records: list[dict] = []
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run(
                [sys.executable, "-m", "kvmlab.cli", "run", kernel, *machine, "--timeout", "1800",
                 "--out", out,
                 "--add", str(binary), "--", "sh", "-c", guest_job(slots, test, runs, seconds)],
                capture_output=True, text=True, check=False,
            )
        complete = [r for r in parse(done.stdout) if "iteration_s" in r or r.get("hung")]
        records += complete
        if done.returncode == 0:
            break
        print(f"slots {slots} test {TESTS[test]}: kvmlab run exited {done.returncode} after "
              f"{len(complete)} runs (attempt {attempt})", file=sys.stderr)
    return records


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
            best_upstream, best_python = min(values["upstream"]), min(values["python"])
            rows.append({"slots": slots, "measure": name, "upstream_s": upstream, "python_s": python,
                         "ratio": python / upstream, "best_ratio": best_python / best_upstream,
                         "runs": len(values["python"])})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="debian:bookworm")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3,
                        help="seconds per run (upstream takes whole seconds)")
    parser.add_argument("--clock", default="icount", help="guest clock (icount: instruction counts)")
    parser.add_argument("--cpus", type=int, default=1, help="L1 vCPUs (1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    machine = ["--clock", args.clock, "--cpus", str(args.cpus)]
    binary = upstream_selftests.build(("memslot_perf_test",))["memslot_perf_test"]
    records = [record for slots in SLOTS for test in TESTS
               for record in run_block(args.kernel, binary, slots, test, args.runs, args.seconds, machine)]
    rows = compare(records)
    for hung in (r for r in records if r.get("hung")):
        print(f"HUNG: {hung['impl']} {hung['test']} at {hung['slots']} slots, run {hung['run']}; "
              f"kernel stack: {' <- '.join(hung['stacks'][:6])}")
    print(f"kernel {args.kernel}, clock {args.clock}, {args.cpus} vCPU(s), {args.runs} interleaved runs of "
          f"{args.seconds} s; medians, and the "
          f"ratio of the best runs (what both tests print as their result)")
    print("| slots | measure | upstream (C) | kselftest_py | Python / C | best Python / best C |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if row.get("missing"):
            print(f"| {row['slots']} | {row['measure']} | – | – | missing | – |")
            continue
        print(f"| {row['slots']} | {row['measure']} | {row['upstream_s'] * 1e3:.3f} ms | "
              f"{row['python_s'] * 1e3:.3f} ms | {row['ratio']:.2f} | {row['best_ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"kernel": args.kernel, "records": records, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
