"""The qualification's report: Markdown in the shape of the scalable-memslots series' tables, HTML with plots,
JUnit XML and KTAP for CI systems, and the raw store as CSV.

The Markdown follows the tables kernel developers post (per slot count: Test, Before,
After, Improvement, with "None" where nothing significant changed) and adds what a
reviewer needs to trust them: the 95 % confidence interval of the change, the
Mann-Whitney p-value, the runs behind each cell, the complexity fits, and everything
that went wrong on the way (n/a cells, failed runs, guest crashes, kernel reports).

The reports name each side by its spec before its release (a kvm-modules A/B boots one
release on both sides), report.html shades each cell's row by its verdict, and the
files are written all or none, beside the store and never over it.
"""

from __future__ import annotations

import base64
import errno
import html
import json
import math
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kvmlab import stats
from kvmlab.errors import KvmlabError
from kvmlab.kernels.kvm_modules import SCHEME as KVM_MODULES
from kvmlab.qualify import matrix, reference
from kvmlab.qualify.analysis import SLOT_SETUP, Analysis, Cell, setup_tests

#: The growth the scalable-memslots cover letter (Linux 5.17) claims, before (array) and after (trees).
SERIES_CLAIM = {"base": ("n", "n log n"), "patched": ("constant", "log n")}
FAILED, NOT_APPLICABLE = "failed", "n/a"
REPORTS = ("report.md", "report.html", "junit.xml", "report.ktap", "runs.csv", "report.json")
#: Conditions report.md always shows, whether or not the sides differ in them; every
#: other row there is a difference (report.html and report.json have them all).
KEY_CONDITIONS = ("kvm.tdp_mmu", "kvm_amd.npt", "kvm_intel.ept", "cpu.model", "cpu.virt_flags",
                  "l1.vcpus", "l1.memory_mib")
PLOTS = "plots"


def write_all(analysis: Analysis, directory: Path, traced: list | None = None) -> list[Path]:
    """Every report file into ``directory``; returns their paths (the reports, then the plots).

    The files are made in a scratch directory inside ``directory`` and moved into place
    only once every one of them is whole. A full disk, a read-only file system or a
    ``plots`` that is not a directory thus ends in one KvmlabError naming the path, and
    leaves the store and the reports of an earlier write as they were.
    """
    _make_plots_directory(directory / PLOTS)
    with _scratch(directory) as scratch:
        staged = _render(analysis, traced, scratch, directory)
        return _publish(staged)


def _render(analysis: Analysis, traced: list | None, scratch: Path, directory: Path) -> dict[Path, Path]:
    """Every report file written into ``scratch``: final path → staged path."""
    with _reporting_errors(directory / PLOTS):
        plots = plot(analysis, scratch / PLOTS)
        if traced:
            plots += trace_plots(traced, scratch / PLOTS)
    texts = (
        markdown(analysis, traced) + "\n",
        html_report(analysis, plots, traced),
        junit(analysis),
        ktap(analysis),
        analysis.runs.to_csv(index=False),
        json_report(analysis),
    )
    staged = {}
    for name, text in zip(REPORTS, texts, strict=True):
        with _reporting_errors(directory / name):
            _write_durably(scratch / name, text)
        staged[directory / name] = scratch / name
    return staged | {directory / PLOTS / path.name: path for path in plots}


def _publish(staged: dict[Path, Path]) -> list[Path]:
    """Rename the staged files over the old ones: a rename replaces a file whole or not at all.

    What could stop a rename halfway through the set (a directory, or anything but a file,
    where a report goes) is looked for first, so the reports change all together or not."""
    for final in staged:
        if final.is_symlink() or (final.exists() and not final.is_file()):
            with _reporting_errors(final):
                raise IsADirectoryError(errno.EISDIR, "not a regular file", str(final))
    for final, path in staged.items():
        with _reporting_errors(final):
            os.replace(path, final)
    return list(staged)


def _make_plots_directory(plots: Path) -> None:
    """``plots`` as a directory, made now so that a file of that name fails before any rendering."""
    with _reporting_errors(plots):
        if plots.exists() and not plots.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(plots))
        plots.mkdir(exist_ok=True)


def _write_durably(path: Path, text: str) -> None:
    """Write and fsync, so that a full disk the page cache hid shows here, not after the rename."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def _scratch(directory: Path) -> Iterator[Path]:
    """A private directory beside the reports (same file system: renames, no copies), removed after."""
    with _reporting_errors(directory):
        scratch = Path(tempfile.mkdtemp(prefix=".reports-", dir=directory))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _reporting_errors(path: Path) -> Iterator[None]:
    """An OS error while writing ``path`` becomes one line: the path and what the OS said."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        raise KvmlabError(f"cannot write {path}: {reason} (the runs are kept; "
                          "--resume writes the reports again)") from None


# -- Markdown --------------------------------------------------------------------------
def markdown(analysis: Analysis, traced: list | None = None) -> str:
    config = analysis.config
    lines = [
        f"# kvmlab qualify: {config['patched']['spec']} against {config['base']['spec']}",
        "",
        f"Before: {kernel_label(config, 'base')}; after: {kernel_label(config, 'patched')}.",
        f"kselftest_py memslot_perf, {config['runs']} runs of {config['seconds']} s per kernel and cell, "
        f"interleaved; time per iteration (slot setup: per VM). {measured_by(config)} "
        f"Verdicts: {_method(config)} at α = 0.05 and "
        f'a {config["threshold"]:.0%} practical threshold; "None" is no significant change.',
        "",
    ]
    for slots in config["slots"]:
        lines += [
            f"{_slot_title(slots)} slots in use:",
            "",
            table_header(config),
            *[table_row(cell, config) for cell in analysis.cells if cell.slots == slots],
            "",
        ]
    lines += reference_summary(analysis)
    if traced:
        lines += trace_markdown(traced)
    lines += complexity_markdown(analysis)
    lines += conditions_markdown(analysis)
    lines += problems_markdown(analysis)
    lines += ["", verdict_line(analysis)]
    return "\n".join(lines)


def measured_by(config: dict) -> str:
    """The clock, emulator and L1 CPU behind every figure, in one sentence."""
    qemu = config.get("emulator") or {}
    clock = config.get("clock", "wall")
    meaning = (
        "icount (guest time counts emulated instructions, 1 ns each; not cache or memory effects)"
        if clock == "icount"
        else "wall (guest time is host time)"
    )
    rounds = ""
    if config.get("boot_per_round"):
        rounds = ("; each round in fresh boots" if config.get("fresh_boot") else
                  "; each round in guests restored from a boot of its own (one saved boot per kernel "
                  "and round)")
    return (
        f"Clock: {meaning}; QEMU {qemu.get('version', '?')} ({qemu.get('package') or 'KVMLAB_QEMU'}), "
        f"-cpu {config.get('cpu', '?')}, {config.get('cpus', 2)} L1 vCPU(s){rounds}."
    )


def _method(config: dict) -> str:
    if config.get("method") == stats.WELCH_LOG:
        return "Welch's t-test on log times (change: ratio of geometric means, t interval)"
    return "Mann-Whitney U (change: ratio of medians, bootstrap interval)"


def trace_markdown(traced: list) -> list[str]:
    """Per-function latencies of the traced runs, base against patched (kvmlab.trace_report's tables)."""
    from kvmlab import trace_report

    summary, comparison = trace_report.summarize(traced), trace_report.compare(traced)
    return ["Memslot work as ftrace timed it in these runs:", "",
            trace_report.markdown(summary, comparison), ""]


def table_header(config: dict | None = None) -> str:
    """The series' columns, ours, and with a ``--reference`` the published figures' two."""
    columns = ["Test", "Before", "After", "Improvement", "change, 95 % CI", "p", "runs"]
    if config and config.get("reference"):
        columns += ["published", "same direction"]
    return f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}"


def table_row(cell: Cell, config: dict | None = None) -> str:
    name = cell.test[0].upper() + cell.test[1:]
    comparison = cell.comparison
    published = _published_columns(cell, config) if config and config.get("reference") else ""
    if comparison is None:
        before = _seconds(np.median(cell.base)) if cell.base else "–"
        after = _seconds(np.median(cell.patched)) if cell.patched else "–"
        runs = f"{len(cell.base)}/{len(cell.patched)}"
        return f"| {name} | {before} | {after} | {cell.note} | | | {runs} |{published}"
    improvement = {
        stats.IMPROVED: f"{-comparison.change:.0%}",
        stats.REGRESSED: f"**{-comparison.change:.0%} (regressed)**",
    }.get(comparison.verdict, "None")
    return (
        f"| {name} | {_seconds(comparison.base_median)} | {_seconds(comparison.patched_median)} | "
        f"{improvement} | {comparison.change:+.1%} [{comparison.ci_low:+.1%}, {comparison.ci_high:+.1%}] | "
        f"{comparison.p_value:.3f} | {comparison.runs[0]}/{comparison.runs[1]} |{published}"
    )


def agreement(cell: Cell, config: dict) -> bool | None:
    """Whether the measured change points where the published one does (None: nothing to compare)."""
    row = reference.published(config, cell.test, cell.slots)
    if row is None or cell.comparison is None:
        return None
    measured = {stats.IMPROVED: reference.IMPROVED, stats.REGRESSED: reference.REGRESSED}.get(
        cell.comparison.verdict, reference.NONE)
    return measured == reference.direction(reference.change(row), config["threshold"])


def _published_columns(cell: Cell, config: dict) -> str:
    row = reference.published(config, cell.test, cell.slots)
    if row is None:
        return " – | |"
    agrees = agreement(cell, config)
    words = "–" if agrees is None else "yes" if agrees else "**no**"
    return f" {-reference.change(row):.0%} | {words} |"


def reference_summary(analysis: Analysis) -> list[str]:
    """One line: in how many cells the measured direction is the published one."""
    config = analysis.config
    if not config.get("reference"):
        return []
    verdicts = [agreement(cell, config) for cell in analysis.cells]
    compared = [v for v in verdicts if v is not None]
    sources = sorted({row["source"] for row in config["reference"]["rows"]})
    return [f"Published figures ({config['reference']['file']}: {'; '.join(sources)}): the measured change "
            f"goes the published way in {sum(compared)} of {len(compared)} cells compared "
            f"(a change within the {config['threshold']:.0%} threshold counts as none; "
            f"{len(verdicts) - len(compared)} cells without a published figure or a comparison).", ""]


def complexity_markdown(analysis: Analysis) -> list[str]:
    if not analysis.fits:
        return ["Complexity fit: needs at least three slot counts per kernel.", ""]
    lines = [
        "Complexity (time against slot count, fitted as a + b·f(n), best by AIC; R² of the best; "
        "slot setup per slot; a move's time also against its slot's size, which the test shrinks as 1/n; "
        f"classes within {stats.AIC_TIE:g} of the best AIC are undecided). The scalable-memslots series "
        "(Linux 5.17) claims O(n) before and O(log n) after:",
        "",
        "| Test | Before | After | agrees with the series |",
        "|---|---|---|---|",
    ]
    by_test: dict[str, dict] = {}
    for fit in analysis.fits:
        by_test.setdefault(fit.test, {})[fit.side] = fit
    answers = []
    for test, sides in by_test.items():
        cells = [_fit_cell(sides[s].fit) if s in sides else "–" for s in matrix.SIDES]
        answer = _agreement(sides) if len(sides) == 2 else "no"
        answers.append(answer)
        name = f"{test} (per slot)" if test == SLOT_SETUP else test
        if any(fit.fit.covariate for fit in sides.values()):
            name += " (+ slot size)"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {answer} |")
    lines += ["", f"The fits agree with the series on {answers.count('yes')} of {len(answers)} rows "
              f"({answers.count(CANNOT_TELL)} where the fit cannot tell the classes apart)."]
    return lines + [""]


CANNOT_TELL = "cannot tell"


def _fit_cell(fit: stats.ComplexityFit) -> str:
    if fit.tied:
        return f"{' or '.join([fit.best, *fit.tied])}, undecided (R² {fit.r_squared:.2f})"
    return f"{fit.best} (R² {fit.r_squared:.2f})"


def _agreement(sides: dict) -> str:
    """yes when every class the fit cannot rule out is one the series claims, on both sides;
    no when none is, on either; otherwise the fit cannot tell."""
    answers = set()
    for side, fit in sides.items():
        candidates = {fit.fit.best, *fit.fit.tied}
        claimed = candidates & set(SERIES_CLAIM[side])
        answers.add("yes" if claimed == candidates else "no" if not claimed else CANNOT_TELL)
    return "no" if "no" in answers else CANNOT_TELL if CANNOT_TELL in answers else "yes"


def problems_markdown(analysis: Analysis) -> list[str]:
    problems, lines = analysis.problems, []
    for record in problems.get("skip", []):
        lines.append(f"- n/a: {record['side']} {record['test']} @{record['slots']}: {record['reason']}")
    for line in analysis.failures:
        lines.append(f"- FAILED: {line}")
    for record in problems.get("crash", []):
        first = record["message"].splitlines()[0] if record["message"] else ""
        when = ("while idle" if record["run"] is None else
                f"during {record['side']} {record['test']} @{record['slots']} run {record['run'] + 1}")
        idle = f" ({record['side']})" if record["run"] is None else ""
        core = f" (vmcore: {record['vmcore']})" if record.get("vmcore") else ""
        lines.append(f"- guest {record['outcome']}{idle} {when} (boot {record['boot']}): "
                     f"{first.split('; console tail')[0]}{core}")
    checks = problems.get("checks", [])
    if checks:
        total = {side: sum(r["checks"] for r in checks if r["side"] == side) for side in matrix.SIDES}
        seen = max(r["max_slots"] for r in checks)
        lines.append(f"- memslot invariant checks: {total['base']} on base, {total['patched']} on patched "
                     f"(VMs of up to {seen} slots), "
                     f"{sum(r['violations'] for r in checks)} violations")
    if not lines:
        return ["Nothing went wrong: no n/a cells, failures, guest crashes or kernel reports."]
    return ["What else happened:", "", *dict.fromkeys(lines)]


def conditions_markdown(analysis: Analysis, every_row: bool = False) -> list[str]:
    """Each side's conditions side by side: the key ones and every difference (``every_row``: all)."""
    found = analysis.conditions
    if found is None or not found.recorded:
        missing = [side for side in matrix.SIDES if found is None or not found.boots[side]]
        return [f"Conditions: not recorded for {' and '.join(missing)} (no boot of it said, or the store "
                "predates kvmlab recording them).", ""]
    differing = {difference.name: difference for difference in found.differences}
    names = sorted(found.sides["base"].keys() | found.sides["patched"].keys())
    shown = [name for name in names if every_row or name in differing or name in KEY_CONDITIONS]
    lines = [
        f"Conditions, as the guests reported them ({found.boots['base']} base and "
        f"{found.boots['patched']} patched guests) and from each kernel's config; "
        + ("≠ marks a difference, ≠ **setting** one both sides have, set differently:" if differing
           else "the two sides differ in none of them:"),
        "",
        "| Condition | Before | After | |",
        "|---|---|---|---|",
    ]
    for name in shown:
        before, after = (found.sides[side].get(name) for side in matrix.SIDES)
        mark = "" if name not in differing else "≠ **setting**" if differing[name].setting else "≠"
        lines.append(f"| {name} | {_condition(before)} | {_condition(after)} | {mark} |")
    if len(shown) < len(names):
        lines.append(f"\n{len(names) - len(shown)} more conditions are the same on both sides "
                     "(report.html and report.json list them).")
    for side, varying in found.varies.items():
        lines.append(f"\n{side} boots did not all agree on: {', '.join(varying)} (first boot's shown).")
    return lines + [""]


def _condition(value: str | None) -> str:
    if value is None:
        return "–"
    return value.replace("|", "\\|") if value else '""'


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
    reasons = [
        f"{len(analysis.regressions)} regressed" if analysis.regressions else "",
        f"{len(analysis.failures)} failures" if analysis.failures else "",
    ]
    return f"Verdict: FAIL: {', '.join(filter(None, reasons))} ({summary}){warning}."


# -- plots and HTML ---------------------------------------------------------------------
def plot(analysis: Analysis, directory: Path) -> list[Path]:
    """Per test: time against slot count, log axes, every run and the medians, both kernels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, written = analysis.runs, []
    if runs.empty:
        return written
    directory.mkdir(parents=True, exist_ok=True)
    measures = [(test, [test], "iteration_ns") for test in analysis.config["tests"]]
    measures.append((SLOT_SETUP, setup_tests(analysis.config), "slot_setup_ns"))
    for name, tests, column in measures:
        figure, axes = plt.subplots(figsize=(6, 4))
        try:
            _draw_measure(axes, analysis, name, tests, column)
            figure.tight_layout()
            path = directory / f"{name.replace(' ', '-')}.png"
            figure.savefig(path, dpi=90)
        finally:
            plt.close(figure)  # also when the disk is full: a failed report leaks no figures
        written.append(path)
    return written


def _draw_measure(axes, analysis: Analysis, name: str, tests: list[str], column: str) -> None:
    runs = analysis.runs
    for side, colour in zip(matrix.SIDES, ("tab:red", "tab:blue"), strict=True):
        chosen = runs[(runs["side"] == side) & runs["test"].isin(tests)].dropna(subset=[column])
        if chosen.empty:
            continue
        axes.scatter(chosen["slots"], chosen[column] / 1e9, s=10, alpha=0.4, color=colour)
        medians = chosen.groupby("slots")[column].median()
        axes.plot(medians.index, medians.to_numpy() / 1e9, marker="o", color=colour,
                  label=legend_label(analysis.config, side))
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="memslots",
        ylabel="seconds",
        title=f"{name} ({'per VM' if name == SLOT_SETUP else 'per iteration'})",
    )
    axes.legend(fontsize="small")


def trace_plots(traced: list, directory: Path) -> list[Path]:
    from kvmlab import trace_report

    directory.mkdir(parents=True, exist_ok=True)
    return trace_report.plot(traced, directory)


def html_report(analysis: Analysis, plots: list[Path], traced: list | None) -> str:
    """A self-contained page: the Markdown's tables as HTML, the plots inlined."""
    config = analysis.config
    body = [
        f"<h1>kvmlab qualify: {html.escape(config['patched']['spec'])} against "
        f"{html.escape(config['base']['spec'])}</h1>",
        f"<p>Before: {html.escape(kernel_label(config, 'base'))}; "
        f"after: {html.escape(kernel_label(config, 'patched'))}. "
        f"{config['runs']} runs of {config['seconds']} s per kernel and cell, interleaved. "
        f"{html.escape(measured_by(config))}</p>",
        f"<p class='{'fail' if analysis.exit_code else 'pass'}'>"
        f"<b>{html.escape(verdict_line(analysis))}</b></p>",
        _verdict_legend(),
    ]
    for slots in config["slots"]:
        rows = [c for c in analysis.cells if c.slots == slots]
        body += [f"<h2>{_slot_title(slots)} slots in use</h2>", _cell_table(rows, config)]
    body += [f"<p>{html.escape(line)}</p>" for line in reference_summary(analysis) if line]
    complexity = complexity_markdown(analysis)
    if analysis.fits:
        body += [
            "<h2>Complexity</h2>",
            f"<p>{html.escape(complexity[0])}</p>",
            _html_table("\n".join(complexity[2:4]), [row for row in complexity[4:] if row.startswith("| ")]),
            *[f"<p>{html.escape(line)}</p>" for line in complexity[4:] if line.startswith("The fits")],
        ]
    conditions = conditions_markdown(analysis, every_row=True)
    body.append("<h2>Conditions</h2>")
    if len(conditions) > 4 and conditions[2].startswith("| Condition"):
        rows = [line for line in conditions[4:] if line.startswith("| ")]
        body += [f"<p>{html.escape(conditions[0])}</p>", _html_table(conditions[2], rows)]
        body += [f"<p>{html.escape(line.strip())}</p>" for line in conditions[4:] if line.startswith("\n")]
    else:
        body.append(f"<p>{html.escape(conditions[0])}</p>")
    body += ["<h2>What else happened</h2>", "<ul>"]
    body += [
        f"<li><pre>{html.escape(line.lstrip('- '))}</pre></li>"
        for line in problems_markdown(analysis)
        if line.startswith("- ")
    ] or ["<li>nothing</li>"]
    body.append("</ul>")
    if traced:
        body += ["<h2>Memslot lookup latency (traced runs)</h2>",
                 f"<pre>{html.escape(chr(10).join(trace_markdown(traced)))}</pre>"]
    body.append("<h2>Plots</h2>")
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        body.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;max-width:70em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}"
        + "".join(f".{css}{{background:{colour}}}" for css, colour in VERDICT_COLOURS.values())
        + f".fail{{background:{VERDICT_COLOURS[stats.REGRESSED][1]}}}"
        + f".pass{{background:{VERDICT_COLOURS[stats.IMPROVED][1]}}}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kvmlab qualify</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


#: Verdict → (CSS class, background) of a cell's row in report.html. The colour only
#: repeats what the row's Verdict column says, so a reader who cannot tell the colours
#: apart loses nothing.
VERDICT_COLOURS = {
    stats.REGRESSED: ("regressed", "#f4b6b0"),
    FAILED: ("failed", "#f9d4a0"),
    stats.IMPROVED: ("improved", "#c9e8c4"),
    stats.NO_CHANGE: ("unchanged", "#ffffff"),
    NOT_APPLICABLE: ("incomplete", "#e4e4e4"),
}


def _cell_verdict(cell: Cell) -> str:
    """The verdict a reader sees: the statistics' one, or why there is none (failed, n/a)."""
    if cell.comparison is not None:
        return cell.comparison.verdict
    return FAILED if cell.note.startswith("test failed") else NOT_APPLICABLE


def _cell_table(cells: list[Cell], config: dict) -> str:
    """A slot count's cells as the Markdown has them, plus a Verdict column, each row shaded by it."""
    header = table_header(config).splitlines()[0] + " Verdict |"
    rows = []
    for cell in cells:
        verdict = _cell_verdict(cell)
        css = VERDICT_COLOURS[verdict][0]
        words = f"**{verdict}**" if verdict in (stats.REGRESSED, FAILED) else verdict
        rows.append(_html_row(f"{table_row(cell, config)} {words} |", "td", css))
    return f"<table>{_html_row(header, 'th')}{''.join(rows)}</table>"


def _verdict_legend() -> str:
    swatches = " ".join(f"<span class='{css}'>&nbsp;{html.escape(verdict)}&nbsp;</span>"
                        for verdict, (css, _) in VERDICT_COLOURS.items())
    return f"<p>Rows are shaded by their verdict: {swatches}.</p>"


def _html_table(header: str, rows: Iterable[str]) -> str:
    body = "".join(_html_row(row, "td") for row in rows)
    return f"<table>{_html_row(header.splitlines()[0], 'th')}{body}</table>"


def _html_row(line: str, tag: str, css: str | None = None) -> str:
    """A Markdown table row as HTML; its **bold** stays bold."""
    cells = []
    for part in line.strip().strip("|").split("|"):
        text = part.strip()
        if len(text) > 4 and text.startswith("**") and text.endswith("**"):
            cells.append(f"<{tag}><strong>{html.escape(text[2:-2])}</strong></{tag}>")
        else:
            cells.append(f"<{tag}>{html.escape(text.replace('**', ''))}</{tag}>")
    attribute = f" class='{css}'" if css else ""
    return f"<tr{attribute}>{''.join(cells)}</tr>"


# -- CI formats ---------------------------------------------------------------------------
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """``text`` with the characters XML 1.0 cannot hold (a guest's colour codes, NULs) shown
    as ``\\xNN``: a fail reason comes from the guest's stderr."""
    return _NOT_XML.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def junit(analysis: Analysis) -> str:
    """One testcase per cell: a regression is a failure, a failed test an error, n/a skipped."""
    suite = ET.Element("testsuite", name="kvmlab.qualify")
    properties = ET.SubElement(suite, "properties")
    config = analysis.config
    for name, value in (
        ("clock", config.get("clock", "wall")),
        ("qemu", (config.get("emulator") or {}).get("version", "?")),
        ("cpu", config.get("cpu", "?")),
        ("vcpus", config.get("cpus", 2)),
        ("method", config.get("method", stats.MANN_WHITNEY)),
        ("threshold", config["threshold"]),
        ("before", kernel_label(config, "base")),
        ("after", kernel_label(config, "patched")),
    ):
        ET.SubElement(properties, "property", name=name, value=str(value))
    found = analysis.conditions
    if found is not None and found.recorded:
        ET.SubElement(properties, "property", name="conditions.differ", value=found.verdict_note())
        for side in matrix.SIDES:
            for name, value in sorted(found.sides[side].items()):
                ET.SubElement(properties, "property", name=f"conditions.{side}.{name}", value=value)
    failed_cells = {(r["test"], r["slots"]): r for r in analysis.problems.get("fail", [])}
    for cell in analysis.cells:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"memslots.{_slot_title(cell.slots)}",
            name=f"{cell.test} @{cell.slots} slots",
        )
        if cell.verdict == stats.REGRESSED:
            ET.SubElement(
                case,
                "failure",
                message=f"regressed by {cell.comparison.change:+.1%} (p = {cell.comparison.p_value:.3f})",
            )
        elif (cell.test, cell.slots) in failed_cells:
            ET.SubElement(case, "error", message=failed_cells[(cell.test, cell.slots)]["reason"][:500])
        elif cell.comparison is None:
            ET.SubElement(case, "skipped", message=cell.note)
        else:
            ET.SubElement(case, "system-out").text = table_row(cell)
    for number, line in enumerate(analysis.failures):
        if "test failed" not in line:
            ET.SubElement(
                ET.SubElement(suite, "testcase", classname="memslots.guest", name=f"guest {number + 1}"),
                "failure",
                message=line[:500],
            )
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", str(sum(c.find("error") is not None for c in cases)))
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    ET.indent(suite)
    body = _xml_text(ET.tostring(suite, encoding="unicode"))
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'


def ktap(analysis: Analysis) -> str:
    """KTAP: a test per cell, "not ok" on a regression or failure, SKIP for n/a."""
    guest_failures = [line for line in analysis.failures if "test failed" not in line]
    lines = ["KTAP version 1", f"1..{len(analysis.cells) + bool(guest_failures)}",
             f"# {measured_by(analysis.config)}"]
    for number, cell in enumerate(analysis.cells, 1):
        name = f"{cell.test.replace(' ', '_')}@{cell.slots}"
        if cell.comparison is None:
            status = "not ok" if cell.note.startswith("test failed") else "ok"
            directive = "" if status == "not ok" else f" # SKIP {cell.note}"
            lines.append(f"{status} {number} {name}{directive}")
            continue
        lines.append(
            f"# {name}: {cell.verdict}, change {cell.comparison.change:+.1%}, p {cell.comparison.p_value:.3f}"
        )
        lines.append(f"{'not ok' if cell.verdict == stats.REGRESSED else 'ok'} {number} {name}")
    if guest_failures:
        lines += [f"# {line}" for line in guest_failures]
        lines.append(f"not ok {len(analysis.cells) + 1} guest_kernel_health")
    return "\n".join(lines) + "\n"


def json_report(analysis: Analysis) -> str:
    """The verdict, every cell and the conditions, for a CI step that reads JSON."""
    def cell_json(cell: Cell) -> dict:
        comparison = cell.comparison
        figures = {} if comparison is None else {
            "base_median_ns": comparison.base_median, "patched_median_ns": comparison.patched_median,
            "change": comparison.change, "ci": [comparison.ci_low, comparison.ci_high],
            "p": comparison.p_value}
        row = reference.published(analysis.config, cell.test, cell.slots)
        if row is not None:
            figures["published"] = {**row, "change": reference.change(row),
                                    "same_direction": agreement(cell, analysis.config)}
        return {"test": cell.test, "slots": cell.slots, "verdict": _cell_verdict(cell), "note": cell.note,
                "runs": [len(cell.base), len(cell.patched)], **figures}

    found = analysis.conditions
    document = {
        "verdict": verdict_line(analysis),
        "exit_code": analysis.exit_code,
        "before": kernel_label(analysis.config, "base"),
        "after": kernel_label(analysis.config, "patched"),
        "measured_by": measured_by(analysis.config),
        "cells": [cell_json(cell) for cell in analysis.cells],
        "failures": analysis.failures,
        "conditions": found.to_json() if found is not None else None,
    }
    return json.dumps(document, indent=2, default=float) + "\n"


# -- formatting -----------------------------------------------------------------------------
def _seconds(ns: float) -> str:
    """Seconds with three significant digits, the style of the series' cover letter (0.0724s, 0.0000792s)."""
    if ns is None or not math.isfinite(ns):
        return "–"
    value = ns / 1e9
    return f"{value:.3g}s" if value >= 1e-4 else f"{value:.7f}".rstrip("0") + "s"


def _slot_title(slots: int) -> str:
    return "32k" if slots == 32764 else str(slots)


def kernel_label(config: dict, side: str) -> str:
    """A side as the text of the reports names it: its spec first, then release and patches.

    In a kvm-modules A/B both sides boot the same release, so only the spec (and the
    patch) tells which side is which."""
    arguments = matrix.kernel_arguments(config, side)
    details = "; ".join([config[side]["release"], *_patch_details(config[side]),
                         *([f"kernel arguments: {arguments}"] if arguments else [])])
    return f"{spec_names(config)[side]} ({details})"


def legend_label(config: dict, side: str) -> str:
    """A side as a plot's legend names it: before/after and the spec; release (and patch hash) below."""
    patches = config[side].get("patches") or []
    below = config[side]["release"]
    if len(patches) == 1:
        below += f", sha256 {patches[0]['sha256'][:12]}"
    elif patches:
        below += f", {len(patches)} patches"
    return f"{'before' if side == 'base' else 'after'}: {spec_names(config)[side]}\n{below}"


def spec_names(config: dict) -> dict[str, str]:
    """Each side's spec, a kvm-modules patch path cut to its name, unless that makes two specs one."""
    short = {side: _short_spec(config[side]["spec"]) for side in matrix.SIDES}
    if short["base"] == short["patched"] and config["base"]["spec"] != config["patched"]["spec"]:
        return {side: config[side]["spec"] for side in matrix.SIDES}
    return short


def _short_spec(spec: str) -> str:
    """``kvm-modules:debian:bookworm+/home/me/v2/fix.patch`` → ``kvm-modules:debian:bookworm+fix.patch``."""
    base, plus, patch = spec.partition("+")
    if not base.startswith(f"{KVM_MODULES}:") or not plus:
        return spec
    name = Path(patch).name or patch
    return f"{base}+{name}{'/' if patch.endswith('/') and not name.endswith('/') else ''}"


def _patch_details(side: dict) -> list[str]:
    """``name sha256 <12 hex>`` per patch, when the qualification recorded them (kvm-modules: specs)."""
    return [f"{p['name']} sha256 {p['sha256'][:12]}" for p in side.get("patches") or []]
