"""Parity of kselftest_py.dirty_log_perf with upstream's dirty_log_perf_test.

Upstream's binary is built from Debian's linux-source-6.1 at run time
(bench/upstream_selftests.py, cached, never committed) and both run in the same guest,
interleaved run by run (upstream, Python, upstream, Python, ...) so drift hits both,
one boot per slot count. Compared, per figure: populate memory, enabling dirty
logging, each iteration's dirty memory, get dirty log and clear dirty log times, and
disabling dirty logging. Both print upstream's lines ("Populate memory time: …",
"Iteration 1 get dirty log time: …"), so one parser (dirty_log_perf.parse_figures)
reads both.

    python bench/dirty_log_parity.py [--kernel debian:bookworm] [--runs 5] [--slots 1,64]
                                     [--vcpus 1] [--bytes 64M] [--iterations 2] [-g]
                                     [--clock icount] [--cpus 1] [--json FILE]

Under ``--clock icount`` (the default) both count emulated instructions, so the ratio
is a ratio of work. Python / C is the ratio of the medians; its range is that of the
ratios of each interleaved pair; each side's spread is (max - min) / median.
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
from memslot_parity import HUNG, WITH_DEADLINE  # noqa: E402

from kselftest_py import dirty_log_perf  # noqa: E402

MARK = re.compile(r"^=== (\S+) slots=(\d+) run=(\d+)$")
SINGLE = (("populate", "populate_ns"), ("enable dirty logging", "enable_dirty_logging_ns"))
PER_ITERATION = (("dirty memory", "dirty_memory_ns"), ("get dirty log", "get_dirty_log_ns"),
                 ("clear dirty log", "clear_dirty_log_ns"))
LAST = (("disable dirty logging", "disable_dirty_logging_ns"),)


def test_args(args: argparse.Namespace, slots: int) -> str:
    """The options both implementations take, in upstream's spelling."""
    flags = f"-b {args.bytes} -v {args.vcpus} -x {slots} -i {args.iterations}"
    return flags + (" -g" if args.no_manual_protect else "")


def guest_job(args: argparse.Namespace, slots: int) -> str:
    """Shell for one boot: ``runs`` interleaved pairs of upstream and Python runs."""
    lines = [WITH_DEADLINE]
    for run in range(args.runs):
        for impl, command in (
            ("upstream", f"{protocol.ADDED}/dirty_log_perf_test"),
            ("python", "python3 -m kselftest_py.dirty_log_perf" + (" --busy-wait" if args.busy_wait else "")),
        ):
            lines.append(f"echo '=== {impl} slots={slots} run={run}'")
            lines.append(f"with_deadline {args.deadline} {command} {test_args(args, slots)} 2>&1 || true")
    return "\n".join(lines)


def parse(output: str) -> list[dict]:
    """One record per (implementation, slots, run) block: its figures, in ns."""
    blocks: list[tuple[dict, list[str]]] = []
    for line in output.splitlines():
        if mark := MARK.match(line):
            blocks.append(({"impl": mark[1], "slots": int(mark[2]), "run": int(mark[3])}, []))
        elif blocks:
            blocks[-1][1].append(line)
    records = []
    for record, lines in blocks:
        record.update(dirty_log_perf.parse_figures("\n".join(lines)))
        if any(HUNG.match(line) for line in lines):
            record["hung"] = True
        records.append(record)
    return records


def complete(record: dict) -> bool:
    return "disable_dirty_logging_ns" in record and "get_dirty_log_total_ns" in record


def run_block(args: argparse.Namespace, binary: Path, slots: int, machine: list[str]) -> list[dict]:
    """One guest boot per slot count; a boot that failed is booted once more, and the
    finished runs of both count."""
    records: list[dict] = []
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            # --fresh-boot: a guest restored from a template stays paused until its first
            # message is sent, and a message carrying the 1.5 MB --add does not fit the
            # socket's buffers, so sending it waits forever (kvmlab, 2026-12-07).
            done = subprocess.run(
                [sys.executable, "-m", "kvmlab.cli", "run", args.kernel, *machine, "--fresh-boot",
                 "--timeout", "3600", "--out", out, "--add", str(binary), "--", "sh", "-c",
                 guest_job(args, slots)],
                capture_output=True, text=True, check=False,
            )
        found = parse(done.stdout)
        records += [r for r in found if complete(r) or r.get("hung")]
        if done.returncode == 0:
            break
        print(f"slots {slots}: kvmlab run exited {done.returncode} after {len(found)} runs "
              f"(attempt {attempt}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return records


def measures(iterations: int, manual_protect: bool) -> list[tuple[str, str, int | None]]:
    """(name, record field, iteration index or None) of every compared figure; no clear
    without manual protect."""
    per_iteration = [(name, field) for name, field in PER_ITERATION if manual_protect or "clear" not in name]
    rows = [(name, field, None) for name, field in SINGLE]
    for index in range(iterations):
        rows += [(f"{name}, iteration {index + 1}", field, index) for name, field in per_iteration]
    return rows + [(name, field, None) for name, field in LAST]


def _value(record: dict, field: str, index: int | None) -> int | None:
    value = record.get(field)
    if index is None:
        return value
    return value[index] if value and len(value) > index else None


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def compare(records: list[dict], slot_counts: list[int], iterations: int,
            manual_protect: bool = True) -> list[dict]:
    """Per slot count and figure: each side's median and spread, and Python / C."""
    rows = []
    for slots in slot_counts:
        mine = [r for r in records if r["slots"] == slots and complete(r)]
        for name, field, index in measures(iterations, manual_protect):
            values = {impl: {r["run"]: _value(r, field, index) for r in mine if r["impl"] == impl}
                      for impl in ("upstream", "python")}
            values = {impl: {run: v for run, v in found.items() if v} for impl, found in values.items()}
            if not values["upstream"] or not values["python"]:
                rows.append({"slots": slots, "measure": name, "missing": True})
                continue
            upstream, python = list(values["upstream"].values()), list(values["python"].values())
            pairs = [values["python"][run] / values["upstream"][run]
                     for run in values["python"] if run in values["upstream"]]
            rows.append({"slots": slots, "measure": name,
                         "upstream_ns": statistics.median(upstream), "python_ns": statistics.median(python),
                         "ratio": statistics.median(python) / statistics.median(upstream),
                         "pair_ratio_min": min(pairs), "pair_ratio_max": max(pairs),
                         "upstream_spread": _spread(upstream), "python_spread": _spread(python),
                         "n": min(len(upstream), len(python))})
    return rows


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="debian:bookworm")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slots", default="1,64", help="memslot counts, one boot each (1,64)")
    parser.add_argument("--vcpus", type=int, default=1, help="L2 vCPUs (1)")
    parser.add_argument("--bytes", default="64M", help="memory per vCPU (64M)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("-g", dest="no_manual_protect", action="store_true",
                        help="both without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    parser.add_argument("--busy-wait", action="store_true",
                        help="the Python test's threads spin while they wait, as upstream's do")
    parser.add_argument("--deadline", type=int, default=900, help="guest seconds a run may take (900)")
    parser.add_argument("--clock", default="icount", help="guest clock (icount: instruction counts)")
    parser.add_argument("--cpus", type=int, default=1, help="L1 vCPUs (1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    slot_counts = [int(count) for count in args.slots.split(",")]
    machine = ["--clock", args.clock, "--cpus", str(args.cpus)]
    binary = upstream_selftests.build(("dirty_log_perf_test",))["dirty_log_perf_test"]
    records = [record for slots in slot_counts for record in run_block(args, binary, slots, machine)]
    rows = compare(records, slot_counts, args.iterations, not args.no_manual_protect)
    for hung in (r for r in records if r.get("hung")):
        print(f"HUNG: {hung['impl']} at {hung['slots']} slots, run {hung['run']}")
    print(f"kernel {args.kernel}, clock {args.clock}, {args.cpus} L1 vCPU(s); dirty_log_perf "
          f"{test_args(args, 0).replace(' -x 0', '')}{' --busy-wait' if args.busy_wait else ''}; "
          f"{args.runs} interleaved runs a side; medians")
    print("| slots | figure | upstream (C) | kselftest_py | Python / C | pair ratios | C spread | "
          "Python spread | n |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row.get("missing"):
            print(f"| {row['slots']} | {row['measure']} | – | – | missing | | | | 0 |")
            continue
        print(f"| {row['slots']} | {row['measure']} | {_ms(row['upstream_ns'])} | {_ms(row['python_ns'])} | "
              f"{row['ratio']:.2f} | {row['pair_ratio_min']:.2f}–{row['pair_ratio_max']:.2f} | "
              f"{row['upstream_spread']:.1%} | {row['python_spread']:.1%} | {row['n']} |")
    if args.json:
        args.json.write_text(json.dumps({"kernel": args.kernel, "args": vars(args) | {"json": str(args.json)},
                                         "records": records, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
