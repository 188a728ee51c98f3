"""From the store's records to verdicts: per-cell statistics, complexity fits, exit code.

The rows are the workload's measures (``kselftest_py.workload.Measure``): each a metric
over the runs of some tests, compared per point (memslot_perf's: each test's time per
iteration, as upstream reports it, and the slot setup time of the runs of upstream's
whole-area tests). The verdict statistics are ``kvmlab.stats.compare_cell``'s
(benchstat's: medians, Mann-Whitney U or Welch's t on logs, a threshold), in the
direction the metric declares better.

A measure's complexity fit is of its value against the point, or of its value per
point (``Measure.per_point``: setting up n slots is n additions, each O(n) with the
array and O(log n) with the trees, which is the scalable-memslots series' claim in the
classes the fit knows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from kselftest_py.workload import Measure, Workload
from kvmlab import stats
from kvmlab.qualify import completion
from kvmlab.qualify.conditions import Conditions, from_records
from kvmlab.qualify.config import SIDES, Config
from kvmlab.qualify.records import CONDITIONS, FAIL, INVARIANT, RUN, SKIP, SPLAT

#: 3: runs of the matrix were never measured (a partial merge or report, asked for on
#: purpose); never 0, so that a CI job cannot pass on cells nobody measured.
EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE = 0, 1, 3


@dataclass
class Cell:
    """One measure at one point: both kernels' runs, compared."""

    measure: str
    point: int
    base: list[float]
    patched: list[float]
    comparison: stats.CellComparison | None = None
    note: str = ""
    """Why there is no comparison: n/a on a kernel, a failed test, too few runs."""

    @property
    def verdict(self) -> str:
        return self.comparison.verdict if self.comparison else "n/a"


@dataclass
class Fit:
    measure: str
    side: str
    fit: stats.ComplexityFit
    per_point: bool


@dataclass
class Analysis:
    config: Config
    workload: Workload
    cells: list[Cell]
    fits: list[Fit]
    runs: pd.DataFrame
    problems: dict[str, list[dict]] = field(default_factory=dict)
    """Record kind → records: fail, crash, splat, invariant, skip."""
    conditions: Conditions | None = None
    """What each side ran with (None: made by hand, without records)."""
    missing: int = 0
    """Runs of the matrix not done: neither measured, failed, n/a nor given up."""
    planned: int = 0
    """Runs the matrix asks for."""

    @property
    def regressions(self) -> list[Cell]:
        return [cell for cell in self.cells if cell.verdict == stats.REGRESSED]

    @property
    def failures(self) -> list[str]:
        """What makes the qualification fail besides regressions, one line each."""
        axis = self.workload.axis.name
        lines = [
            f"{r['side']} {r['test']} @{r[axis]} run {r['run'] + 1}: test failed: {r['reason']}"
            for r in self.problems.get(FAIL, [])
        ]
        lines += [
            f"{r['side']}: guest kernel reported a {r['summary']}" for r in self.problems.get(SPLAT, [])
        ]
        lines += [f"{r['side']}: {r['summary']}" for r in self.problems.get(INVARIANT, [])]
        return lines

    @property
    def exit_code(self) -> int:
        if self.regressions or self.failures:
            return EXIT_FAILED
        return EXIT_INCOMPLETE if self.missing else EXIT_OK


def analyse(config: Config, records: list[dict]) -> Analysis:
    workload = config.workload
    axis = workload.axis.name
    metrics = [metric.key for metric in workload.metrics]
    runs = pd.DataFrame(
        [r for r in records if r["kind"] == RUN],
        columns=["side", "test", axis, "run", *metrics, *workload.columns, "release"],
    )
    runs = runs.astype({axis: int}) if len(runs) else runs
    problems: dict[str, list[dict]] = {}
    for record in records:
        if record["kind"] not in (RUN, CONDITIONS):
            problems.setdefault(record["kind"], []).append(record)
    not_applicable = {(r["side"], r["test"], r[axis]): r["reason"] for r in problems.get(SKIP, [])}
    failed = {(r["side"], r["test"], r[axis]) for r in problems.get(FAIL, [])}
    measures = workload.measures(config.tests)
    cells = [_cell(runs, workload, measure, point, not_applicable, failed, config)
             for point in config.points for measure in measures]
    return Analysis(config, workload, cells, _fits(runs, workload, measures), runs, problems,
                    from_records(records), len(completion.missing(config, records)),
                    len(completion.items(config)))


def _values(runs: pd.DataFrame, side: str, measure: Measure, point: int, axis: str) -> list[float]:
    if runs.empty:
        return []
    chosen = runs[(runs["side"] == side) & runs["test"].isin(measure.tests) & (runs[axis] == point)]
    return [float(v) for v in chosen[measure.metric].dropna()]


def _cell(runs, workload: Workload, measure: Measure, point: int, not_applicable, failed, config) -> Cell:
    axis = workload.axis.name
    cell = Cell(measure.name, point, *(_values(runs, side, measure, point, axis) for side in SIDES))
    reasons = [
        f"{side}: {not_applicable[(side, t, point)]}"
        for side in SIDES
        for t in measure.tests
        if (side, t, point) in not_applicable
    ]
    if any((side, t, point) in failed for side in SIDES for t in measure.tests):
        cell.note = "test failed (see below)"
    elif len(cell.base) >= 2 and len(cell.patched) >= 2:
        cell.comparison = stats.compare_cell(
            cell.base,
            cell.patched,
            threshold=config.threshold,
            method=config.method,
            lower_is_better=workload.metric(measure.metric).lower_is_better,
        )
    elif reasons:
        cell.note = "n/a: " + "; ".join(dict.fromkeys(reasons))
    else:
        cell.note = f"too few runs to compare ({len(cell.base)} base, {len(cell.patched)} patched)"
        if not runs.empty:
            empty = runs[runs["test"].isin(measure.tests) & (runs[axis] == point)
                         & runs[measure.metric].isna()]
            if len(empty):
                cell.note += f"; {len(empty)} runs measured none in {config.seconds} s"
    return cell


def _fits(runs: pd.DataFrame, workload: Workload, measures: list[Measure]) -> list[Fit]:
    """Per measure and kernel, over every run: the best growth class against the point."""
    fits = []
    if runs.empty:
        return fits
    axis = workload.axis.name
    for measure in measures:
        for side in SIDES:
            chosen = runs[(runs["side"] == side) & runs["test"].isin(measure.tests)]
            chosen = chosen.dropna(subset=[measure.metric])
            if chosen[axis].nunique() < 3:
                continue
            points = chosen[axis].to_numpy(dtype=float)
            values = chosen[measure.metric].to_numpy(dtype=float)
            if measure.per_point:
                values = values / points
            sized = measure.point_sized and chosen[axis].nunique() >= 4
            fit = stats.complexity_fit(points, values, *((1 / points, "slot size") if sized else ()))
            fits.append(Fit(measure.name, side, fit, measure.per_point))
    return fits
