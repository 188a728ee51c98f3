"""Merge, resume and report on large stores: each should grow linearly with the records.

Issue 26 measured merge at 41 s for 14,400 records (an fsync per record) and ``--resume``
on a complete store quadratic (2,400 records 2.4 s, 7,200 19.5 s, 14,400 ~82 s: each run
scanned every record). This makes synthetic qualifications of N records (every test of
memslot_perf at ten slot counts, N / 100 runs a cell and side, dealt into 4 shards), on
this host's real kernels and QEMU (as recorded by ``--plan``, so that ``--resume``
accepts them), and times, as a user would run them:

- ``kvmlab qualify merge SHARD1..4 -o OUT`` (which also analyses and writes the reports),
- ``kvmlab qualify --resume -o OUT`` on the complete merged store (nothing left to run:
  it reads the store, finds every run done, and reports),
- ``kvmlab qualify report OUT -o ELSEWHERE`` (the reports alone).

Per size it prints the seconds and the µs per record; linear means a flat µs/record.
The kernels and QEMU must be in the cache (``make setup`` and one ``make demo``).

    python bench/store_scale.py                         # 2,400, 14,400 and 100,000 records
    python bench/store_scale.py --records 2400 14400    # just these sizes
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvmlab.qualify import matrix, plan, qualification, workloads  # noqa: E402
from kvmlab.qualify.store import Store  # noqa: E402

POINTS = (2, 10, 30, 50, 100, 200, 300, 400, 509, 1000)
SHARDS = 4


def make_plan(path: Path, runs: int) -> dict:
    """A real plan (this host's exact kernels and QEMU) of every test at ``POINTS``."""
    workload = workloads.get(workloads.DEFAULT)
    request = qualification.Request(base="debian:bullseye", patched="debian:bookworm",
                                     tests=",".join(map(workload.option, workload.tests)),
                                     points=",".join(map(str, POINTS)), runs=runs, clock="icount")
    return qualification.write_plan(path, request, SHARDS, lambda text: None)


def fill_shards(record: dict, where: Path) -> list[Path]:
    """Every shard of ``record`` finished with synthetic runs: patched 10 % faster."""
    directories = []
    for k in range(1, SHARDS + 1):
        config = plan.shard_config(record, k, SHARDS)
        items = plan.items_of(config, matrix.run_order(config.tests, config.points, config.runs,
                                                       rounds_first=True))
        store = Store.create(where / f"shard{k}", config)
        store.append_all([{
            "kind": "run", "side": i.side, "test": i.test, "slots": i.point, "run": i.run,
            "iteration_ns": 1e5 * (0.9 if i.side == "patched" else 1.0) * (1 + (i.run % 5) / 1000),
            "iterations": 100, "slot_setup_ns": i.point * 1e3, "release": "synthetic",
            "clock": "icount", "boot": f"b{i.run}", "restored": True, "elapsed_s": 1.0, "lane": 0,
        } for i in items])
        store.release()
        directories.append(store.directory)
    return directories


def timed(*argv: str) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kvmlab.cli", *argv], cwd=REPO, capture_output=True,
                          text=True)
    took = time.monotonic() - started
    if done.returncode not in (0, 1):
        sys.exit(f"kvmlab {' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return took


def measure(records: int, scratch: Path) -> dict:
    workload = workloads.get(workloads.DEFAULT)
    runs = records // (2 * len(workload.tests) * len(POINTS))
    where = scratch / str(records)
    where.mkdir()
    record = make_plan(where / "plan.json", runs)
    shards = fill_shards(record, where)
    total = sum(1 for shard in shards for _ in open(shard / "runs.jsonl"))
    out = where / "merged"
    result = {"records": total, "runs_per_cell": runs,
              "merge_s": timed("qualify", "merge", *map(str, shards), "-o", str(out)),
              "resume_s": timed("qualify", "--resume", "-o", str(out)),
              "report_s": timed("qualify", "report", str(out), "-o", str(where / "again"))}
    for step in ("merge", "resume", "report"):
        result[f"{step}_us_per_record"] = round(result[f"{step}_s"] / total * 1e6, 1)
        result[f"{step}_s"] = round(result[f"{step}_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[2400, 14400, 100000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmlab-store-scale-") as scratch:
        for records in args.records:
            print(json.dumps(measure(records, Path(scratch))), flush=True)


if __name__ == "__main__":
    main()
