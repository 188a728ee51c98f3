"""``kvmlab qualify``: set up or resume a qualification, run it, report, and exit with the verdict.

The analysis and the reports (pandas, scipy, matplotlib) are imported when a report is
made: every other kvmlab command parses this verb's options and should not pay for them."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from kvmlab import kernels, stats
from kvmlab.errors import KvmlabError
from kvmlab.qualify import matrix, merge, plan, reference
from kvmlab.qualify.driver import CHECK_EVERY_S, Driver, default_jobs
from kvmlab.qualify.store import Store
from kvmlab.vm import accel, boot, clock, emulator, runs
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
        f"a boot of its own; wall: {matrix.DEFAULTS[clock.WALL]['runs']}, at least {matrix.MIN_RUNS} for "
        "Mann-Whitney U to reach p < 0.05)",
    )
    parser.add_argument("--seconds", type=float, help="seconds per run (1: enough iterations under TCG)")
    parser.add_argument(
        "--setup-budget", type=float, metavar="SECONDS",
        help="give up a run whose slot setup takes longer (guest time): that kernel's cell is n/a, with "
        "the setup rate it reached (the memslot array at 32k slots under TCG)",
    )
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
    for side in matrix.SIDES:
        parser.add_argument(
            f"--{side}-append", metavar="ARGS",
            help=f"kernel command-line arguments for the {side} guests only, after --append (qualify a "
            "module parameter on one kernel: --patched-append kvm.tdp_mmu=0)",
        )
    parser.add_argument(
        "--reference", type=Path, metavar="FILE",
        help="published figures to show beside the measured ones: a CSV of test,slots,before,after,source "
        "(seconds), or the name of one kvmlab ships (scalable-memslots-v5: the series' cover letter)",
    )
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], default=None)
    parser.add_argument(
        "--fresh-boot", action="store_true",
        help="boot every guest instead of restoring saved ones (templates: one boot per kernel, side "
        "and round, each restored by every row, and kept for later qualifications)",
    )
    parser.add_argument(
        "--jobs", type=int, metavar="N",
        help="lanes (pairs of guests) running at once (icount: one per host core, as memory allows; "
        "wall: 1, since parallel runs disturb each other's timing)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="finish the qualification in DIR, skipping done runs"
    )
    parser.add_argument("--plan", action="store_true",
                        help="write the plan of this qualification to -o PLAN instead of running it")
    parser.add_argument("--shards", type=int, default=1, metavar="N",
                        help="with --plan: deal the matrix's cells into N shards")
    parser.add_argument("--shard", metavar="K/N",
                        help="run shard K of the plan file given as the argument (1-based K)")
    parser.add_argument("operands", nargs="*", metavar="PLAN | merge DIR...",
                        help="the plan file of --shard; or 'merge' and the shard directories to "
                        "merge into -o")
    parser.add_argument(
        "-o", "--out", type=Path, required=True, metavar="DIR",
        help="where the raw store and the reports go (with --plan: the plan file)"
    )
    parser.set_defaults(func=qualify)


def qualify(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise KvmlabError("--jobs wants at least 1 lane")
    if args.operands[:1] == ["merge"]:
        return _merge(args)
    if args.plan:
        return _write_plan(args)
    if args.shard:
        store = _start_shard(args)
    elif args.operands:
        raise KvmlabError(f"qualify: unexpected {args.operands[0]!r} (a plan file goes with --shard K/N)")
    else:
        store = _resume(args) if args.resume else _create(args)
    config = store.config
    if args.resume and args.threshold is not None and args.threshold != config["threshold"]:
        print(f"kvmlab qualify: judging with --threshold {args.threshold:g} (the qualification was started "
              f"with {config['threshold']:g}; {store.config_path} keeps that)", file=sys.stderr)
        config = {**config, "threshold": args.threshold}
    if args.resume and args.reference is not None:
        config = {**config, "reference": reference.read(args.reference)}
    kernels_by_side = {
        side: kernels.fetch(config[side]["exact"], debuginfo=config.get("check_invariants", False))
        for side in matrix.SIDES
    }
    options = {
        "accel": config.get("accel"),
        "clock": config["clock"],
        "cpus": config.get("cpus") or matrix.DEFAULTS[config["clock"]]["cpus"],
        "labels": {runs.QUALIFY: runs.owner(store.directory)},
    }
    if config.get("trace"):
        options["files"] = boot.trace_files(config["trace"])
    options_by_side = {side: {**options, "append": matrix.kernel_arguments(config, side)}
                       for side in matrix.SIDES}
    jobs = default_jobs(config["clock"]) if args.jobs is None else args.jobs
    Driver(store, kernels_by_side, options_by_side, check_invariants=config.get("check_invariants", False),
           jobs=jobs).run()
    if config.get("plan"):
        return _shard_done(store, config)
    return _report(store, config)


def _report(store: Store, config: dict) -> int:
    """Analyse, write the reports, print the table, and return the verdict's exit code."""
    from kvmlab.qualify import analysis, report

    result = analysis.analyse(config, store.records())
    traced = _traced_runs(store, config) if config.get("trace") else None
    written = report.write_all(result, store.directory, traced)
    print(report.markdown(result, traced))
    reports = len(report.REPORTS)
    print(
        f"kvmlab qualify: wrote {', '.join(p.name for p in written[:reports])} and {len(written) - reports} "
        f"plots to {store.directory}",
        file=sys.stderr,
    )
    return result.exit_code


def _create(args: argparse.Namespace) -> Store:
    if args.out.exists() and not args.out.is_dir():
        raise KvmlabError(f"-o {args.out}: not a directory")
    Store.refuse_existing(args.out)  # before anything is fetched
    return Store.create(args.out, _new_config(args))


def _new_config(args: argparse.Namespace) -> dict:
    """What a new qualification records in its qualify.json (or a plan), from the options."""
    if not args.base or not args.patched:
        raise KvmlabError("kvmlab qualify needs --base SPEC and --patched SPEC (or --resume -o DIR)")
    # Every option is checked before QEMU or a kernel is fetched.
    if args.runs is not None and args.runs < 2:
        raise KvmlabError("--runs: a cell needs at least 2 runs per kernel")
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise KvmlabError("--seconds wants a positive time")
    if args.setup_budget is not None and not (math.isfinite(args.setup_budget) and args.setup_budget > 0):
        raise KvmlabError("--setup-budget wants a positive time")
    if args.threshold is not None:
        _check_threshold(args.threshold)
    if args.cpus is not None and args.cpus < 1:
        raise KvmlabError("--cpus wants at least 1 vCPU")
    tests, slots = matrix.parse_tests(args.tests), matrix.parse_slots(args.slots)
    trace = _trace_spec(args.trace)
    published = reference.read(args.reference) if args.reference is not None else None
    measured = _measurement(args)
    defaults = matrix.DEFAULTS[measured["clock"]]
    runs = defaults["runs"] if args.runs is None else args.runs
    seconds = 1.0 if args.seconds is None else args.seconds
    threshold = defaults["threshold"] if args.threshold is None else args.threshold
    cpus = defaults["cpus"] if args.cpus is None else args.cpus
    if runs < matrix.MIN_RUNS and measured["method"] == stats.MANN_WHITNEY:
        print(
            f"kvmlab qualify: warning: with {runs} runs per kernel Mann-Whitney U cannot reach p < 0.05; "
            "every cell will read 'no significant change'",
            file=sys.stderr,
        )
    sides = {}
    for side, spec in (("base", args.base), ("patched", args.patched)):
        kernel = kernels.fetch(spec, debuginfo=args.check_invariants)
        sides[side] = {"spec": spec, "exact": kernel.pinned, "release": kernel.release,
                       "version": kernel.version}
        if kernel.patches:
            sides[side]["patches"] = kernel.patches
        if getattr(args, f"{side}_append"):
            sides[side]["append"] = getattr(args, f"{side}_append")
    config = {
        **sides,
        "tests": tests,
        "slots": slots,
        "runs": runs,
        "seconds": seconds,
        **({"setup_budget": args.setup_budget} if args.setup_budget is not None else {}),
        **({"fresh_boot": True} if args.fresh_boot else {}),
        "threshold": threshold,
        "cpus": cpus,
        **measured,
        "trace": trace,
        "check_invariants": args.check_invariants,
        "accel": args.accel,
        "append": args.append,
        "reference": published,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return config


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


def _write_plan(args: argparse.Namespace) -> int:
    if args.resume or args.shard:
        raise KvmlabError("--plan writes a new plan: it takes neither --resume nor --shard")
    if args.out.exists():
        raise KvmlabError(f"-o {args.out}: already exists; a plan is written once")
    record = plan.write(args.out, _new_config(args), args.shards)
    sizes = ", ".join(str(len(cells)) for cells in record["cells"])
    print(f"kvmlab qualify: plan {record['id']}: {record['shards']} shards of {sizes} cells in {args.out}; "
          f"run each with: kvmlab qualify --shard K/{record['shards']} {args.out} -o DIR", file=sys.stderr)
    return 0


def _start_shard(args: argparse.Namespace) -> Store:
    """A new shard directory, once this machine is seen to resolve the plan's kernels and QEMU."""
    given = [name for name, value in (("--base", args.base), ("--patched", args.patched),
                                      ("--tests", args.tests), ("--slots", args.slots),
                                      ("--runs", args.runs), ("--seconds", args.seconds),
                                      ("--setup-budget", args.setup_budget),
                                      ("--clock", args.clock), ("--cpus", args.cpus), ("--trace", args.trace),
                                      ("--append", args.append), ("--base-append", args.base_append),
                                      ("--patched-append", args.patched_append), ("--resume", args.resume),
                                      ("--reference", args.reference),
                                      ("--check-invariants", args.check_invariants)) if value]
    if given:
        raise KvmlabError(f"--shard takes the whole qualification from its plan: drop {', '.join(given)}")
    if len(args.operands) != 1:
        raise KvmlabError("--shard K/N wants one plan file: kvmlab qualify --shard K/N PLAN -o DIR")
    k, n = plan.parse_shard(args.shard)
    if args.out.exists() and not args.out.is_dir():
        raise KvmlabError(f"-o {args.out}: not a directory")
    Store.refuse_existing(args.out)
    config = plan.shard_config(plan.read(Path(args.operands[0])), k, n)
    _refuse_other_emulator(config, f"plan {config['plan']['id']}")
    for side in matrix.SIDES:
        kernel = kernels.fetch(config[side]["exact"], debuginfo=config.get("check_invariants", False))
        plan.refuse_other_kernel(config, side, kernel)
    config["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return Store.create(args.out, config)


def _shard_done(store: Store, config: dict) -> int:
    shard = config["plan"]
    runs = sum(1 for record in store.records() if record["kind"] == "run")
    print(f"kvmlab qualify: shard {shard['shard']}/{shard['shards']} of plan {shard['id']} done: {runs} "
          f"runs in {store.directory}; when every shard is done: kvmlab qualify merge DIR... -o OUT",
          file=sys.stderr)
    return 0


def _merge(args: argparse.Namespace) -> int:
    if args.plan or args.shard or args.resume:
        raise KvmlabError("qualify merge takes only shard directories and -o OUT")
    published = reference.read(args.reference) if args.reference is not None else None
    store = merge.merge([Path(d) for d in args.operands[1:]], args.out)
    return _report(store, {**store.config, "reference": published} if published else store.config)


def _check_threshold(threshold: float) -> None:
    if not 0 <= threshold < 1:  # also refuses nan
        raise KvmlabError("--threshold wants a fraction in [0, 1)")


def _resume(args: argparse.Namespace) -> Store:
    """The store to finish, once every check passed; a refused resume changes nothing.

    Options that decide what is measured must be as the qualification was started;
    ``--threshold`` only changes the judging, so it is honoured."""
    store = Store.read(args.out)
    config = store.config
    unknown = [test for test in config["tests"] if test not in matrix.TEST_NAMES]
    if unknown:
        raise KvmlabError(f"{store.config_path} is damaged: unknown test {unknown[0]!r}")
    if args.threshold is not None:
        _check_threshold(args.threshold)
    given = {
        "base": args.base and config["base"]["spec"] != args.base,
        "patched": args.patched and config["patched"]["spec"] != args.patched,
        "tests": args.tests and matrix.parse_tests(args.tests) != config["tests"],
        "slots": args.slots and matrix.parse_slots(args.slots) != config["slots"],
        "runs": args.runs is not None and args.runs != config["runs"],
        "seconds": args.seconds is not None and args.seconds != config["seconds"],
        "setup-budget": args.setup_budget is not None and args.setup_budget != config.get("setup_budget"),
        "clock": args.clock not in (None, "auto") and args.clock != config.get("clock"),
        "cpus": args.cpus is not None and args.cpus != config.get("cpus"),
        "trace": args.trace and _trace_spec(args.trace) != config.get("trace"),
        "check-invariants": args.check_invariants and not config.get("check_invariants"),
        "append": args.append and args.append != config.get("append", ""),
        **{f"{side}-append": getattr(args, f"{side}_append") is not None
           and getattr(args, f"{side}_append") != config[side].get("append", "") for side in matrix.SIDES},
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
    _refuse_other_emulator(config, str(args.out), "--resume")
    _refuse_foreign_records(store, config)  # before anything boots
    return Store.open(args.out)


def _refuse_foreign_records(store: Store, config: dict) -> None:
    """A damaged or doubled record, or one of a cell or run this qualification does not
    have, refuses the resume: its analysis would count runs it never asked for."""
    cells = {(test, count) for test in config["tests"] for count in config["slots"]}
    for number, record in enumerate(store.records(), 1):
        outside = record["test"] is not None and (record["test"], record["slots"]) not in cells
        if outside or (record["run"] is not None and not 0 <= record["run"] < config["runs"]):
            raise KvmlabError(f"{store.runs_path}:{number}: a {record['kind']} record of {record['test']} "
                              f"@{record['slots']} run {record['run']}, outside this qualification's matrix")


def _refuse_other_emulator(config: dict, what: str, option: str = "--shard") -> None:
    """Runs of two emulators do not combine: this host must use the QEMU ``config`` recorded."""
    recorded = config.get("emulator") or {}
    qemu = emulator.choose()
    other_package = recorded.get("package") and qemu.package != recorded["package"]
    if qemu.version != recorded.get("version") or other_package:
        raise KvmlabError(
            f"{option}: {what} was measured under QEMU {recorded.get('version')} "
            f"({recorded.get('package') or 'KVMLAB_QEMU'}), this host would use {qemu.describe()}; "
            "runs of two emulators do not combine: use the same QEMU, or start anew"
        )


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
    from kvmlab.qualify import report

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
