"""One qualification from start to verdict: what ``kvmlab qualify`` does below its command line.

``create``, ``resume`` and ``start_shard`` check everything they can before anything
boots, resolve each kernel once and choose the accelerator, QEMU and clock once
(``Prepared``); ``run`` measures the matrix; ``report`` analyses the store and writes
the reports; ``merge`` puts a plan's shards back together. Each returns what it made,
and says what it is doing through ``say``; the command line parses and prints.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmlab import kernels, stats
from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel
from kvmlab.qualify import completion, matrix, plan, reference, workloads
from kvmlab.qualify import merge as merging
from kvmlab.qualify.config import SIDES, Config, Side
from kvmlab.qualify.driver import Driver, default_jobs
from kvmlab.qualify.records import RUN
from kvmlab.qualify.store import Store
from kvmlab.vm import boot, clock, runs
from traces.errors import TraceError

Say = Callable[[str], None]


@dataclass(frozen=True)
class Request:
    """What was asked of a qualification: a field left None takes its default (or, on a
    resume, what the qualification was started with)."""

    base: str | None = None
    patched: str | None = None
    workload: str | None = None
    tests: str | None = None
    points: str | None = None
    runs: int | None = None
    seconds: float | None = None
    setup_budget: float | None = None
    threshold: float | None = None
    clock: str | None = None
    cpus: int | None = None
    trace: str | None = None
    check_invariants: bool = False
    append: str = ""
    base_append: str | None = None
    patched_append: str | None = None
    reference: Path | None = None
    accel: str | None = None
    fresh_boot: bool = False

    def side_append(self, side: str) -> str | None:
        return self.base_append if side == "base" else self.patched_append


@dataclass(frozen=True)
class Prepared:
    """A qualification ready to run: its store, config, kernels and machine, each decided once."""

    store: Store
    config: Config
    kernels: dict[str, Kernel]
    machine: boot.Machine


@dataclass(frozen=True)
class Outcome:
    """A qualification's verdict and what was written for it."""

    analysis: object
    """The ``analysis.Analysis`` behind every report."""
    markdown: str
    written: object
    """``report.Written``: the report files and the plots."""

    @property
    def exit_code(self) -> int:
        return self.analysis.exit_code


@dataclass(frozen=True)
class Judging:
    """What a report may change without measuring anything: how the runs are judged,
    the figures shown beside them, and whether runs may be missing."""

    threshold: float | None = None
    reference: Path | None = None
    partial: bool = False

    def apply(self, config: Config, say: Say, what: str) -> Config:
        """``config`` judged as asked, each change said once (``what``: where it came from)."""
        if self.threshold is not None:
            check_threshold(self.threshold)
            if self.threshold != config.threshold:
                say(f"judging with --threshold {self.threshold:g} ({what} was made with "
                    f"{config.threshold:g})")
                config = config.with_(threshold=self.threshold)
        if self.reference is not None:
            config = config.with_(reference=reference.read(self.reference, config.workload))
        return config


# -- starting ---------------------------------------------------------------------------
def create(out: Path, request: Request, say: Say) -> Prepared:
    """A new qualification in ``out``; refused before anything is fetched if ``out`` holds one."""
    if out.exists() and not out.is_dir():
        raise KvmlabError(f"-o {out}: not a directory")
    Store.refuse_existing(out)
    config, resolved, machine = new_config(request, say)
    return Prepared(Store.create(out, config), config, resolved, machine)


def new_config(request: Request, say: Say) -> tuple[Config, dict[str, Kernel], boot.Machine]:
    """The config of a new qualification (or plan), its kernels and machine; every option
    is checked before QEMU or a kernel is fetched."""
    if not request.base or not request.patched:
        raise KvmlabError("kvmlab qualify needs --base SPEC and --patched SPEC (or --resume -o DIR)")
    if request.runs is not None and request.runs < 2:
        raise KvmlabError("--runs: a cell needs at least 2 runs per kernel")
    for option, value in (("--seconds", request.seconds), ("--setup-budget", request.setup_budget)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise KvmlabError(f"{option} wants a positive time")
    if request.threshold is not None:
        check_threshold(request.threshold)
    if request.cpus is not None and request.cpus < 1:
        raise KvmlabError("--cpus wants at least 1 vCPU")
    workload = workloads.get(request.workload or workloads.DEFAULT)
    tests, points = matrix.parse_tests(workload, request.tests), matrix.parse_points(workload, request.points)
    trace = trace_spec(request.trace)
    published = reference.read(request.reference, workload) if request.reference is not None else None
    machine = boot.Machine.choose(request.accel, request.clock)
    say(machine.describe())
    defaults = matrix.DEFAULTS[machine.clock.name]
    method = stats.WELCH_LOG if machine.clock.name == clock.ICOUNT else stats.MANN_WHITNEY
    runs_per_cell = defaults["runs"] if request.runs is None else request.runs
    if runs_per_cell < matrix.MIN_RUNS and method == stats.MANN_WHITNEY:
        say(f"warning: with {runs_per_cell} runs per kernel Mann-Whitney U cannot reach p < 0.05; "
            "every cell will read 'no significant change'")
    resolved, sides = {}, {}
    for side, spec in (("base", request.base), ("patched", request.patched)):
        kernel = resolved[side] = kernels.fetch(spec, debuginfo=request.check_invariants)
        sides[side] = Side(spec, kernel.pinned, kernel.release, kernel.version,
                           tuple(kernel.patches) if kernel.patches else None, request.side_append(side) or "")
    config = Config(
        **sides, workload_name=workload.name, tests=tuple(tests), points=tuple(points), runs=runs_per_cell,
        seconds=1.0 if request.seconds is None else request.seconds,
        threshold=defaults["threshold"] if request.threshold is None else request.threshold,
        clock=machine.clock.name, method=method, boot_per_round=machine.clock.name == clock.ICOUNT,
        cpus=defaults["cpus"] if request.cpus is None else request.cpus,
        emulator={"version": machine.emulator.version, "package": machine.emulator.package},
        cpu=machine.accel.cpu, accel=request.accel, append=request.append, trace=trace,
        check_invariants=request.check_invariants, reference=published, setup_budget=request.setup_budget,
        fresh_boot=request.fresh_boot, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return config, resolved, machine


def write_plan(out: Path, request: Request, shards: int, say: Say) -> dict:
    """A plan of the qualification ``request`` asks for, dealt into ``shards``, written to ``out``."""
    if out.exists():
        raise KvmlabError(f"-o {out}: already exists; a plan is written once")
    config, _, _ = new_config(request, say)
    return plan.write(out, config, shards)


def resume(out: Path, request: Request, say: Say) -> Prepared:
    """The qualification in ``out``, to finish, once every check passed: a refused resume
    changes nothing. What decides what is measured must be as it was started; a new
    ``threshold`` or ``reference`` only changes the judging, and is honoured."""
    store = Store.read(out)
    config = store.config
    workload = config.workload
    if request.threshold is not None:
        check_threshold(request.threshold)
    given = {
        "base": request.base and config.base.spec != request.base,
        "patched": request.patched and config.patched.spec != request.patched,
        "workload": request.workload and request.workload != workload.name,
        "tests": request.tests and matrix.parse_tests(workload, request.tests) != list(config.tests),
        "slots": request.points and matrix.parse_points(workload, request.points) != list(config.points),
        "runs": request.runs is not None and request.runs != config.runs,
        "seconds": request.seconds is not None and request.seconds != config.seconds,
        "setup-budget": request.setup_budget is not None and request.setup_budget != config.setup_budget,
        "clock": request.clock not in (None, "auto") and request.clock != config.clock,
        "cpus": request.cpus is not None and request.cpus != config.cpus,
        "trace": request.trace and trace_spec(request.trace) != config.trace,
        "check-invariants": request.check_invariants and not config.check_invariants,
        "append": request.append and request.append != config.append,
        **{f"{side}-append": request.side_append(side) is not None
           and request.side_append(side) != config.side(side).append for side in SIDES},
        "accel": request.accel not in (None, "auto") and request.accel != config.accel,
    }
    changed = [name for name, differs in given.items() if differs]
    if changed:
        raise KvmlabError(
            f"--resume: {', '.join('--' + n for n in changed)} differ from the qualification in "
            f"{out}; resume it as it was started, or give another -o"
        )
    if not (config.emulator or {}).get("version"):
        raise KvmlabError(
            f"--resume: {out} records no clock or QEMU (made by an older kvmlab); "
            "its runs cannot be combined with new ones: start a new qualification"
        )
    _refuse_foreign_records(store, config)  # every file read and checked before the host is asked
    machine = _same_machine(config, str(out), "--resume")
    config = Judging(request.threshold, request.reference).apply(
        config, say, f"{out}, whose {store.config_path.name} keeps it,")
    store = Store.open(out)
    return Prepared(store, config, _kernels(config), machine)


def start_shard(out: Path, plan_file: Path, shard: str, say: Say) -> Prepared:
    """A new shard directory, once this machine is seen to resolve the plan's kernels and QEMU."""
    k, n = plan.parse_shard(shard)
    if out.exists() and not out.is_dir():
        raise KvmlabError(f"-o {out}: not a directory")
    Store.refuse_existing(out)
    config = plan.shard_config(plan.read(plan_file), k, n)
    machine = _same_machine(config, f"plan {config.plan['id']}", "--shard")
    resolved = _kernels(config)
    for side in SIDES:
        plan.refuse_other_kernel(config, side, resolved[side])
    config = config.with_(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return Prepared(Store.create(out, config), config, resolved, machine)


# -- running and reporting ------------------------------------------------------------------
def run(prepared: Prepared, jobs: int | None, log) -> None:
    """Measure every run of the matrix not measured yet, recording each as it ends."""
    config, store = prepared.config, prepared.store
    options = {
        "accel": config.accel, "clock": config.clock,
        "cpus": config.cpus or matrix.DEFAULTS[config.clock]["cpus"],
        "labels": {runs.QUALIFY: runs.owner(store.directory)},
    }
    if config.trace:
        options["files"] = boot.trace_files(config.trace)
    options_by_side = {side: {**options, "append": config.kernel_arguments(side)} for side in SIDES}
    lanes = default_jobs(config.clock) if jobs is None else jobs
    Driver(store, prepared.kernels, options_by_side, check_invariants=config.check_invariants, jobs=lanes,
           log=log, machine=prepared.machine).run()


def report(store: Store, config: Config, say: Say, directory: Path | None = None,
           records: list[dict] | None = None) -> Outcome:
    """Analyse the store and write every report beside it (or into ``directory``);
    ``records``: the store's, when the caller has read them already."""
    from kvmlab.qualify import analysis
    from kvmlab.qualify import report as reports

    result = analysis.analyse(config, store.records() if records is None else records)
    traced = traced_runs(store, config, say) if config.trace else None
    written = reports.write_all(result, directory or store.directory, traced)
    return Outcome(result, reports.markdown(result, traced), written)


def shard_runs(store: Store) -> int:
    return sum(1 for record in store.records() if record["kind"] == RUN)


def merge(directories: list[Path], out: Path, judging: Judging, say: Say) -> Outcome:
    """The shards of one plan merged into ``out`` with its reports, all or nothing.
    OUT's qualify.json keeps the threshold and reference it was judged with."""
    shards = merging.read_shards(directories, judging.partial)
    config = judging.apply(shards.config, say, f"plan {shards.config.merged['plan']}")
    shards = merging.Shards(config, shards.shards)
    if shards.missing:
        say(f"warning: --partial: {shards.missing} runs of the plan were never measured; "
            "the verdict says so and the exit code is 3")
    return merging.merge(shards, out, lambda store, records: report(store, config, say, records=records))


def rereport(directory: Path, out: Path | None, judging: Judging, say: Say) -> Outcome:
    """The reports of the finished qualification in ``directory``, written anew into
    ``out`` (default: ``directory``) without measuring, and without its writer's lock:
    a read-only store can be reported elsewhere."""
    store = Store.read(directory, "to report")
    config = judging.apply(store.config, say, str(directory))
    records = store.records()
    left = completion.missing(config, records)
    if left and not judging.partial:
        raise KvmlabError(f"{directory} is unfinished: {completion.describe(config, left)}; finish it with "
                          f"kvmlab qualify --resume -o {directory}, or report it with --partial")
    target = out or directory
    if out is not None:
        if os.path.lexists(out) and not out.is_dir():
            raise KvmlabError(f"-o {out}: not a directory")
        out.mkdir(parents=True, exist_ok=True)
    return report(store, config, say, target, records)


def traced_runs(store: Store, config: Config, say: Say) -> list:
    """Every traced run's calls, labelled by side and spec (base first: it is the
    reference). A run whose trace files are damaged is named and left out: the
    measurements in the store stand without it."""
    from kvmlab import trace_report
    from kvmlab.qualify import report as reports

    traced, records, names = [], store.records(), reports.spec_names(config)
    axis = config.workload.axis.name
    for side in SIDES:
        for record in records:
            if record["kind"] == RUN and record["side"] == side and record.get("trace_dir"):
                try:
                    run_ = trace_report.load_run(store.directory / record["trace_dir"], partial=True)
                except (KvmlabError, TraceError) as err:
                    say(f"warning: trace of {side} {record['test']} @{record[axis]} run {record['run']} "
                        f"left out of the report: {err}")
                    continue
                run_.kernel = f"{side} {names[side]}"
                run_.calls = run_.calls.assign(kernel=run_.kernel)
                traced.append(run_)
    return traced


# -- checks ------------------------------------------------------------------------------
def check_threshold(threshold: float) -> None:
    if not 0 <= threshold < 1:  # also refuses nan
        raise KvmlabError("--threshold wants a fraction in [0, 1)")


def trace_spec(name: str | None) -> dict | None:
    if not name:
        return None
    from traces import probes

    return probes.load(name)


def _kernels(config: Config) -> dict[str, Kernel]:
    return {side: kernels.fetch(config.side(side).exact, debuginfo=config.check_invariants) for side in SIDES}


def _same_machine(config: Config, what: str, option: str) -> boot.Machine:
    """This host's machine, if it uses the QEMU ``config`` recorded: runs of two emulators
    do not combine."""
    machine = boot.Machine.choose(config.accel, config.clock)
    recorded = config.emulator or {}
    qemu = machine.emulator
    other_package = recorded.get("package") and qemu.package != recorded["package"]
    if qemu.version != recorded.get("version") or other_package:
        raise KvmlabError(
            f"{option}: {what} was measured under QEMU {recorded.get('version')} "
            f"({recorded.get('package') or 'KVMLAB_QEMU'}), this host would use {qemu.describe()}; "
            "runs of two emulators do not combine: use the same QEMU, or start anew"
        )
    return machine


def _refuse_foreign_records(store: Store, config: Config) -> None:
    """A damaged or doubled record, or one of a cell or run this qualification does not
    have, refuses the resume: its analysis would count runs it never asked for."""
    axis = config.workload.axis.name
    cells = {(test, point) for test in config.tests for point in config.points}
    for number, record in enumerate(store.records(), 1):
        outside = record["test"] is not None and (record["test"], record[axis]) not in cells
        if outside or (record["run"] is not None and not 0 <= record["run"] < config.runs):
            raise KvmlabError(f"{store.runs_path}:{number}: a {record['kind']} record of {record['test']} "
                              f"@{record[axis]} run {record['run']}, outside this qualification's matrix")
