"""Repeatability of memslot_perf's figures: spread across runs and across boots, per clock.

Each kernel boots ``--boots`` times per clock; every boot runs every memslot_perf test
at each slot count, ``--runs`` runs each (``kvmlab run ... -- sh -c 'for s in ...'``).
Per cell (kernel × clock × test × slots; slot setup as its own measure) it prints:

- within: the coefficient of variation of the runs inside one boot (mean over boots);
- across: the CV of the per-boot medians, which is what an A/B of two boots sees;
- the median, and how many runs and boots it rests on.

Target under icount: across ≤ 1 % in every cell. Under icount each QEMU runs on one
host thread and its figures do not depend on the host's load, so ``--jobs 2`` boots two
at once; wall-clock boots always run alone. A boot that hangs or fails is counted,
reported and booted again (never silently): the hang counts are the livelock census.

    python bench/repeatability.py [--kernels debian:bullseye,debian:bookworm] [--boots 3]
        [--clocks icount,wall] [--slots 10,100,509] [--runs 2] [--seconds 0.5] [--jobs 2]
        [--first 0] [--last 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kselftest_py import memslot_perf

TESTS = tuple(test.name for test in memslot_perf.TESTS)
EXIT_HANG = 124
ATTEMPTS = 3


def guest_job(slots: list[int], runs: int, seconds: float, first: int, last: int) -> str:
    counts = " ".join(map(str, slots))
    return (f"for s in {counts}; do python3 -m kselftest_py.memslot_perf -s $s -f {first} -e {last} "
            f"-r {runs} -l {seconds} --json $KVMLAB_RESULTS/s$s.json > /dev/null || exit 1; done")


def one_boot(kernel: str, clock: str, cpus: int, args, out: Path) -> dict:
    """Boot once (again after a hang, counted), run the job, return its runs and what it cost."""
    hangs, failures = [], []
    for attempt in range(ATTEMPTS):
        target = out / f"attempt{attempt}"
        argv = [sys.executable, "-m", "kvmlab.cli", "run", kernel, "--fresh-boot", "--clock", clock,
                "--cpus", str(cpus), "--out", str(target), "--timeout", "3000"]
        if args.append:
            argv += ["--append", args.append]
        argv += ["--", "sh", "-c", guest_job(args.slots, args.runs, args.seconds, args.first, args.last)]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        if done.returncode == 0:
            runs = []
            for slots in args.slots:
                record = json.loads((target / f"s{slots}.json").read_text())
                runs += record["runs"]
            return {"kernel": kernel, "clock": clock, "runs": runs, "wall_s": wall,
                    "hangs": hangs, "failures": failures}
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        (hangs if done.returncode == EXIT_HANG else failures).append(tail[0][:300])
        print(f"  {kernel} {clock}: boot failed (exit {done.returncode}): {tail[0][:200]}; "
              f"{'again' if attempt + 1 < ATTEMPTS else 'giving up'}", file=sys.stderr, flush=True)
    return {"kernel": kernel, "clock": clock, "runs": [], "wall_s": 0.0, "hangs": hangs, "failures": failures}


def cv(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean else None


def summarize(boots: list[dict]) -> list[dict]:
    """One row per kernel × clock × measure × slots."""
    cells: dict[tuple, list[list[float]]] = {}
    for number, boot in enumerate(boots):
        for run in boot["runs"]:
            measures = [(run["test"], run["iteration_ns"])]
            if run["test"] in ("move active area", "move inactive area", "RW"):
                measures.append(("slot setup", run["slot_setup_ns"]))
            for measure, value in measures:
                if value is None:
                    continue
                key = (boot["kernel"], boot["clock"], measure, run["slots"])
                per_boot = cells.setdefault(key, {})
                per_boot.setdefault(number, []).append(float(value))
    rows = []
    for (kernel, clock, measure, slots), per_boot in sorted(cells.items()):
        within = [c for c in (cv(values) for values in per_boot.values()) if c is not None]
        medians = [statistics.median(values) for values in per_boot.values()]
        every = [v for values in per_boot.values() for v in values]
        rows.append({"kernel": kernel, "clock": clock, "measure": measure, "slots": slots,
                     "median_ns": statistics.median(every), "runs": len(every), "boots": len(per_boot),
                     "cv_within": statistics.fmean(within) if within else None,
                     "cv_across": cv(medians)})
    return rows


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | clock | measure | slots | median | CV within a boot | CV across boots "
             "| runs/boots |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['clock']} | {row['measure']} | {row['slots']} | "
                     f"{row['median_ns'] / 1e3:.1f} µs | {percent(row['cv_within'])} | "
                     f"{percent(row['cv_across'])} | {row['runs']}/{row['boots']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="debian:bullseye,debian:bookworm")
    parser.add_argument("--clocks", default="icount,wall")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--slots", default="10,100,509")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--first", type=int, default=0, help="first memslot_perf test (0: map)")
    parser.add_argument("--last", type=int, default=5, help="last memslot_perf test (5: RW)")
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--icount-cpus", type=int, default=1, help="L1 vCPUs under icount (1)")
    parser.add_argument("--wall-cpus", type=int, default=2, help="L1 vCPUs under wall (2)")
    parser.add_argument("--append", default="", help="kernel arguments for every boot")
    parser.add_argument("--jobs", type=int, default=2, help="icount boots at once (wall boots run alone)")
    parser.add_argument("--json", type=Path, help="write every boot's runs and the summary here")
    args = parser.parse_args()
    args.slots = [int(s) for s in args.slots.split(",")]
    kernels, clocks = args.kernels.split(","), args.clocks.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="kvmlab-repeat-"))
    boots: list[dict] = []
    started = time.monotonic()
    for clock in clocks:
        cpus = args.icount_cpus if clock == "icount" else args.wall_cpus
        jobs = [(kernel, number) for number in range(args.boots) for kernel in kernels]
        width = args.jobs if clock == "icount" else 1
        with concurrent.futures.ThreadPoolExecutor(width) as pool:
            futures = [pool.submit(one_boot, kernel, clock, cpus, args, scratch / f"{clock}-{number}-{i}")
                       for i, (kernel, number) in enumerate(jobs)]
            for future in futures:
                boot = future.result()
                boots.append(boot)
                print(f"  {boot['kernel']} {clock}: {len(boot['runs'])} runs in {boot['wall_s']:.0f} s, "
                      f"{len(boot['hangs'])} hangs, {len(boot['failures'])} failures", file=sys.stderr,
                      flush=True)
    rows = summarize(boots)
    print(markdown(rows))
    hangs = {clock: sum(len(b["hangs"]) for b in boots if b["clock"] == clock) for clock in clocks}
    tries = {clock: sum(1 + len(b["hangs"]) + len(b["failures"]) for b in boots if b["clock"] == clock)
             for clock in clocks}
    print(f"\nboots: {', '.join(f'{c}: {tries[c]} boots, {hangs[c]} hung' for c in clocks)}; "
          f"{time.monotonic() - started:.0f} s in all; "
          f"command: {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps({"boots": boots, "summary": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
