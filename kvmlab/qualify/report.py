"""The qualification's report: Markdown in the shape of the scalable-memslots series' tables, HTML with plots,
JUnit XML and KTAP for CI systems, and the raw store as CSV.

The Markdown follows the tables kernel developers post (per slot count: Test, Before,
After, Improvement, with "None" where nothing significant changed) and adds what a
reviewer needs to trust them: the 95 % confidence interval of the change, the
Mann-Whitney p-value, the runs behind each cell, the complexity fits, and everything
that went wrong on the way (n/a cells, failed runs, guest crashes, kernel reports).
"""

from __future__ import annotations

import base64
import html
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from kvmlab import stats
from kvmlab.qualify import matrix
from kvmlab.qualify.analysis import SLOT_SETUP, Analysis, Cell, setup_tests

#: The growth the scalable-memslots cover letter (Linux 5.17) claims, before (array) and after (trees).
SERIES_CLAIM = {"base": ("n", "n log n"), "patched": ("constant", "log n")}


def write_all(analysis: Analysis, directory: Path, traced: list | None = None) -> list[Path]:
    """Every report file into ``directory``; returns their paths."""
    written = [
        directory / name for name in ("report.md", "report.html", "junit.xml", "report.ktap", "runs.csv")
    ]
    written[0].write_text(markdown(analysis, traced) + "\n")
    plots = plot(analysis, directory / "plots")
    if traced:
        plots += trace_plots(traced, directory / "plots")
    written[1].write_text(html_report(analysis, plots, traced))
    written[2].write_text(junit(analysis))
    written[3].write_text(ktap(analysis))
    analysis.runs.to_csv(written[4], index=False)
    return written + plots


# -- Markdown --------------------------------------------------------------------------
def markdown(analysis: Analysis, traced: list | None = None) -> str:
    config = analysis.config
    lines = [
        f"# kvmlab qualify: {config['patched']['spec']} against {config['base']['spec']}",
        "",
        f"Before: {_kernel(config['base'])}; after: {_kernel(config['patched'])}.",
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
            table_header(),
            *[table_row(cell) for cell in analysis.cells if cell.slots == slots],
            "",
        ]
    if traced:
        lines += trace_markdown(traced)
    lines += complexity_markdown(analysis)
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
    rounds = "; each round in fresh boots" if config.get("boot_per_round") else ""
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


def table_header() -> str:
    return (
        "| Test | Before | After | Improvement | change, 95 % CI | p | runs |\n|---|---|---|---|---|---|---|"
    )


def table_row(cell: Cell) -> str:
    name = cell.test[0].upper() + cell.test[1:]
    comparison = cell.comparison
    if comparison is None:
        before = _seconds(np.median(cell.base)) if cell.base else "–"
        after = _seconds(np.median(cell.patched)) if cell.patched else "–"
        return f"| {name} | {before} | {after} | {cell.note} | | | {len(cell.base)}/{len(cell.patched)} |"
    improvement = {
        stats.IMPROVED: f"{-comparison.change:.0%}",
        stats.REGRESSED: f"**{-comparison.change:.0%} (regressed)**",
    }.get(comparison.verdict, "None")
    return (
        f"| {name} | {_seconds(comparison.base_median)} | {_seconds(comparison.patched_median)} | "
        f"{improvement} | {comparison.change:+.1%} [{comparison.ci_low:+.1%}, {comparison.ci_high:+.1%}] | "
        f"{comparison.p_value:.3f} | {comparison.runs[0]}/{comparison.runs[1]} |"
    )


def complexity_markdown(analysis: Analysis) -> list[str]:
    if not analysis.fits:
        return ["Complexity fit: needs at least three slot counts per kernel.", ""]
    lines = [
        "Complexity (time against slot count, fitted as a + b·f(n), best by AIC; R² of the best; "
        "slot setup per slot). The scalable-memslots series (Linux 5.17) claims O(n) before and "
        "O(log n) after:",
        "",
        "| Test | Before | After | agrees with the series |",
        "|---|---|---|---|",
    ]
    by_test: dict[str, dict] = {}
    for fit in analysis.fits:
        by_test.setdefault(fit.test, {})[fit.side] = fit
    for test, sides in by_test.items():
        cells = [
            f"{sides[s].fit.best} (R² {sides[s].fit.r_squared:.2f})" if s in sides else "–"
            for s in matrix.SIDES
        ]
        agree = all(sides[s].fit.best in SERIES_CLAIM[s] for s in sides) and len(sides) == 2
        name = f"{test} (per slot)" if test == SLOT_SETUP else test
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {'yes' if agree else 'no'} |")
    return lines + [""]


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
        lines.append(f"- guest {record['outcome']}{idle} {when} (boot {record['boot']}): "
                     f"{first.split('; console tail')[0]}")
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


def verdict_line(analysis: Analysis) -> str:
    counts = {
        verdict: sum(cell.verdict == verdict for cell in analysis.cells)
        for verdict in (stats.IMPROVED, stats.REGRESSED, stats.NO_CHANGE, "n/a")
    }
    summary = ", ".join(f"{count} {verdict}" for verdict, count in counts.items() if count)
    if analysis.exit_code == 0:
        return f"Verdict: PASS ({summary})."
    reasons = [
        f"{len(analysis.regressions)} regressed" if analysis.regressions else "",
        f"{len(analysis.failures)} failures" if analysis.failures else "",
    ]
    return f"Verdict: FAIL: {', '.join(filter(None, reasons))} ({summary})."


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
        for side, colour in zip(matrix.SIDES, ("tab:red", "tab:blue"), strict=True):
            chosen = runs[(runs["side"] == side) & runs["test"].isin(tests)].dropna(subset=[column])
            if chosen.empty:
                continue
            label = f"{'before' if side == 'base' else 'after'}: {analysis.config[side]['release']}"
            axes.scatter(chosen["slots"], chosen[column] / 1e9, s=10, alpha=0.4, color=colour)
            medians = chosen.groupby("slots")[column].median()
            axes.plot(medians.index, medians.to_numpy() / 1e9, marker="o", color=colour, label=label)
        axes.set(
            xscale="log",
            yscale="log",
            xlabel="memslots",
            ylabel="seconds",
            title=f"{name} ({'per VM' if name == SLOT_SETUP else 'per iteration'})",
        )
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = directory / f"{name.replace(' ', '-')}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


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
        f"<p>Before: {html.escape(_kernel(config['base']))}; "
        f"after: {html.escape(_kernel(config['patched']))}. "
        f"{config['runs']} runs of {config['seconds']} s per kernel and cell, interleaved. "
        f"{html.escape(measured_by(config))}</p>",
        f"<p><b>{html.escape(verdict_line(analysis))}</b></p>",
    ]
    for slots in config["slots"]:
        rows = [c for c in analysis.cells if c.slots == slots]
        body += [
            f"<h2>{_slot_title(slots)} slots in use</h2>",
            _html_table(table_header(), map(table_row, rows)),
        ]
    complexity = complexity_markdown(analysis)
    if analysis.fits:
        body += [
            "<h2>Complexity</h2>",
            f"<p>{html.escape(complexity[0])}</p>",
            _html_table("\n".join(complexity[2:4]), complexity[4:-1]),
        ]
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
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kvmlab qualify</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _html_table(header: str, rows) -> str:
    def cells(line: str, tag: str) -> str:
        parts = line.strip().strip("|").split("|")
        return (
            "<tr>"
            + "".join(f"<{tag}>{html.escape(p.strip().replace('**', ''))}</{tag}>" for p in parts)
            + "</tr>"
        )

    return f"<table>{cells(header.splitlines()[0], 'th')}{''.join(cells(row, 'td') for row in rows)}</table>"


# -- CI formats ---------------------------------------------------------------------------
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
    ):
        ET.SubElement(properties, "property", name=name, value=str(value))
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
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


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


# -- formatting -----------------------------------------------------------------------------
def _seconds(ns: float) -> str:
    """Seconds with three significant digits, the style of the series' cover letter (0.0724s, 0.0000792s)."""
    if ns is None or not math.isfinite(ns):
        return "–"
    value = ns / 1e9
    return f"{value:.3g}s" if value >= 1e-4 else f"{value:.7f}".rstrip("0") + "s"


def _slot_title(slots: int) -> str:
    return "32k" if slots == 32764 else str(slots)


def _kernel(side: dict) -> str:
    return f"{side['release']} ({side['spec']})"
