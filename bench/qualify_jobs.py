"""`make qualify` with --jobs 1 and --jobs N in one run: the speed-up, how busy the host
was, and whether the cells agree (under icount they must: same verdicts, and medians
within each cell's own spread between runs).

Both qualifications use the warm cache (kernels, QEMU and the guest image fetched
before the first is timed), the Makefile's matrix and clock, and run one after the
other, --jobs 1 first, so that neither competes with the other. "Cores busy" is the
host's non-idle CPU time over the wall time, from /proc/stat.

    python bench/qualify_jobs.py            # --jobs 1 against --jobs 2
    python bench/qualify_jobs.py --jobs 4   # against --jobs 4
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvmlab.qualify import analysis  # noqa: E402
from kvmlab.qualify.store import Store  # noqa: E402

#: The least bound on a median's move between the legs, for cells whose runs repeat to
#: the nanosecond (docs/benchmarks.md, repeatability).
AGREEMENT_FLOOR = 0.005


def busy_jiffies() -> tuple[int, int]:
    """(non-idle, all) CPU jiffies of the host so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def qualify(jobs: int, out: Path) -> dict:
    busy_before, _ = busy_jiffies()
    started = time.monotonic()
    done = subprocess.run(["make", "-s", "qualify", f"QUALIFY_DIR={out}", f"QUALIFY_ARGS=--jobs {jobs}"],
                          cwd=REPO, capture_output=True, text=True)
    took = time.monotonic() - started
    busy_after, _ = busy_jiffies()
    if not any(line.startswith("Verdict:") for line in done.stdout.splitlines()):
        # make says 2 for qualify's 1 (a regression): only a missing verdict is a failure.
        sys.exit(f"qualify --jobs {jobs} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    store = Store(out)
    records = store.records()
    crashes = sum(1 for r in records if r["kind"] == "crash")
    boots = len({r.get("template_boot") or r["boot"] for r in records if r["kind"] == "run"})
    result = analysis.analyse(store.config, records)
    return {
        "jobs": jobs, "wall_s": round(took, 1),
        "cores_busy": round((busy_after - busy_before) / os.sysconf("SC_CLK_TCK") / took, 2),
        "runs": sum(1 for r in records if r["kind"] == "run"), "boots": boots, "crashes": crashes,
        "verdict": next((line for line in done.stdout.splitlines() if line.startswith("Verdict:")), "?"),
        "cells": {f"{c.measure}@{c.point}": (c.comparison.base_median, c.comparison.patched_median, c.verdict)
                  for c in result.cells if c.comparison},
        "spread": {f"{c.measure}@{c.point}": max(_range(c.base), _range(c.patched))
                   for c in result.cells if c.comparison},
    }


def largest_move(one: dict, many: dict) -> tuple[float, str]:
    """The largest relative move of a median between the two, and its cell."""
    moves = [(max(abs(many["cells"][cell][0] / base - 1), abs(many["cells"][cell][1] / patched - 1)), cell)
             for cell, (base, patched, _) in one["cells"].items() if cell in many["cells"]]
    return max(moves, default=(0.0, "-"))


def _range(values: list[float]) -> float:
    """A side's runs' spread: (max - min) / median."""
    ordered = sorted(values)
    return (ordered[-1] - ordered[0]) / ordered[len(ordered) // 2]


def agreement(one: dict, many: dict) -> list[str]:
    """Cells whose verdict differs, or whose medians moved by more than the cell's own runs
    spread in either leg (at least AGREEMENT_FLOOR): the move active cells spread 2-6 %
    from boot to boot, slot setup and the unmap loops 0.01-0.5 %."""
    problems = []
    for cell, (base, patched, verdict) in one["cells"].items():
        other = many["cells"].get(cell)
        if other is None:
            problems.append(f"{cell}: missing with --jobs {many['jobs']}")
            continue
        moved = max(abs(other[0] / base - 1), abs(other[1] / patched - 1))
        bound = max(one["spread"][cell], many["spread"][cell], AGREEMENT_FLOOR)
        if moved > bound or other[2] != verdict:
            problems.append(f"{cell}: medians moved {moved:.1%} (its runs spread {bound:.1%}), "
                            f"verdict {verdict} → {other[2]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="the parallel side (default 2)")
    args = parser.parse_args()
    subprocess.run(["make", "-s", "setup"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory(prefix="kvmlab-jobs-") as scratch:
        one = qualify(1, Path(scratch) / "jobs1")
        many = qualify(args.jobs, Path(scratch) / f"jobs{args.jobs}")
    problems = agreement(one, many)
    for row in (one, many):
        print(f"--jobs {row['jobs']}: {row['wall_s'] / 60:.1f} min, {row['cores_busy']} cores busy, "
              f"{row['runs']} runs in {row['boots']} boots, {row['crashes']} crashes; {row['verdict']}")
    print(f"speed-up --jobs {args.jobs} / --jobs 1: {one['wall_s'] / many['wall_s']:.2f}x "
          f"(cores {many['cores_busy'] / one['cores_busy']:.2f}x busier)")
    moved, where = largest_move(one, many)
    print(f"largest move of a median: {moved:.2%} ({where}), over {len(one['cells'])} cells")
    print("every cell agrees within its runs' spread, with the same verdict" if not problems else
          "cells differ:\n  " + "\n  ".join(problems))
    print(json.dumps({"one": one, "many": many}, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
