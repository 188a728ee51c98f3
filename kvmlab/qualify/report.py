"""The qualification's report: Markdown in the shape of the scalable-memslots series' tables, HTML with plots,
JUnit XML and KTAP for CI systems, and the raw store as CSV.

The Markdown follows the tables kernel developers post (per slot count: Test, Before,
After, Improvement, with "None" where nothing significant changed) and adds what a
reviewer needs to trust them: the 95 % confidence interval of the change, the
Mann-Whitney p-value, the runs behind each cell, the complexity fits, and everything
that went wrong on the way (n/a cells, failed runs, guest crashes, kernel reports).

The reports name each side by its spec before its release (a kvm-modules A/B boots one
release on both sides), report.html shades each cell's row by its verdict, and the
files are written all or none, beside the store and never over it. Every format is
rendered from the same tables and sentences (``tables``), built from the analysis.
"""

from __future__ import annotations

import base64
import errno
import html
import json
import os
import re
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmlab import stats
from kvmlab.errors import WriteFailed
from kvmlab.kernels.kvm_modules import SCHEME as KVM_MODULES
from kvmlab.qualify import reference, tables
from kvmlab.qualify.analysis import Analysis, Cell
from kvmlab.qualify.config import SIDES, Config, Side
from kvmlab.qualify.records import FAIL
from kvmlab.qualify.tables import FAILED, NOT_APPLICABLE, Section, Table, Text, measured_by, verdict_line

SCRATCH = ".reports-"
REPORTS = ("report.md", "report.html", "junit.xml", "report.ktap", "runs.csv", "report.json")
PLOTS = "plots"


@dataclass(frozen=True)
class Written:
    """What ``write_all`` wrote: the report files (``REPORTS``), then the plots."""

    reports: list[Path]
    plots: list[Path]

    def __iter__(self):
        return iter([*self.reports, *self.plots])

    def describe(self) -> str:
        return f"{', '.join(path.name for path in self.reports)} and {len(self.plots)} plots"


def write_all(analysis: Analysis, directory: Path, traced: list | None = None) -> Written:
    """Every report file into ``directory``; returns what it wrote.

    The files are made in a scratch directory inside ``directory`` and moved into place
    only once every one of them is whole. A full disk, a read-only file system or a
    ``plots`` that is not a directory thus ends in one KvmlabError naming the path, and
    leaves the store and the reports of an earlier write as they were.
    """
    _make_plots_directory(directory / PLOTS)
    with _scratch(directory) as scratch:
        staged = _render(analysis, traced, scratch, directory)
        published = _publish(staged)
    reports = [directory / name for name in REPORTS]
    return Written(reports, [path for path in published if path not in reports])


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
    """A private directory beside the reports (same file system: renames, no copies),
    removed after; those a kill left behind are removed first (``_remove_stale``)."""
    _remove_stale(directory)
    with _reporting_errors(directory):
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-", dir=directory))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_stale(directory: Path) -> None:
    """Scratch directories whose process is gone (named ``.reports-PID-…``), and those of
    a kvmlab that did not name its pid, once an hour old."""
    for path in directory.glob(f"{SCRATCH}*"):
        pid = path.name[len(SCRATCH):].partition("-")[0]
        try:
            stale = (not os.path.exists(f"/proc/{pid}") if pid.isdigit()
                     else time.time() - path.lstat().st_mtime > 3600)
        except OSError:
            continue
        if stale and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _reporting_errors(path: Path) -> Iterator[None]:
    """An OS error while writing ``path`` becomes one line: the path and what the OS said."""
    try:
        yield
    except OSError as err:
        raise WriteFailed(path, err.strerror or str(err), " (the runs are kept; kvmlab qualify report "
                          "DIR writes the reports again)") from None


# -- Markdown --------------------------------------------------------------------------
def markdown(analysis: Analysis, traced: list | None = None) -> str:
    config = analysis.config
    lines = [
        f"# kvmlab qualify: {config.patched.spec} against {config.base.spec}",
        "",
        f"Before: {kernel_label(config, 'base')}; after: {kernel_label(config, 'patched')}.",
        tables.what_ran(analysis),
        "",
    ]
    for point in config.points:
        table = tables.cell_table(analysis, point)
        lines += [f"{tables.heading(analysis, point)}:", "", *_markdown_table(table), ""]
    lines += reference_summary(analysis)
    if traced:
        lines += trace_markdown(traced)
    lines += complexity_markdown(analysis)
    lines += conditions_markdown(analysis)
    lines += problems_markdown(analysis)
    lines += ["", verdict_line(analysis)]
    return "\n".join(lines)


def trace_markdown(traced: list) -> list[str]:
    """Per-function latencies of the traced runs, base against patched (kvmlab.trace_report's tables)."""
    from kvmlab import trace_report

    summary, comparison = trace_report.summarize(traced), trace_report.compare(traced)
    return ["Memslot work as ftrace timed it in these runs:", "",
            trace_report.markdown(summary, comparison), ""]


def table_row(cell: Cell, config: Config | None = None) -> str:
    """One cell as report.md's row shows it."""
    return _markdown_row(tables.cell_row(cell, config).cells)


def reference_summary(analysis: Analysis) -> list[str]:
    line = tables.reference_summary(analysis)
    return [line, ""] if line else []


def complexity_markdown(analysis: Analysis) -> list[str]:
    return _markdown_section(tables.complexity(analysis), notes_apart=True)


def conditions_markdown(analysis: Analysis, every_row: bool = False) -> list[str]:
    """Each side's conditions side by side: the key ones and every difference (``every_row``: all)."""
    return _markdown_section(tables.conditions(analysis, every_row), notes_apart=False)


def problems_markdown(analysis: Analysis) -> list[str]:
    items = tables.problems(analysis)
    if not items:
        return [tables.NOTHING_WENT_WRONG]
    return ["What else happened:", "", *(f"- {item}" for item in items)]


def _markdown_section(section: Section, notes_apart: bool) -> list[str]:
    """A sentence, its table, and its notes: after a blank line (``notes_apart``), or each
    as a paragraph of its own right under the table."""
    if section.table is None:
        return [section.intro, ""]
    lines = [section.intro, "", *_markdown_table(section.table)]
    if notes_apart and section.notes:
        lines += ["", *section.notes]
    elif section.notes:
        lines += [f"\n{note}" for note in section.notes]
    return lines + [""]


def _markdown_table(table: Table) -> list[str]:
    return [_markdown_row(table.header), f"|{'---|' * len(table.header)}",
            *(_markdown_row(row.cells) for row in table.rows)]


def _markdown_row(cells) -> str:
    """``| a | b | |``: an empty cell is one space, as the series' tables have it."""
    return "|" + "|".join(f" {text} " if text else " " for text in map(_markdown_text, cells)) + "|"


def _markdown_text(value) -> str:
    if isinstance(value, Text):
        return f"{value.plain}{' ' if value.plain else ''}**{value.strong}**"
    return value.replace("|", "\\|")


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
    for measure in analysis.workload.measures(analysis.config.tests):
        figure, axes = plt.subplots(figsize=(6, 4))
        try:
            _draw_measure(axes, analysis, measure)
            figure.tight_layout()
            path = directory / f"{measure.name.replace(' ', '-').replace(':', '')}.png"
            figure.savefig(path, dpi=90)
        finally:
            plt.close(figure)  # also when the disk is full: a failed report leaks no figures
        written.append(path)
    return written


def _draw_measure(axes, analysis: Analysis, measure) -> None:
    runs, axis, column = analysis.runs, analysis.workload.axis, measure.metric
    for side, colour in zip(SIDES, ("tab:red", "tab:blue"), strict=True):
        chosen = runs[(runs["side"] == side) & runs["test"].isin(measure.tests)].dropna(subset=[column])
        if chosen.empty:
            continue
        axes.scatter(chosen[axis.name], chosen[column] / 1e9, s=10, alpha=0.4, color=colour)
        medians = chosen.groupby(axis.name)[column].median()
        axes.plot(medians.index, medians.to_numpy() / 1e9, marker="o", color=colour,
                  label=legend_label(analysis.config, side))
    axes.set(
        xscale="log",
        yscale="log",
        xlabel=axis.title,
        ylabel="seconds",
        title=f"{measure.name} ({analysis.workload.metric(column).per})",
    )
    axes.legend(fontsize="small")


def trace_plots(traced: list, directory: Path) -> list[Path]:
    from kvmlab import trace_report

    directory.mkdir(parents=True, exist_ok=True)
    return trace_report.plot(traced, directory)


def html_report(analysis: Analysis, plots: list[Path], traced: list | None) -> str:
    """A self-contained page: the tables report.md has (every condition), the plots inlined."""
    config = analysis.config
    body = [
        f"<h1>kvmlab qualify: {html.escape(config.patched.spec)} against "
        f"{html.escape(config.base.spec)}</h1>",
        f"<p>Before: {html.escape(kernel_label(config, 'base'))}; "
        f"after: {html.escape(kernel_label(config, 'patched'))}. "
        f"{html.escape(tables.what_ran(analysis))}</p>",
        f"<p class='{'fail' if analysis.exit_code else 'pass'}'>"
        f"<b>{html.escape(verdict_line(analysis))}</b></p>",
        _verdict_legend(),
    ]
    for point in config.points:
        body += [f"<h2>{html.escape(tables.heading(analysis, point))}</h2>",
                 _html_table(tables.cell_table(analysis, point), verdicts=True)]
    summary = tables.reference_summary(analysis)
    if summary:
        body.append(f"<p>{html.escape(summary)}</p>")
    complexity = tables.complexity(analysis)
    if complexity.table is not None:
        body += ["<h2>Complexity</h2>", *_html_section(complexity)]
    body += ["<h2>Conditions</h2>", *_html_section(tables.conditions(analysis, every_row=True))]
    body += ["<h2>What else happened</h2>", "<ul>"]
    body += [f"<li><pre>{html.escape(item)}</pre></li>" for item in tables.problems(analysis)] or \
        ["<li>nothing</li>"]
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


def _verdict_legend() -> str:
    swatches = " ".join(f"<span class='{css}'>&nbsp;{html.escape(verdict)}&nbsp;</span>"
                        for verdict, (css, _) in VERDICT_COLOURS.items())
    return f"<p>Rows are shaded by their verdict: {swatches}.</p>"


def _html_section(section: Section) -> list[str]:
    parts = [f"<p>{html.escape(section.intro)}</p>"]
    if section.table is not None:
        parts.append(_html_table(section.table))
    return parts + [f"<p>{html.escape(note)}</p>" for note in section.notes]


def _html_table(table: Table, verdicts: bool = False) -> str:
    """``table`` as HTML; with ``verdicts``, a Verdict column and each row shaded by it."""
    header = (*table.header, "Verdict") if verdicts else table.header
    rows = [_html_row(header, "th")]
    for row in table.rows:
        if verdicts:
            strong = row.verdict in (stats.REGRESSED, FAILED)
            words = Text(strong=row.verdict) if strong else row.verdict
            rows.append(_html_row((*row.cells, words), "td", VERDICT_COLOURS[row.verdict][0]))
        else:
            rows.append(_html_row(row.cells, "td"))
    return f"<table>{''.join(rows)}</table>"


def _html_row(cells, tag: str, css: str | None = None) -> str:
    attribute = f" class='{css}'" if css else ""
    return f"<tr{attribute}>{''.join(f'<{tag}>{_html_text(value)}</{tag}>' for value in cells)}</tr>"


def _html_text(value) -> str:
    if isinstance(value, Text):
        space = " " if value.plain else ""
        return f"{html.escape(value.plain)}{space}<strong>{html.escape(value.strong)}</strong>"
    return html.escape(value)


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
        ("clock", config.clock),
        ("qemu", (config.emulator or {}).get("version", "?")),
        ("cpu", config.cpu or "?"),
        ("vcpus", tables.vcpus(config)),
        ("method", config.method),
        ("threshold", config.threshold),
        ("before", kernel_label(config, "base")),
        ("after", kernel_label(config, "patched")),
    ):
        ET.SubElement(properties, "property", name=name, value=str(value))
    found = analysis.conditions
    if found is not None and found.recorded:
        ET.SubElement(properties, "property", name="conditions.differ", value=found.verdict_note())
        for side in SIDES:
            for name, value in sorted(found.sides[side].items()):
                ET.SubElement(properties, "property", name=f"conditions.{side}.{name}", value=value)
    workload = analysis.workload
    axis, suite_name = workload.axis, workload.suite or workload.name
    failed_cells = {(r["test"], r[axis.name]): r for r in analysis.problems.get(FAIL, [])}
    for cell in analysis.cells:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{suite_name}.{axis.label(cell.point)}",
            name=f"{cell.measure} @{cell.point} {axis.name}",
        )
        if cell.verdict == stats.REGRESSED:
            ET.SubElement(
                case,
                "failure",
                message=f"regressed by {cell.comparison.change:+.1%} (p = {cell.comparison.p_value:.3f})",
            )
        elif (cell.measure, cell.point) in failed_cells:
            ET.SubElement(case, "error", message=failed_cells[(cell.measure, cell.point)]["reason"][:500])
        elif cell.comparison is None:
            ET.SubElement(case, "skipped", message=cell.note)
        else:
            ET.SubElement(case, "system-out").text = table_row(cell)
    for number, line in enumerate(analysis.failures):
        if "test failed" not in line:
            ET.SubElement(
                ET.SubElement(suite, "testcase", classname=f"{suite_name}.guest", name=f"guest {number + 1}"),
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
        name = f"{cell.measure.replace(' ', '_')}@{cell.point}"
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
        row = reference.published(analysis.config, cell.measure, cell.point)
        if row is not None:
            figures["published"] = {**row, "change": reference.change(row),
                                    "same_direction": tables.agreement(cell, analysis.config)}
        return {"test": cell.measure, analysis.workload.axis.name: cell.point,
                "verdict": tables.verdict_of(cell),
                "note": cell.note,
                "runs": [len(cell.base), len(cell.patched)], **figures}

    found = analysis.conditions
    document = {
        "verdict": verdict_line(analysis),
        "exit_code": analysis.exit_code,
        "runs_planned": analysis.planned,
        "runs_missing": analysis.missing,
        "before": kernel_label(analysis.config, "base"),
        "after": kernel_label(analysis.config, "patched"),
        "measured_by": measured_by(analysis.config),
        "cells": [cell_json(cell) for cell in analysis.cells],
        "failures": analysis.failures,
        "conditions": found.to_json() if found is not None else None,
    }
    return json.dumps(document, indent=2, default=float) + "\n"


# -- formatting -----------------------------------------------------------------------------
def kernel_label(config: Config, side: str) -> str:
    """A side as the text of the reports names it: its spec first, then release and patches.

    In a kvm-modules A/B both sides boot the same release, so only the spec (and the
    patch) tells which side is which."""
    arguments = config.kernel_arguments(side)
    details = "; ".join([config.side(side).release or "?", *_patch_details(config.side(side)),
                         *([f"kernel arguments: {arguments}"] if arguments else [])])
    return f"{spec_names(config)[side]} ({details})"


def legend_label(config: Config, side: str) -> str:
    """A side as a plot's legend names it: before/after and the spec; release (and patch hash) below."""
    patches = config.side(side).patches or []
    below = config.side(side).release or "?"
    if len(patches) == 1:
        below += f", sha256 {patches[0]['sha256'][:12]}"
    elif patches:
        below += f", {len(patches)} patches"
    return f"{'before' if side == 'base' else 'after'}: {spec_names(config)[side]}\n{below}"


def spec_names(config: Config) -> dict[str, str]:
    """Each side's spec, a kvm-modules patch path cut to its name, unless that makes two specs one."""
    short = {side: _short_spec(config.side(side).spec) for side in SIDES}
    if short["base"] == short["patched"] and config.base.spec != config.patched.spec:
        return {side: config.side(side).spec for side in SIDES}
    return short


def _short_spec(spec: str) -> str:
    """``kvm-modules:debian:bookworm+/home/me/v2/fix.patch`` → ``kvm-modules:debian:bookworm+fix.patch``."""
    base, plus, patch = spec.partition("+")
    if not base.startswith(f"{KVM_MODULES}:") or not plus:
        return spec
    name = Path(patch).name or patch
    return f"{base}+{name}{'/' if patch.endswith('/') and not name.endswith('/') else ''}"


def _patch_details(side: Side) -> list[str]:
    """``name sha256 <12 hex>`` per patch, when the qualification recorded them (kvm-modules: specs)."""
    return [f"{p['name']} sha256 {p['sha256'][:12]}" for p in side.patches or []]


