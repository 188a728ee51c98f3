"""Latency tables and plots from traced runs: ``kvmlab trace report DIR...``.

Each DIR is the results directory of a ``kvmlab run --trace`` (trace.dat and
capture.json). Calls are attributed to the test loops that made them
(``traces.segments``) and summarised per kernel × test × slot count × function:
calls, mean, p50, p90, p99 and max duration, and the share of the loop's time spent
in the function (summed over the test's threads, so two busy threads can reach 200 %).

What is timed is the traced function's whole body as function_graph sees it, plus
the tracer's own cost: every table carries the calibration of that kernel (what a
traced call costs extra, and the shortest duration the tracer reports) beside it.

With two kernels, the first DIR's kernel is the base: per test, slot count and
function, the ratio of mean durations patched / base with a bootstrap 95 % confidence
interval.

A run is named by the shortest end of its directory's path no other DIR shares, so
``a/results`` and ``b/results`` neither merge nor overwrite each other's calls table.
Damaged inputs are one-line errors; with ``partial`` a damaged trace.dat gives the
events before the damage, and a run with none is left out and named in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvmlab.errors import KvmlabError
from kvmlab.stats import bootstrap_ratio
from traces import profile as profiler
from traces import segments
from traces.calls import calls as calls_table
from traces.errors import TraceError, read_json
from traces.tracedat import TraceFile

KEYS = ["kernel", "test", "slots", "function"]


@dataclass(eq=False)  # a run is itself: two runs are never equal for their tables
class TracedRun:
    directory: Path
    kernel: str
    capture: dict
    calls: pd.DataFrame
    """Calls inside test loops, labelled with kernel, test, slots, run and loop_ns."""
    losses: list[str]
    """``TraceFile.describe_losses``: a line per CPU that lost events (empty: none did)."""
    damage: str | None = None
    """With ``partial``: what was wrong with trace.dat (the events after it are missing)."""
    profile_check: pd.DataFrame | None = None
    """With --trace-profile: the kernel's latency histograms against function_graph."""
    events_read: int = 0
    """Events read from trace.dat (with ``partial``: those before the damage)."""
    label: str = ""
    """What tells this run's directory from the others' (``distinct_labels``)."""

    def __post_init__(self):
        self.label = self.label or self.directory.name

    @property
    def unreadable(self) -> bool:
        """A damaged trace.dat that gave no event at all: nothing of this run can be reported."""
        return self.damage is not None and not self.events_read


def load_run(directory: Path, partial: bool = False) -> TracedRun:
    """A traced run's results; ``partial`` reads a damaged trace.dat up to the damage
    (``TraceFileError`` otherwise, naming the file and offset), and one that cannot be
    read at all as a run without events (``unreadable``)."""
    capture_path, trace_path = directory / "capture.json", directory / "trace.dat"
    for path in (capture_path, trace_path):
        if not path.exists():
            raise KvmlabError(f"{directory}: no {path.name} (not the results of a kvmlab run --trace)")
    capture = read_capture(capture_path)
    events, losses = read_trace(trace_path, partial)
    calls = calls_table(events)
    marked = segments.marks(events)
    loops = segments.intervals(marked, "loop")
    if loops.empty:  # a job without kselftest_py marks: the whole job is the "test"
        loops = segments.intervals(marked, "job").assign(test="job", slots=pd.NA, run=0)
    labelled = segments.assign(calls, loops).assign(kernel=capture["release"])
    capture.setdefault("calibration", {})["reported_floor_ns"] = tracer_floor(calls, marked)
    run = TracedRun(directory, capture["release"], capture, labelled, losses, events.attrs.get("damage"),
                    events_read=len(events))
    job = segments.window(marked, "job")
    if (directory / "latency_hist.json").exists() and job:
        run.profile_check = profiler.cross_check(profiler.read_hist(directory / "latency_hist.json"),
                                                 calls, job)
    return run


def read_capture(path: Path) -> dict:
    """capture.json, checked for what the report takes from it: a "release" string and,
    when there, a "calibration" object whose overhead is a number. KvmlabError naming
    the file and what is wrong otherwise (the capture writes it; a damaged one is a
    damaged run, not a reason for a traceback); TraceError if it cannot be read as JSON
    or is not a regular file (a FIFO would block the read for ever)."""
    capture = read_json(path)
    if not isinstance(capture, dict):
        raise KvmlabError(f"{path}: wants a JSON object, found {type(capture).__name__}")
    if "release" not in capture:
        raise KvmlabError(f"{path}: no 'release' (the guest kernel's release)")
    release = capture["release"]
    if not isinstance(release, str) or not release:
        raise KvmlabError(f"{path}: 'release' wants the kernel release as a string, found {release!r}")
    calibration = capture.get("calibration", {})
    if not isinstance(calibration, dict):
        raise KvmlabError(f"{path}: 'calibration' wants an object, found {type(calibration).__name__}")
    overhead = calibration.get("overhead_ns_per_call")
    if overhead is not None and (isinstance(overhead, bool) or not isinstance(overhead, (int, float))):
        raise KvmlabError(f"{path}: 'calibration.overhead_ns_per_call' wants a number, found {overhead!r}")
    return capture


def read_trace(path: Path, partial: bool) -> tuple[pd.DataFrame, list[str]]:
    """trace.dat's events and its lines of losses. With ``partial``, a damaged file gives
    what came before the damage, and one that gives nothing (damaged headers, not a
    trace file, not a file) an empty frame; its ``attrs["damage"]`` says why."""
    try:
        trace = TraceFile.open(path)
        events = trace.events(partial=partial)
    except TraceError as err:
        if not partial:
            raise
        events = pd.DataFrame(columns=["ts", "cpu", "pid", "comm", "system", "event"])
        events.attrs["damage"] = str(err)
        return events, []
    return events, [] if events.attrs.get("damage") else trace.describe_losses()


def tracer_floor(calls: pd.DataFrame, marked: pd.DataFrame) -> float | None:
    """The median duration function_graph reported for the calibration function (getppid's
    syscall, which does almost nothing) inside the capture's calibration marks.

    Matched by "getppid" in the name: kallsyms has several names at its address
    (``__do_sys_getppid``, ``__ia32_sys_getppid``...) and the trace shows one of them."""
    window = segments.window(marked, "calibration")
    if window is None:
        return None
    begin, end = window
    timed = calls[calls["function"].astype(str).str.contains("getppid")
                  & (calls["ts"] >= begin) & (calls["ts"] <= end)]
    return float(timed["duration_ns"].median()) if len(timed) else None


def distinct_labels(directories: list[Path]) -> list[str]:
    """Per directory, the shortest suffix of its path that no other directory's path ends
    in: ``a/results`` and ``b/results`` stay apart in the tables and the file names.
    KvmlabError for a directory given twice (its calls would count twice)."""
    paths = [directory.resolve() for directory in directories]
    for index, path in enumerate(paths):
        if path in paths[:index]:
            raise KvmlabError(f"the run directory {path} is given twice (its calls would count twice)")
    return [_distinct_suffix(path, [other for other in paths if other != path]) for path in paths]


def _distinct_suffix(path: Path, others: list[Path]) -> str:
    """The fewest trailing parts of ``path`` that none of ``others`` ends in."""
    parts = path.parts
    for length in range(1, len(parts) + 1):
        suffix = parts[-length:]
        if all(other.parts[-length:] != suffix for other in others):
            return "/".join(suffix).removeprefix("/")
    return str(path)


def calls_file(run: TracedRun, runs: list[TracedRun]) -> str:
    """The name of a run's calls table: from its label, made a file name; by position when
    two labels still give one name (``a/b`` and ``a-b``)."""
    def stem(label: str) -> str:
        return label.replace("/", "-") or "root"

    stems = [stem(other.label) for other in runs]
    mine = stem(run.label)
    if stems.count(mine) > 1:
        mine = f"{mine}-{runs.index(run) + 1}"
    return f"calls-{mine}.csv"


def distinct_kernels(runs: list[TracedRun]) -> None:
    """Two runs of one release (e.g. base and patched KVM modules) are told apart by label."""
    releases = [run.kernel for run in runs]
    for run in runs:
        if releases.count(run.kernel) > 1:
            run.kernel = f"{run.kernel} ({run.label})"
            run.calls = run.calls.assign(kernel=run.kernel)


def readable(runs: list[TracedRun]) -> list[TracedRun]:
    """The runs with something to report; KvmlabError, naming each trace.dat and what is
    wrong with it, when there is none: an empty table would look like a clean result."""
    kept = [run for run in runs if not run.unreadable]
    if not kept:
        damage = "; ".join(run.damage for run in runs)
        raise KvmlabError(f"nothing could be read from any trace.dat: {damage}")
    return kept


def damage_note(run: TracedRun) -> str:
    """What a damaged trace.dat leaves out of the tables, in a line."""
    if run.unreadable:
        return f"{run.damage}; nothing of this run is reported"
    return f"{run.damage}; reporting the events before it"


def summarize(runs: list[TracedRun]) -> pd.DataFrame:
    """One row per kernel × test × slots × function; ``attrs["damage"]`` has a
    ``damage_note`` per run read in part or not at all, so that every report says so."""
    table = _summary(runs)
    table.attrs["damage"] = [damage_note(run) for run in runs if run.damage]
    return table


def all_calls(runs: list[TracedRun]) -> pd.DataFrame:
    """The runs' calls in one table; runs without calls (a trace read in part, or not at
    all) add nothing, and with none at all the table is empty."""
    with_calls = [run.calls for run in runs if len(run.calls)]
    if not with_calls:
        return pd.DataFrame(columns=[*KEYS, "duration_ns"])
    return pd.concat(with_calls, ignore_index=True)


def _summary(runs: list[TracedRun]) -> pd.DataFrame:
    calls = all_calls(runs)
    if calls.empty:
        return pd.DataFrame(columns=[*KEYS, "calls"])
    loop_time = (calls.drop_duplicates(["kernel", "test", "slots", "run"])
                 .groupby(["kernel", "test", "slots"], dropna=False)["loop_ns"].sum())
    grouped = calls.groupby(KEYS, dropna=False)["duration_ns"]
    table = grouped.agg(calls="count", mean_ns="mean", max_ns="max", total_ns="sum")
    for quantile in (50, 90, 99):
        table[f"p{quantile}_ns"] = grouped.quantile(quantile / 100)
    table = table.reset_index()
    table["share_pct"] = [100 * total / loop_time.get((k, t, s), np.nan) for k, t, s, total in
                          zip(table["kernel"], table["test"], table["slots"], table["total_ns"], strict=True)]
    calibration = {run.kernel: run.capture.get("calibration", {}) for run in runs if len(run.calls)}
    table["tracer_overhead_ns"] = table["kernel"].map(lambda k: calibration[k].get("overhead_ns_per_call"))
    table["tracer_floor_ns"] = table["kernel"].map(lambda k: calibration[k].get("reported_floor_ns"))
    return table


def compare(runs: list[TracedRun]) -> pd.DataFrame:
    """Patched / base per test × slots × function, for the first two kernels given."""
    kernels = list(dict.fromkeys(run.kernel for run in runs))
    if len(kernels) < 2:
        return pd.DataFrame()
    base_kernel, patched_kernel = kernels[:2]
    calls = all_calls(runs)
    rows = []
    for (test, slots, function), group in calls.groupby(KEYS[1:], dropna=False):
        base = group.loc[group["kernel"] == base_kernel, "duration_ns"].to_numpy(dtype=float)
        patched = group.loc[group["kernel"] == patched_kernel, "duration_ns"].to_numpy(dtype=float)
        if len(base) < 2 or len(patched) < 2:
            continue
        ratio, low, high = bootstrap_ratio(base, patched)
        rows.append({"test": test, "slots": slots, "function": function, "base_calls": len(base),
                     "patched_calls": len(patched), "base_mean_ns": base.mean(),
                     "patched_mean_ns": patched.mean(), "ratio": ratio, "ci_low": low, "ci_high": high})
    table = pd.DataFrame(rows)
    table.attrs.update(base=base_kernel, patched=patched_kernel)
    return table


def markdown(summary: pd.DataFrame, comparison: pd.DataFrame) -> str:
    lines = ["Durations are whole function bodies as function_graph times them, tracer cost included "
             "(overhead: what tracing adds per call; floor: the shortest duration it reports).", ""]
    lines += ["| kernel | test | slots | function | calls | mean | p50 | p90 | p99 | max | share | "
              "tracer overhead / floor |", "|" + "---|" * 12]
    for row in summary.to_dict("records"):
        lines.append(
            f"| {row['kernel']} | {row['test']} | {_slots(row['slots'])} | {row['function']} | "
            f"{row['calls']} | "
            f"{_us(row['mean_ns'])} | {_us(row['p50_ns'])} | {_us(row['p90_ns'])} | {_us(row['p99_ns'])} | "
            f"{_us(row['max_ns'])} | {row['share_pct']:.1f} % | "
            f"{_us(row['tracer_overhead_ns'])} / {_us(row['tracer_floor_ns'])} |")
    notes = summary.attrs.get("damage", [])
    if notes:
        lines += ["", "Damaged traces:", "", *(f"- {note}" for note in notes)]
    if not comparison.empty:
        lines += ["", f"patched ({comparison.attrs['patched']}) / base ({comparison.attrs['base']}), "
                      "mean duration, bootstrap 95 % CI:", "",
                  "| test | slots | function | base | patched | ratio | 95 % CI |", "|" + "---|" * 7]
        for row in comparison.to_dict("records"):
            lines.append(f"| {row['test']} | {_slots(row['slots'])} | {row['function']} | "
                         f"{_us(row['base_mean_ns'])} | {_us(row['patched_mean_ns'])} | {row['ratio']:.2f} | "
                         f"{row['ci_low']:.2f}–{row['ci_high']:.2f} |")
    return "\n".join(lines)


def profile_markdown(run: TracedRun) -> str:
    """The kernel's histogram counts and means beside function_graph's, for one run."""
    where = run.kernel if run.label in run.kernel else f"{run.kernel} ({run.label})"
    lines = [f"kernel latency histograms (kprobes + hist triggers) vs function_graph, {where}, "
             "whole job:", "",
             "| function | hist hits | graph calls | hist mean | graph mean | hist / graph | hist dropped |",
             "|" + "---|" * 7]
    for row in run.profile_check.to_dict("records"):
        if not row["hits"] and not row["graph_calls"]:
            continue
        ratio = "–" if pd.isna(row["mean_ratio"]) else f"{row['mean_ratio']:.2f}"
        lines.append(f"| {row['function']} | {row['hits']} | {row['graph_calls']} | {_us(row['mean_ns'])} | "
                     f"{_us(row['graph_mean_ns'])} | {ratio} | {row['dropped']} |")
    return "\n".join(lines)


def plot(runs: list[TracedRun], out: Path) -> list[Path]:
    """Per function: the latency CDF and a histogram, one line per kernel × slot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = all_calls(runs)
    written = []
    for function, group in calls.groupby("function"):
        figure, (cdf, hist) = plt.subplots(1, 2, figsize=(11, 4))
        for (kernel, slots), series in group.groupby(["kernel", "slots"], dropna=False)["duration_ns"]:
            values = np.sort(series.to_numpy(dtype=float)) / 1000
            label = f"{kernel}, {_slots(slots)} slots"
            cdf.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
            hist.hist(values, bins=np.geomspace(max(values.min(), 1e-3), values.max() * 1.01, 50),
                      histtype="step", label=label)
        for axes, ylabel in ((cdf, "fraction of calls"), (hist, "calls")):
            axes.set_xscale("log")
            axes.set_xlabel(f"{function} duration (µs, tracer cost included)")
            axes.set_ylabel(ylabel)
        cdf.legend(fontsize="small")
        figure.tight_layout()
        path = out / f"latency-{function}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _us(ns) -> str:
    if ns is None or pd.isna(ns):
        return "–"
    return f"{ns / 1000:.2f} µs"


def _slots(slots) -> str:
    return "–" if slots is None or pd.isna(slots) else str(int(slots))
