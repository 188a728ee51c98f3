"""From the store's records to verdicts: per-cell statistics, complexity fits, exit code.

A cell's value per run is memslot_perf's time per iteration, as upstream reports it;
"slot setup" is the slot setup time of the runs of upstream's whole-area tests (move
active, move inactive, RW: upstream takes its "best slot setup time" from those), or of
every test when the matrix has none of them. The verdict statistics are
``kvmlab.stats.compare_cell``'s (benchstat's: medians, Mann-Whitney U, a threshold).

The complexity fit of slot setup is of the time per slot: setting up n slots is n
additions, each O(n) with the array and O(log n) with the trees, which is the scalable-memslots series'
claim in the classes the fit knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from kvmlab import stats
from kvmlab.qualify import matrix
from kvmlab.qualify.conditions import Conditions, from_records
from kvmlab.qualify.store import CONDITIONS

SLOT_SETUP = "slot setup"
EXIT_OK, EXIT_FAILED = 0, 1


@dataclass
class Cell:
    test: str
    slots: int
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
    test: str
    side: str
    fit: stats.ComplexityFit
    per_slot: bool


@dataclass
class Analysis:
    config: dict
    cells: list[Cell]
    fits: list[Fit]
    runs: pd.DataFrame
    problems: dict[str, list[dict]] = field(default_factory=dict)
    """Record kind → records: fail, crash, splat, invariant, skip."""
    conditions: Conditions | None = None
    """What each side ran with (None: made by hand, without records)."""

    @property
    def regressions(self) -> list[Cell]:
        return [cell for cell in self.cells if cell.verdict == stats.REGRESSED]

    @property
    def failures(self) -> list[str]:
        """What makes the qualification fail besides regressions, one line each."""
        lines = [
            f"{r['side']} {r['test']} @{r['slots']} run {r['run'] + 1}: test failed: {r['reason']}"
            for r in self.problems.get("fail", [])
        ]
        lines += [
            f"{r['side']}: guest kernel reported a {r['summary']}" for r in self.problems.get("splat", [])
        ]
        lines += [f"{r['side']}: {r['summary']}" for r in self.problems.get("invariant", [])]
        return lines

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.regressions or self.failures else EXIT_OK


def analyse(config: dict, records: list[dict]) -> Analysis:
    runs = pd.DataFrame(
        [r for r in records if r["kind"] == "run"],
        columns=["side", "test", "slots", "run", "iteration_ns", "slot_setup_ns", "iterations", "release"],
    )
    runs = runs.astype({"slots": int}) if len(runs) else runs
    problems: dict[str, list[dict]] = {}
    for record in records:
        if record["kind"] not in ("run", CONDITIONS):
            problems.setdefault(record["kind"], []).append(record)
    not_applicable = {(r["side"], r["test"], r["slots"]): r["reason"] for r in problems.get("skip", [])}
    failed = {(r["side"], r["test"], r["slots"]) for r in problems.get("fail", [])}
    cells = []
    for slots in config["slots"]:
        for test in config["tests"]:
            cells.append(_cell(runs, test, slots, "iteration_ns", not_applicable, failed, config))
        cells.append(_setup_cell(runs, slots, config, not_applicable, failed))
    return Analysis(config, cells, _fits(runs, config), runs, problems, from_records(records))


def setup_tests(config: dict) -> list[str]:
    """The tests whose runs give the slot setup time (see the module's docstring)."""
    whole = [test for test in config["tests"] if test in matrix.WHOLE_AREA]
    return whole or list(config["tests"])


def _values(runs: pd.DataFrame, side: str, tests: list[str], slots: int, column: str) -> list[float]:
    if runs.empty:
        return []
    chosen = runs[(runs["side"] == side) & runs["test"].isin(tests) & (runs["slots"] == slots)]
    return [float(v) for v in chosen[column].dropna()]


def _cell(runs, test, slots, column, not_applicable, failed, config, tests=None) -> Cell:
    tests = tests or [test]
    cell = Cell(
        test,
        slots,
        _values(runs, "base", tests, slots, column),
        _values(runs, "patched", tests, slots, column),
    )
    reasons = [
        f"{side}: {not_applicable[(side, t, slots)]}"
        for side in matrix.SIDES
        for t in tests
        if (side, t, slots) in not_applicable
    ]
    if any((side, t, slots) in failed for side in matrix.SIDES for t in tests):
        cell.note = "test failed (see below)"
    elif len(cell.base) >= 2 and len(cell.patched) >= 2:
        cell.comparison = stats.compare_cell(
            cell.base,
            cell.patched,
            threshold=config["threshold"],
            method=config.get("method", stats.MANN_WHITNEY),
        )
    elif reasons:
        cell.note = "n/a: " + "; ".join(dict.fromkeys(reasons))
    else:
        cell.note = f"too few runs to compare ({len(cell.base)} base, {len(cell.patched)} patched)"
        if column == "iteration_ns" and not runs.empty:
            zero = runs[(runs["test"] == test) & (runs["slots"] == slots) & runs["iteration_ns"].isna()]
            if len(zero):
                cell.note += f"; {len(zero)} runs finished no iteration in {config['seconds']} s"
    return cell


def _setup_cell(runs, slots, config, not_applicable, failed) -> Cell:
    tests = setup_tests(config)
    return _cell(runs, SLOT_SETUP, slots, "slot_setup_ns", not_applicable, failed, config, tests)


def _fits(runs: pd.DataFrame, config: dict) -> list[Fit]:
    """Per test (and slot setup, per slot) and kernel, over every run: the best growth class."""
    fits = []
    if runs.empty:
        return fits
    measures = [(test, [test], "iteration_ns", False) for test in config["tests"]]
    measures.append((SLOT_SETUP, setup_tests(config), "slot_setup_ns", True))
    for name, tests, column, per_slot in measures:
        for side in matrix.SIDES:
            chosen = runs[(runs["side"] == side) & runs["test"].isin(tests)].dropna(subset=[column])
            if chosen["slots"].nunique() < 3:
                continue
            slots = chosen["slots"].to_numpy(dtype=float)
            times = chosen[column].to_numpy(dtype=float)
            if per_slot:
                times = times / slots
            sized = name in matrix.SLOT_SIZED and chosen["slots"].nunique() >= 4
            fit = stats.complexity_fit(slots, times, *((1 / slots, "slot size") if sized else ()))
            fits.append(Fit(name, side, fit, per_slot))
    return fits
