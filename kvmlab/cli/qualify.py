"""``kvmlab qualify``: set up or resume a qualification, run it, report, and exit with the verdict."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from kvmlab import kernels, stats
from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, matrix, report
from kvmlab.qualify.driver import CHECK_EVERY_S, Driver
from kvmlab.qualify.store import Store
from kvmlab.vm import accel, boot, clock, emulator
from traces.errors import TraceError


def add_parsers(sub) -> None:
    parser = sub.add_parser(
        "qualify",
        help="A/B: is the patched kernel faster or slower than its base at memslot work?",
        description="Boots both kernels, runs kselftest_py memslot_perf over a matrix of tests and slot "
        "counts with the two kernels' runs interleaved, and reports per-cell changes with "
        "confidence intervals and verdicts. Exit 0: no significant regression; 1: a regression, "
        "a failed test, a kernel splat or an invariant violation; 2: bad usage.",
    )
    parser.add_argument("--base", help="the kernel before the change (" + kernels.SPEC_HELP + ")")
    parser.add_argument("--patched", help="the kernel with the change")
    parser.add_argument("--slots", help=f"slot counts ({','.join(map(str, matrix.DEFAULT_SLOTS))})")
    parser.add_argument("--tests", help=f"memslot_perf tests ({','.join(matrix.TESTS)}; default all)")
    parser.add_argument(
        "--runs",
        type=int,
        help=f"runs per kernel and cell (icount: {matrix.DEFAULTS[clock.ICOUNT]['runs']}, each round in "
        f"fresh boots; wall: {matrix.DEFAULTS[clock.WALL]['runs']}, at least {matrix.MIN_RUNS} for "
        "Mann-Whitney U to reach p < 0.05)",
    )
    parser.add_argument("--seconds", type=float, help="seconds per run (1: enough iterations under TCG)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="smallest change that counts, as a fraction "
        f"(icount: {matrix.DEFAULTS[clock.ICOUNT]['threshold']}, "
        f"wall: {matrix.DEFAULTS[clock.WALL]['threshold']})",
    )
    parser.add_argument(
        "--clock",
        choices=["auto", *clock.CLOCKS],
        default=None,
        help="measurement clock (auto: icount under TCG, wall under KVM); see docs/qualify.md",
    )
    parser.add_argument(
        "--cpus", type=int, help="L1 guest vCPUs (icount: 1, which runs repeat within 1 %%; wall: 2)"
    )
    parser.add_argument(
        "--trace", metavar="SET", help="trace every run with probe set SET; latency CDFs in the report"
    )
    parser.add_argument(
        "--check-invariants",
        action="store_true",
        help=f"check the memslot invariants with drgn every {CHECK_EVERY_S:g} s of each run",
    )
    parser.add_argument(
        "--append",
        default="",
        metavar="ARGS",
        help="kernel command-line arguments for both guests, e.g. kvm.tdp_mmu=0",
    )
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default=None)
    parser.add_argument(
        "--resume", action="store_true", help="finish the qualification in DIR, skipping done runs"
    )
    parser.add_argument(
        "-o", "--out", type=Path, required=True, metavar="DIR", help="where the raw store and the reports go"
    )
    parser.set_defaults(func=qualify)


def qualify(args: argparse.Namespace) -> int:
    store = _resume(args) if args.resume else _create(args)
    config = store.config
    if args.resume and args.threshold is not None and args.threshold != config["threshold"]:
        print(f"kvmlab qualify: judging with --threshold {args.threshold:g} (the qualification was started "
              f"with {config['threshold']:g}; {store.config_path} keeps that)", file=sys.stderr)
        config = {**config, "threshold": args.threshold}
    kernels_by_side = {
        side: kernels.fetch(config[side]["exact"], debuginfo=config["check_invariants"])
        for side in matrix.SIDES
    }
    options = {
        "accel": config.get("accel"),
        "append": config.get("append", ""),
        "clock": config["clock"],
        "cpus": config["cpus"],
    }
    if config.get("trace"):
        options["files"] = boot.trace_files(config["trace"])
    Driver(store, kernels_by_side, options, check_invariants=config["check_invariants"]).run()
    result = analysis.analyse(config, store.records())
    traced = _traced_runs(store, config) if config.get("trace") else None
    written = report.write_all(result, store.directory, traced)
    print(report.markdown(result, traced))
    print(
        f"kvmlab qualify: wrote {', '.join(p.name for p in written[:5])} and {len(written) - 5} plots "
        f"to {store.directory}",
        file=sys.stderr,
    )
    return result.exit_code


def _create(args: argparse.Namespace) -> Store:
    if args.out.exists() and not args.out.is_dir():
        raise KvmlabError(f"-o {args.out}: not a directory")
    Store.refuse_existing(args.out)  # before anything is fetched
    if not args.base or not args.patched:
        raise KvmlabError("kvmlab qualify needs --base SPEC and --patched SPEC (or --resume -o DIR)")
    measured = _measurement(args)
    defaults = matrix.DEFAULTS[measured["clock"]]
    runs = defaults["runs"] if args.runs is None else args.runs
    seconds = 1.0 if args.seconds is None else args.seconds
    threshold = defaults["threshold"] if args.threshold is None else args.threshold
    cpus = defaults["cpus"] if args.cpus is None else args.cpus
    if runs < 2:
        raise KvmlabError("--runs: a cell needs at least 2 runs per kernel")
    if not (math.isfinite(seconds) and seconds > 0):
        raise KvmlabError("--seconds wants a positive time")
    _check_threshold(threshold)
    if cpus < 1:
        raise KvmlabError("--cpus wants at least 1 vCPU")
    tests, slots = matrix.parse_tests(args.tests), matrix.parse_slots(args.slots)
    trace = _trace_spec(args.trace)
    if runs < matrix.MIN_RUNS and measured["method"] == stats.MANN_WHITNEY:
        print(
            f"kvmlab qualify: warning: with {runs} runs per kernel Mann-Whitney U cannot reach p < 0.05; "
            "every cell will read 'no significant change'",
            file=sys.stderr,
        )
    sides = {}
    for side, spec in (("base", args.base), ("patched", args.patched)):
        kernel = kernels.fetch(spec, debuginfo=args.check_invariants)
        sides[side] = {"spec": spec, "exact": kernel.pinned, "release": kernel.release}
        if kernel.patches:
            sides[side]["patches"] = kernel.patches
    config = {
        **sides,
        "tests": tests,
        "slots": slots,
        "runs": runs,
        "seconds": seconds,
        "threshold": threshold,
        "cpus": cpus,
        **measured,
        "trace": trace,
        "check_invariants": args.check_invariants,
        "accel": args.accel,
        "append": args.append,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Store.create(args.out, config)


def _measurement(args: argparse.Namespace) -> dict:
    """The clock, emulator and CPU model a qualification measures with, and its statistic.

    Instruction counts compare only under the same QEMU and CPU model, so all three
    are recorded; icount's repeatable runs are compared by Welch's t on log times, wall
    clock runs by Mann-Whitney U (kvmlab.stats says why)."""
    chosen = accel.choose(args.accel)
    qemu = emulator.choose()
    measuring = clock.choose(args.clock, chosen, qemu, default=clock.ICOUNT)
    print(f"kvmlab qualify: {chosen.describe()}; {qemu.describe()}; {measuring.describe()}", file=sys.stderr)
    return {
        "clock": measuring.name,
        "method": stats.WELCH_LOG if measuring.name == clock.ICOUNT else stats.MANN_WHITNEY,
        "boot_per_round": measuring.name == clock.ICOUNT,
        "emulator": {"version": qemu.version, "package": qemu.package},
        "cpu": chosen.cpu,
    }


def _check_threshold(threshold: float) -> None:
    if not 0 <= threshold < 1:  # also refuses nan
        raise KvmlabError("--threshold wants a fraction in [0, 1)")


def _resume(args: argparse.Namespace) -> Store:
    """The store to finish, once every check passed; a refused resume changes nothing.

    Options that decide what is measured must be as the qualification was started;
    ``--threshold`` only changes the judging, so it is honoured."""
    store = Store.read(args.out)
    config = store.config
    if args.threshold is not None:
        _check_threshold(args.threshold)
    given = {
        "base": args.base and config["base"]["spec"] != args.base,
        "patched": args.patched and config["patched"]["spec"] != args.patched,
        "tests": args.tests and matrix.parse_tests(args.tests) != config["tests"],
        "slots": args.slots and matrix.parse_slots(args.slots) != config["slots"],
        "runs": args.runs is not None and args.runs != config["runs"],
        "seconds": args.seconds is not None and args.seconds != config["seconds"],
        "clock": args.clock not in (None, "auto") and args.clock != config.get("clock"),
        "cpus": args.cpus is not None and args.cpus != config.get("cpus"),
        "trace": args.trace and _trace_spec(args.trace) != config.get("trace"),
        "check-invariants": args.check_invariants and not config.get("check_invariants"),
        "append": args.append and args.append != config.get("append", ""),
        "accel": args.accel not in (None, "auto") and args.accel != config.get("accel"),
    }
    changed = [name for name, differs in given.items() if differs]
    if changed:
        raise KvmlabError(
            f"--resume: {', '.join('--' + n for n in changed)} differ from the qualification in "
            f"{args.out}; resume it as it was started, or give another -o"
        )
    recorded = config.get("emulator") or {}
    if "clock" not in config or not recorded.get("version"):
        raise KvmlabError(
            f"--resume: {args.out} records no clock or QEMU (made by an older kvmlab); "
            "its runs cannot be combined with new ones: start a new qualification"
        )
    qemu = emulator.choose()
    other_package = recorded.get("package") and qemu.package != recorded["package"]
    if qemu.version != recorded["version"] or other_package:
        raise KvmlabError(
            f"--resume: {args.out} was measured under QEMU {recorded['version']} "
            f"({recorded.get('package') or 'KVMLAB_QEMU'}), this host would use {qemu.describe()}; "
            "runs of two emulators do not combine: resume with the same QEMU, or start anew"
        )
    store.records()  # a damaged or doubled record refuses the resume before anything boots
    return Store.open(args.out)


def _trace_spec(name: str | None) -> dict | None:
    if not name:
        return None
    from traces import probes

    return probes.load(name)


def _traced_runs(store: Store, config: dict) -> list:
    """Every traced run's calls, labelled by side and spec (base first: it is the
    reference). A run whose trace files are damaged is named and left out: the
    measurements in the store stand without it."""
    from kvmlab import trace_report

    traced, records, names = [], store.records(), report.spec_names(config)
    for side in matrix.SIDES:
        for record in records:
            if record["kind"] == "run" and record["side"] == side and record.get("trace_dir"):
                try:
                    run = trace_report.load_run(store.directory / record["trace_dir"], partial=True)
                except (KvmlabError, TraceError) as err:
                    print(f"kvmlab qualify: warning: trace of {side} {record['test']} @{record['slots']} "
                          f"run {record['run']} left out of the report: {err}", file=sys.stderr)
                    continue
                run.kernel = f"{side} {names[side]}"
                run.calls = run.calls.assign(kernel=run.kernel)
                traced.append(run)
    return traced
