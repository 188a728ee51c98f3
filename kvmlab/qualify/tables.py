"""The report's tables and sentences, built once from the analysis; ``report`` renders
each format (Markdown, HTML, JUnit, KTAP, JSON) from these, never one format from another.

A table is a header and rows of cells; a cell is text, part of which may be strong
(``Text``): a regression, a disagreement with the published figures, a setting the two
sides have set differently. A row may carry the verdict it shows, which HTML shades.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmlab import stats
from kvmlab.qualify import reference
from kvmlab.qualify.analysis import Analysis, Cell
from kvmlab.qualify.config import ICOUNT, SIDES, Config
from kvmlab.qualify.records import CHECKS, CRASH, SKIP

FAILED, NOT_APPLICABLE = "failed", "n/a"
CANNOT_TELL = "cannot tell"
#: Conditions report.md always shows, whether or not the sides differ in them; every
#: other row there is a difference (report.html and report.json have them all).
KEY_CONDITIONS = ("kvm.tdp_mmu", "kvm_amd.npt", "kvm_intel.ept", "cpu.model", "cpu.virt_flags",
                  "l1.vcpus", "l1.memory_mib")


@dataclass(frozen=True)
class Text:
    """A cell's text: ``plain``, then ``strong`` shown strong."""

    plain: str = ""
    strong: str = ""


Value = str | Text


@dataclass(frozen=True)
class Row:
    cells: tuple[Value, ...]
    verdict: str | None = None
    """The verdict the row shows (HTML shades the row by it)."""


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Section:
    """A sentence, then a table (if any), then sentences after it."""

    intro: str
    table: Table | None = None
    notes: tuple[str, ...] = ()


# -- the cells ---------------------------------------------------------------------------
def cell_table(analysis: Analysis, point: int) -> Table:
    """One point's cells in the series' columns, ours, and with a reference the published two."""
    config = analysis.config
    return Table(_cell_header(config), tuple(cell_row(cell, config) for cell in analysis.cells
                                             if cell.point == point))


def _cell_header(config: Config | None) -> tuple[str, ...]:
    columns = ("Test", "Before", "After", "Improvement", "change, 95 % CI", "p", "runs")
    if config and config.reference:
        columns += ("published", "same direction")
    return columns


def cell_row(cell: Cell, config: Config | None = None) -> Row:
    name = cell.measure[0].upper() + cell.measure[1:]
    comparison = cell.comparison
    published = _published(cell, config) if config and config.reference else ()
    if comparison is None:
        before = seconds(np.median(cell.base)) if cell.base else "–"
        after = seconds(np.median(cell.patched)) if cell.patched else "–"
        runs = f"{len(cell.base)}/{len(cell.patched)}"
        return Row((name, before, after, cell.note, "", "", runs, *published), verdict_of(cell))
    improvement: Value = {
        stats.IMPROVED: f"{comparison.improvement:.0%}",
        stats.REGRESSED: Text(strong=f"{comparison.improvement:.0%} (regressed)"),
    }.get(comparison.verdict, "None")
    return Row((name, seconds(comparison.base_median), seconds(comparison.patched_median), improvement,
                f"{comparison.change:+.1%} [{comparison.ci_low:+.1%}, {comparison.ci_high:+.1%}]",
                f"{comparison.p_value:.3f}", f"{comparison.runs[0]}/{comparison.runs[1]}", *published),
               verdict_of(cell))


def verdict_of(cell: Cell) -> str:
    """The verdict a reader sees: the statistics' one, or why there is none (failed, n/a)."""
    if cell.comparison is not None:
        return cell.comparison.verdict
    return FAILED if cell.note.startswith("test failed") else NOT_APPLICABLE


def agreement(cell: Cell, config: Config) -> bool | None:
    """Whether the measured change points where the published one does (None: nothing to compare)."""
    row = reference.published(config, cell.measure, cell.point)
    if row is None or cell.comparison is None:
        return None
    measured = {stats.IMPROVED: reference.IMPROVED, stats.REGRESSED: reference.REGRESSED}.get(
        cell.comparison.verdict, reference.NONE)
    return measured == reference.direction(reference.change(row), config.threshold)


def _published(cell: Cell, config: Config) -> tuple[Value, ...]:
    row = reference.published(config, cell.measure, cell.point)
    if row is None:
        return ("–", "")
    agrees = agreement(cell, config)
    words: Value = "–" if agrees is None else "yes" if agrees else Text(strong="no")
    return (f"{-reference.change(row):.0%}", words)


def reference_summary(analysis: Analysis) -> str | None:
    """In how many cells the measured direction is the published one."""
    config = analysis.config
    if not config.reference:
        return None
    verdicts = [agreement(cell, config) for cell in analysis.cells]
    compared = [v for v in verdicts if v is not None]
    sources = sorted({row["source"] for row in config.reference["rows"]})
    return (f"Published figures ({config.reference['file']}: {'; '.join(sources)}): the measured change "
            f"goes the published way in {sum(compared)} of {len(compared)} cells compared "
            f"(a change within the {config.threshold:.0%} threshold counts as none; "
            f"{len(verdicts) - len(compared)} cells without a published figure or a comparison).")


# -- complexity --------------------------------------------------------------------------
def complexity(analysis: Analysis) -> Section:
    workload = analysis.workload
    claim, noun = workload.claim, workload.axis.noun
    if not analysis.fits:
        return Section(f"Complexity fit: needs at least three {noun} counts per kernel.")
    intro = (f"Complexity ({workload.complexity}; classes within {stats.AIC_TIE:g} of the best AIC are "
             f"undecided){f'. {claim.text}' if claim else ''}:")
    by_measure: dict[str, dict] = {}
    for fit in analysis.fits:
        by_measure.setdefault(fit.measure, {})[fit.side] = fit
    rows, answers = [], []
    for measure, sides in by_measure.items():
        cells = [_fit_cell(sides[s].fit) if s in sides else "–" for s in SIDES]
        name = f"{measure} (per {noun})" if any(fit.per_point for fit in sides.values()) else measure
        covariates = [fit.fit.covariate for fit in sides.values() if fit.fit.covariate]
        if covariates:
            name += f" (+ {covariates[0]})"
        if claim is None:
            rows.append(Row((name, *cells)))
            continue
        answer = _agreement(sides, claim) if len(sides) == 2 else "no"
        answers.append(answer)
        rows.append(Row((name, *cells, answer)))
    header = ("Test", "Before", "After", *(("agrees with the series",) if claim else ()))
    notes = (f"The fits agree with the series on {answers.count('yes')} of {len(answers)} rows "
             f"({answers.count(CANNOT_TELL)} where the fit cannot tell the classes apart).",) if claim else ()
    return Section(intro, Table(header, tuple(rows)), notes)


def _fit_cell(fit: stats.ComplexityFit) -> str:
    if fit.tied:
        return f"{' or '.join([fit.best, *fit.tied])}, undecided (R² {fit.r_squared:.2f})"
    return f"{fit.best} (R² {fit.r_squared:.2f})"


def _agreement(sides: dict, claim) -> str:
    """yes when every class the fit cannot rule out is one the series claims, on both sides;
    no when none is, on either; otherwise the fit cannot tell."""
    answers = set()
    for side, fit in sides.items():
        candidates = {fit.fit.best, *fit.fit.tied}
        claimed = candidates & set(getattr(claim, side))
        answers.add("yes" if claimed == candidates else "no" if not claimed else CANNOT_TELL)
    return "no" if "no" in answers else CANNOT_TELL if CANNOT_TELL in answers else "yes"


# -- conditions and problems -------------------------------------------------------------------
def conditions(analysis: Analysis, every_row: bool = False) -> Section:
    """Each side's conditions side by side: the key ones and every difference (``every_row``: all)."""
    found = analysis.conditions
    if found is None or not found.recorded:
        missing = [side for side in SIDES if found is None or not found.boots[side]]
        return Section(f"Conditions: not recorded for {' and '.join(missing)} (no boot of it said, or the "
                       "store predates kvmlab recording them).")
    differing = {difference.name: difference for difference in found.differences}
    names = sorted(found.sides["base"].keys() | found.sides["patched"].keys())
    shown = [name for name in names if every_row or name in differing or name in KEY_CONDITIONS]
    intro = (f"Conditions, as the guests reported them ({found.boots['base']} base and "
             f"{found.boots['patched']} patched boots; a template's guests ask once) "
             "and from each kernel's config; "
             + ("≠ marks a difference, ≠ **setting** one both sides have, set differently:" if differing
                else "the two sides differ in none of them:"))
    rows = []
    for name in shown:
        before, after = (found.sides[side].get(name) for side in SIDES)
        mark: Value = ""
        if name in differing:
            mark = Text("≠", "setting") if differing[name].setting else "≠"
        rows.append(Row((name, _condition(before), _condition(after), mark)))
    notes = []
    if len(shown) < len(names):
        notes.append(f"{len(names) - len(shown)} more conditions are the same on both sides "
                     "(report.html and report.json list them).")
    for side, varying in found.varies.items():
        notes.append(f"{side} boots did not all agree on: {', '.join(varying)} (first boot's shown).")
    return Section(intro, Table(("Condition", "Before", "After", ""), tuple(rows)), tuple(notes))


def _condition(value: str | None) -> str:
    if value is None:
        return "–"
    return value if value else '""'


def problems(analysis: Analysis) -> list[str]:
    """Everything that went wrong besides the verdicts, one item each (none: an empty list)."""
    found, items, axis = analysis.problems, [], analysis.workload.axis.name
    for record in found.get(SKIP, []):
        items.append(f"n/a: {record['side']} {record['test']} @{record[axis]}: {record['reason']}")
    for line in analysis.failures:
        items.append(f"FAILED: {line}")
    for record in found.get(CRASH, []):
        first = record["message"].splitlines()[0] if record["message"] else ""
        when = ("while idle" if record["run"] is None else
                f"during {record['side']} {record['test']} @{record[axis]} run {record['run'] + 1}")
        idle = f" ({record['side']})" if record["run"] is None else ""
        core = f" (vmcore: {record['vmcore']})" if record.get("vmcore") else ""
        items.append(f"guest {record['outcome']}{idle} {when} (boot {record.get('boot') or '?'}): "
                     f"{first.split('; console tail')[0]}{core}")
    checks = found.get(CHECKS, [])
    if checks:
        total = {side: sum(r["checks"] for r in checks if r["side"] == side) for side in SIDES}
        seen = max(r["max_slots"] for r in checks)
        items.append(f"memslot invariant checks: {total['base']} on base, {total['patched']} on patched "
                     f"(VMs of up to {seen} slots), {sum(r['violations'] for r in checks)} violations")
    return list(dict.fromkeys(items))


NOTHING_WENT_WRONG = "Nothing went wrong: no n/a cells, failures, guest crashes or kernel reports."


# -- sentences ---------------------------------------------------------------------------------
def verdict_line(analysis: Analysis) -> str:
    counts = {
        verdict: sum(cell.verdict == verdict for cell in analysis.cells)
        for verdict in (stats.IMPROVED, stats.REGRESSED, stats.NO_CHANGE, "n/a")
    }
    summary = ", ".join(f"{count} {verdict}" for verdict, count in counts.items() if count)
    note = analysis.conditions.verdict_note() if analysis.conditions else ""
    warning = f"; {note}" if note else ""
    if analysis.exit_code == 0:
        return f"Verdict: PASS ({summary}){warning}."
    missing = (f"{analysis.missing} of {analysis.planned} runs never measured (a partial result, "
               "asked for on purpose)" if analysis.missing else "")
    if not (analysis.regressions or analysis.failures):
        return f"Verdict: INCOMPLETE: {missing} ({summary}){warning}."
    reasons = [
        f"{len(analysis.regressions)} regressed" if analysis.regressions else "",
        f"{len(analysis.failures)} failures" if analysis.failures else "",
        missing,
    ]
    return f"Verdict: FAIL: {', '.join(filter(None, reasons))} ({summary}){warning}."


def measured_by(config: Config) -> str:
    """The clock, emulator and L1 CPU behind every figure, in one sentence."""
    qemu = config.emulator or {}
    meaning = (
        "icount (guest time counts emulated instructions, 1 ns each; not cache or memory effects)"
        if config.clock == ICOUNT
        else "wall (guest time is host time)"
    )
    rounds = ""
    if config.boot_per_round:
        rounds = ("; each round in fresh boots" if config.fresh_boot else
                  "; each round in guests restored from a boot of its own (one saved boot per kernel "
                  "and round)")
    return (
        f"Clock: {meaning}; QEMU {qemu.get('version', '?')} ({qemu.get('package') or 'KVMLAB_QEMU'}), "
        f"-cpu {config.cpu or '?'}, {vcpus(config)} L1 vCPU(s){rounds}."
    )


def method(config: Config) -> str:
    if config.method == stats.WELCH_LOG:
        return "Welch's t-test on log times (change: ratio of geometric means, t interval)"
    return "Mann-Whitney U (change: ratio of medians, bootstrap interval)"


def what_ran(analysis: Analysis) -> str:
    """The workload, the runs and the verdicts' method, in one paragraph."""
    config, workload = analysis.config, analysis.workload
    return (f"kselftest_py {workload.module.rpartition('.')[2]}, {config.runs} runs of "
            f"{workload.run_length(config.seconds)} per kernel and cell, interleaved; {workload.summary}. "
            f"{measured_by(config)} Verdicts: {method(config)} at α = 0.05 and "
            f'a {config.threshold:.0%} practical threshold; "None" is no significant change.')


def heading(analysis: Analysis, point: int) -> str:
    """A point's table heading: "32k slots in use"."""
    axis = analysis.workload.axis
    return axis.heading.format(axis.label(point))


def seconds(ns: float) -> str:
    """Seconds with three significant digits, the style of the series' cover letter (0.0724s, 0.0000792s)."""
    if ns is None or not np.isfinite(ns):
        return "–"
    value = ns / 1e9
    return f"{value:.3g}s" if value >= 1e-4 else f"{value:.7f}".rstrip("0") + "s"


def vcpus(config: Config) -> int:
    """The L1 vCPUs; 2 for a qualification that predates recording them (the wall clock's default)."""
    return config.cpus if config.cpus is not None else 2
