"""How much of a move-test iteration is Python's own cost (target: ≤ 10 %).

In one guest per kernel: kselftest_py.memslot_perf's move active / move inactive tests
(the iteration times the product reports), then bench/guest_python_cost.py, which
times the same host loop with the ioctl stubbed out. The ratio of the two is the
share of each measured iteration that Python itself spends.

    python bench/python_overhead.py [--kernels debian:bookworm,debian:bullseye] [--json FILE]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmlab_guest import protocol

HERE = Path(__file__).resolve().parent
SLOTS = {"debian:bookworm": [10, 509, 32764], "debian:bullseye": [10, 509]}


def guest_job(slots: list[int], seconds: int) -> str:
    perf = " && ".join(
        f"python3 -m kselftest_py.memslot_perf -f 3 -e 4 -s {n} -l {seconds} --json /results/perf-{n}.json"
        for n in slots
    )
    counts = " ".join(map(str, slots))
    cost = f"python3 {protocol.ADDED}/guest_python_cost.py --json {protocol.RESULTS}/cost.json {counts}"
    return f"{perf} && {cost}"


def run_kernel(spec: str, seconds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        job = guest_job(SLOTS[spec], seconds)
        subprocess.run([sys.executable, "-m", "kvmlab.cli", "run", spec, "--timeout", "1800", "--out", out,
                        "--add", str(HERE / "guest_python_cost.py"), "--", "sh", "-c", job],
                       check=True, stdout=subprocess.DEVNULL)
        cost = {row["slots"]: row for row in json.loads((Path(out) / "cost.json").read_text())}
        rows = []
        for slots in SLOTS[spec]:
            perf = json.loads((Path(out) / f"perf-{slots}.json").read_text())
            for run in perf["runs"]:
                python_ns = cost[slots]["python_only_ns"]
                rows.append({"kernel": spec, "release": perf["kernel_release"], "slots": slots,
                             "test": run["test"], "iteration_ns": run["iteration_ns"],
                             "python_only_ns": python_ns, "share": python_ns / run["iteration_ns"]})
        return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="debian:bookworm,debian:bullseye")
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [row for spec in args.kernels.split(",") for row in run_kernel(spec, args.seconds)]
    print("| kernel | slots | test | per iteration | Python alone | share |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['release']} | {r['slots']} | {r['test']} | {r['iteration_ns'] / 1000:.1f} µs | "
              f"{r['python_only_ns'] / 1000:.1f} µs | {100 * r['share']:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
