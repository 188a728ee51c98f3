"""How often the nested guest hangs, per QEMU version and clock: a census of run directories.

Every boot kvmlab makes (``kvmlab run``, qualify's guest sessions, the benchmarks and
the VM tests) leaves ``run.json`` in the cache's runs area with the QEMU version, the
clock, the vCPUs and how it ended. This counts, per QEMU version × clock × vCPUs, the
boots that reached a verdict and those that hung (no heartbeat: a frozen or livelocked
kernel), booting or later. Nothing is booted here; run it after the work to count.

    python bench/livelock_census.py [--since YYYYMMDD-HHMMSS] [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvmlab import cache  # noqa: E402

ENDED = {"ok", "failed", "splat", "hang", "lost", "invariant", "finished", "down"}


def census(runs: Path, since: str) -> tuple[Counter, Counter, list[str]]:
    boots, hangs, where = Counter(), Counter(), []
    for run_json in sorted(runs.glob("*/run.json")):
        if run_json.parent.name < since:
            continue
        try:
            record = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        if "qemu_pid" not in record or record.get("state") not in ENDED:
            continue
        job = " ".join(map(str, record.get("argv", [])))
        if "memslot" not in job and "agent.py" not in job:
            continue
        qemu = (record.get("qemu") or {}).get("version", "7.2 (system)")
        key = (qemu, record.get("clock", "wall"), record.get("cpus", 2))
        boots[key] += 1
        if "hang" in (record.get("state"), record.get("outcome")):
            hangs[key] += 1
            where.append(f"{run_json.parent.name} {record.get('release')} {key}")
    return boots, hangs, where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", default="", help="only run directories named from this time on")
    parser.add_argument("--runs", type=Path, default=None, help="runs area (the cache's)")
    args = parser.parse_args()
    boots, hangs, where = census(args.runs or cache.area("runs"), args.since)
    print("| QEMU | clock | L1 vCPUs | boots | hung | rate |")
    print("|---|---|---|---|---|---|")
    for key, count in sorted(boots.items()):
        print(f"| {key[0]} | {key[1]} | {key[2]} | {count} | {hangs[key]} | {hangs[key] / count:.1%} |")
    for line in where:
        print(f"hung: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
