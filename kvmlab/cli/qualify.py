"""``kvmlab qualify``: parse, call ``kvmlab.qualify.qualification``, print, exit with the verdict.

The analysis and the reports (pandas, scipy, matplotlib) are imported when a report is
made: every other kvmlab command parses this verb's options and should not pay for them."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kvmlab import kernels
from kvmlab.errors import KvmlabError, shown
from kvmlab.qualify import matrix, qualification, workloads
from kvmlab.qualify.config import MAX_CPUS, MAX_RUNS, MAX_SECONDS, MAX_SETUP_BUDGET
from kvmlab.qualify.driver import CHECK_EVERY_S
from kvmlab.vm import clock


def add_parsers(sub) -> None:
    parser = sub.add_parser(
        "qualify",
        help="A/B: is the patched kernel faster or slower than its base at memslot work?",
        description="Boots both kernels, runs a kselftest_py workload (memslot_perf by default) over a "
        "matrix of tests and slot counts with the two kernels' runs interleaved, and reports per-cell "
        "changes with confidence intervals and verdicts. Exit 0: no significant regression; 1: a "
        "regression, a failed test, a kernel splat or an invariant violation; 2: bad usage.",
    )
    known = [workloads.get(name) for name in workloads.names()]
    parser.add_argument(
        "--workload", choices=[w.name for w in known],
        help=f"the kselftest_py test to qualify on (default {workloads.DEFAULT}): "
        + "; ".join(f"{w.name}: {w.module}" for w in known),
    )
    parser.add_argument("--base", help="the kernel before the change (" + kernels.SPEC_HELP + ")")
    parser.add_argument("--patched", help="the kernel with the change")
    parser.add_argument("--slots", help="the points on the workload's axis, memslot counts for both ("
                        + "; ".join(f"{w.name}: {','.join(map(str, w.axis.defaults))}" for w in known) + ")")
    parser.add_argument("--tests", help="the workload's tests (default all; "
                        + "; ".join(f"{w.name}: {','.join(map(w.option, w.tests))}" for w in known) + ")")
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
    parser.add_argument("--shards", type=int, metavar="N",
                        help=f"with --plan: deal the matrix's cells into N shards (at most {MAX_SHARDS})")
    parser.add_argument("--shard", metavar="K/N",
                        help="run shard K of the plan file given as the argument (1-based K)")
    parser.add_argument(
        "--partial", action="store_true",
        help="with merge or report: accept runs never measured; the verdict counts them and the exit "
        "code is 3 (never 0)",
    )
    parser.add_argument("operands", nargs="*", metavar="PLAN | merge DIR... | report DIR",
                        help="the plan file of --shard; 'merge' and the shard directories to merge into -o; "
                        "or 'report' and a finished qualification to write the reports of anew (into -o, "
                        "default DIR), without measuring")
    parser.add_argument(
        "-o", "--out", type=Path, metavar="DIR",
        help="where the raw store and the reports go (with --plan: the plan file)"
    )
    parser.set_defaults(func=qualify, usage=usage)


#: Upper bounds of the count options (``config`` has those a qualify.json records).
MAX_JOBS = 64
MAX_SHARDS = 1000
#: Each option's name and its value when not given.
_OPTIONS = {"base": None, "patched": None, "workload": None, "tests": None, "slots": None, "runs": None,
            "seconds": None, "setup_budget": None, "threshold": None, "clock": None, "cpus": None,
            "trace": None, "check_invariants": False, "append": "", "base_append": None,
            "patched_append": None, "reference": None, "accel": None, "fresh_boot": False, "jobs": None,
            "resume": False, "plan": False, "shards": None, "shard": None, "partial": False}
#: What only judges the runs: merge and report take these, and nothing that measures.
_JUDGING = {"threshold", "reference", "partial"}


def usage(args: argparse.Namespace) -> str:
    """Which of qualify's forms ``args`` asks for, once every option is seen to do
    something there and every count is in bounds; refused in one line otherwise. Reads
    no file: the README's commands are checked with it (tests/unit/test_docs_commands.py)."""
    _check_bounds(args)
    form = args.operands[0] if args.operands[:1] in (["merge"], ["report"]) else \
        "plan" if args.plan else "shard" if args.shard else "resume" if args.resume else "new"
    if args.out is None and form != "report":
        raise KvmlabError("qualify needs -o DIR (where the store and reports go; with --plan, the plan file)")
    if form in ("merge", "report"):
        _refuse_options(args, _JUDGING, f"qualify {form} measures nothing")
        if form == "report" and len(args.operands) != 2:
            raise KvmlabError("qualify report wants one qualification directory: "
                              "kvmlab qualify report DIR [-o OUT]")
        return form
    if args.partial:
        raise KvmlabError("--partial goes with merge or report: a qualification that runs measures every run")
    if form == "plan":
        if args.resume or args.shard or args.jobs is not None:
            raise KvmlabError("--plan writes a new plan: it takes neither --resume, --shard nor --jobs")
    elif args.shards is not None:
        raise KvmlabError("--shards N goes with --plan: kvmlab qualify --plan ... --shards N -o PLAN")
    if form == "shard":
        _refuse_options(args, {"shard", "jobs"}, "--shard takes the whole qualification from its plan")
        if len(args.operands) != 1:
            raise KvmlabError("--shard K/N wants one plan file: kvmlab qualify --shard K/N PLAN -o DIR")
    elif args.operands:
        raise KvmlabError(f"qualify: unexpected {shown(args.operands[0])} (a plan file goes with "
                          "--shard K/N; or: merge DIR..., report DIR)")
    return form


def qualify(args: argparse.Namespace) -> int:
    form = usage(args)
    if form == "merge":
        outcome = qualification.merge([Path(d) for d in args.operands[1:]], args.out, _judging(args), _say)
        return _print(outcome, args.out)
    if form == "report":
        directory = Path(args.operands[1])
        outcome = qualification.rereport(directory, args.out, _judging(args), _say)
        return _print(outcome, args.out or directory)
    if form == "plan":
        return _write_plan(args)
    if form == "shard":
        prepared = qualification.start_shard(args.out, Path(args.operands[0]), args.shard, _say)
    elif form == "resume":
        prepared = qualification.resume(args.out, _request(args), _say)
    else:
        prepared = qualification.create(args.out, _request(args), _say)
    qualification.run(prepared, args.jobs, sys.stderr)
    if prepared.config.plan:
        shard = prepared.config.plan
        runs = qualification.shard_runs(prepared.store)
        _say(f"shard {shard['shard']}/{shard['shards']} of plan {shard['id']} done: {runs} runs in "
             f"{prepared.store.directory}; when every shard is done: kvmlab qualify merge DIR... -o OUT")
        return 0
    return _print(qualification.report(prepared.store, prepared.config, _say), prepared.store.directory)


def _request(args: argparse.Namespace) -> qualification.Request:
    return qualification.Request(
        base=args.base, patched=args.patched, workload=args.workload, tests=args.tests, points=args.slots,
        runs=args.runs, seconds=args.seconds, setup_budget=args.setup_budget, threshold=args.threshold,
        clock=args.clock, cpus=args.cpus, trace=args.trace, check_invariants=args.check_invariants,
        append=args.append, base_append=args.base_append, patched_append=args.patched_append,
        reference=args.reference, accel=args.accel, fresh_boot=args.fresh_boot,
    )


def _write_plan(args: argparse.Namespace) -> int:
    record = qualification.write_plan(args.out, _request(args), args.shards or 1, _say)
    sizes = ", ".join(str(len(cells)) for cells in record["cells"])
    _say(f"plan {record['id']}: {record['shards']} shards of {sizes} cells in {args.out}; "
         f"run each with: kvmlab qualify --shard K/{record['shards']} {args.out} -o DIR")
    return 0


def _judging(args: argparse.Namespace) -> qualification.Judging:
    return qualification.Judging(args.threshold, args.reference, args.partial)


def _refuse_options(args: argparse.Namespace, allowed, context: str) -> None:
    """Refuse, in one line, every option given that would do nothing here."""
    given = [name for name, default in _OPTIONS.items()
             if name not in allowed and getattr(args, name) != default]
    if given:
        names = ", ".join("--" + name.replace("_", "-") for name in given)
        takes = ", ".join("--" + name.replace("_", "-") for name in sorted(allowed))
        raise KvmlabError(f"{context} (it takes {takes}, beside its operands and -o): drop {names}")


def _check_bounds(args: argparse.Namespace) -> None:
    """Every count option within its stated bounds, before anything is read or fetched."""
    bounds = (("--runs", args.runs, 2, MAX_RUNS), ("--jobs", args.jobs, 1, MAX_JOBS),
              ("--cpus", args.cpus, 1, MAX_CPUS), ("--shards", args.shards, 1, MAX_SHARDS))
    for option, value, least, most in bounds:
        if value is not None and not least <= value <= most:
            raise KvmlabError(f"{option} wants {least} to {most}, got {value}")
    for option, value, most in (("--seconds", args.seconds, MAX_SECONDS),
                                ("--setup-budget", args.setup_budget, MAX_SETUP_BUDGET)):
        if value is not None and not (math.isfinite(value) and 0 < value <= most):
            raise KvmlabError(f"{option} wants a positive time of at most {most:g} s, got {value:g}")


def _print(outcome: qualification.Outcome, directory: Path) -> int:
    print(outcome.markdown)
    _say(f"wrote {outcome.written.describe()} to {directory}")
    return outcome.exit_code


def _say(text: str) -> None:
    print(f"kvmlab qualify: {text}", file=sys.stderr, flush=True)
