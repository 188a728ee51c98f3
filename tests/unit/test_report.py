"""kvmlab qualify's reports: which side is which, verdicts that show, and writing that fails cleanly."""

import errno
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.figure
import pytest
from conftest import mounted_tmpfs

from kselftest_py.memslot_perf import SLOT_SETUP
from kvmlab import stats
from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, report
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store

RELEASE = "6.1.0-50-cloud-amd64"
KVM_MODULES_AB_JSON = {
    "base": {"spec": "kvm-modules:debian:bookworm", "exact": "x", "release": RELEASE},
    "patched": {"spec": "kvm-modules:debian:bookworm+/home/me/v2/my.patch", "exact": "y", "release": RELEASE},
    "tests": ["unmap", "move active area"],
    "slots": [10, 100, 509],
    "runs": 5,
    "seconds": 1.0,
    "threshold": 0.05,
    "trace": None,
    "check_invariants": False,
}
KVM_MODULES_AB = Config.from_json(KVM_MODULES_AB_JSON)
SPREAD = [1.0, 1.01, 0.99, 1.02, 0.98]


def _records(values: dict) -> list[dict]:
    """Run records from {(side, test, slots): [iteration_ns, ...]}; slot setup the same on both sides."""
    return [
        {"kind": "run", "side": side, "test": test, "slots": slots, "run": run, "iteration_ns": value,
         "slot_setup_ns": slots * 1000 * (1 + run / 100), "iterations": 10, "release": RELEASE}
        for (side, test, slots), times in values.items()
        for run, value in enumerate(times)
    ]


def _same_everywhere(config: Config) -> dict:
    return {(side, test, slots): [1e6 * s for s in SPREAD]
            for side in ("base", "patched") for test in config.tests for slots in config.points}


def _analysis(config: Config = KVM_MODULES_AB) -> analysis.Analysis:
    return analysis.analyse(config, _records(_same_everywhere(config)))


# -- which side is which --------------------------------------------------------------------
def test_a_kvm_modules_ab_names_its_sides_by_spec_with_the_release_second(tmp_path, monkeypatch):
    legends = []
    save = matplotlib.figure.Figure.savefig

    def recording_save(figure, *args, **kwargs):
        legends.append([text.get_text() for axes in figure.axes for text in axes.get_legend().get_texts()])
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_save)
    report.write_all(_analysis(), tmp_path)

    before = f"before: kvm-modules:debian:bookworm\n{RELEASE}"
    after = f"after: kvm-modules:debian:bookworm+my.patch\n{RELEASE}"
    assert legends and all(legend == [before, after] for legend in legends)
    sentence = (f"Before: kvm-modules:debian:bookworm ({RELEASE}); "
                f"after: kvm-modules:debian:bookworm+my.patch ({RELEASE}).")
    assert sentence in (tmp_path / "report.md").read_text()
    assert sentence in (tmp_path / "report.html").read_text()
    junit = (tmp_path / "junit.xml").read_text()
    assert f'name="after" value="kvm-modules:debian:bookworm+my.patch ({RELEASE})"' in junit


def test_a_recorded_patch_hash_is_in_every_label():
    patches = [{"name": "my.patch", "sha256": "ab12" * 16}]
    config = Config.from_json({**KVM_MODULES_AB_JSON, "patched": {**KVM_MODULES_AB_JSON["patched"],
                                                                  "patches": patches}})
    assert report.kernel_label(config, "patched") == (
        f"kvm-modules:debian:bookworm+my.patch ({RELEASE}; my.patch sha256 ab12ab12ab12)")
    assert report.legend_label(config, "patched").endswith(f"\n{RELEASE}, sha256 ab12ab12ab12")
    assert report.kernel_label(config, "base") == f"kvm-modules:debian:bookworm ({RELEASE})"


def test_two_patches_of_one_name_keep_their_paths():
    config = Config.from_json({
        **KVM_MODULES_AB_JSON,
        "base": {**KVM_MODULES_AB_JSON["base"], "spec": "kvm-modules:debian:bookworm+v1/fix.patch"},
        "patched": {**KVM_MODULES_AB_JSON["patched"], "spec": "kvm-modules:debian:bookworm+v2/fix.patch"}})
    assert report.spec_names(config) == {"base": "kvm-modules:debian:bookworm+v1/fix.patch",
                                         "patched": "kvm-modules:debian:bookworm+v2/fix.patch"}
    series = Config.from_json({
        **KVM_MODULES_AB_JSON,
        "patched": {**KVM_MODULES_AB_JSON["patched"], "spec": "kvm-modules:debian:bookworm+../work/series/"}})
    assert report.spec_names(series)["patched"] == "kvm-modules:debian:bookworm+series/"


# -- verdicts that show -------------------------------------------------------------------
class _Rows(HTMLParser):
    """Each table row of a page: its class and its cells' text, and whether a cell was bold."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append({"class": dict(attrs).get("class"), "cells": [], "bold": False})
        elif tag in ("td", "th") and self.rows:
            self.rows[-1]["cells"].append("")
        elif tag == "strong" and self.rows:
            self.rows[-1]["bold"] = True

    def handle_data(self, data):
        if self.rows and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1] += data


def test_every_verdict_has_its_own_shade_and_keeps_its_words(tmp_path):
    config = KVM_MODULES_AB
    values = _same_everywhere(config)
    values[("patched", "unmap", 100)] = [1.3e6 * s for s in SPREAD]
    values[("patched", "move active area", 509)] = [0.5e6 * s for s in SPREAD]
    del values[("base", "unmap", 509)], values[("patched", "unmap", 509)]
    records = _records(values) + [
        {"kind": "skip", "side": "base", "test": "unmap", "slots": 509, "run": 0, "reason": "too many slots"},
        {"kind": "fail", "side": "patched", "test": "move active area", "slots": 10, "run": 3,
         "reason": "guest written value should read back correctly"},
    ]
    result = analysis.analyse(config, records)
    report.write_all(result, tmp_path)
    page = (tmp_path / "report.html").read_text()
    parser = _Rows()
    parser.feed(page)
    shaded_rows = [row for row in parser.rows if row["class"]]  # the cells' rows, in the cells' order
    rows = {(row["cells"][0], cell.point): row for row, cell in zip(shaded_rows, result.cells, strict=True)}

    expected = {("Unmap", 100): ("regressed", stats.REGRESSED),
                ("Move active area", 509): ("improved", stats.IMPROVED),
                ("Unmap", 10): ("unchanged", stats.NO_CHANGE),
                ("Move active area", 10): ("failed", "failed"),
                ("Unmap", 509): ("incomplete", "n/a")}
    for key, (css, words) in expected.items():
        assert rows[key]["class"] == css, key
        assert rows[key]["cells"][-1] == words, key
    assert rows[("Unmap", 100)]["bold"] and not rows[("Unmap", 10)]["bold"]
    backgrounds = {css: colour for css, colour in report.VERDICT_COLOURS.values()}
    for css, colour in backgrounds.items():
        assert f".{css}{{background:{colour}}}" in page
    shaded = [backgrounds[css] for css in ("regressed", "improved", "failed", "incomplete")]
    assert len(set(shaded)) == 4 and backgrounds["unchanged"] not in shaded
    assert "<link" not in page and "<script" not in page and "url(" not in page  # self-contained

    text = (tmp_path / "report.md").read_text()
    assert "**-30% (regressed)**" in text
    assert "<" not in text and "background" not in text


# -- writing fails cleanly ----------------------------------------------------------------
def _a_finished_qualification(directory: Path) -> dict[Path, bytes]:
    """A store and an earlier write's reports in ``directory``: every file's bytes, to compare after.

    The store is made elsewhere and its files copied in, so that nothing holds a file
    open on ``directory`` (a file open for writing would keep a tmpfs from going read-only)."""
    with tempfile.TemporaryDirectory() as elsewhere:
        store = Store.create(Path(elsewhere) / "q", KVM_MODULES_AB)
        for record in _records(_same_everywhere(KVM_MODULES_AB)):
            store.append(record)
        for path in (store.config_path, store.runs_path):
            shutil.copyfile(path, directory / path.name)
    for name in report.REPORTS:
        (directory / name).write_text(f"{name} of an earlier write\n")
    return {path: path.read_bytes() for path in directory.iterdir() if path.is_file()}


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path, strerror: str) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message and strerror in message, message


def _assert_untouched(directory: Path, before: dict[Path, bytes]) -> None:
    """The store and the earlier reports byte for byte, and no scratch files left behind."""
    assert {path: path.read_bytes() for path in before} == before
    assert not [path for path in directory.iterdir() if path.name.startswith(".reports-")]


def test_a_plots_file_fails_in_one_line_and_changes_nothing(tmp_path):
    before = _a_finished_qualification(tmp_path)
    plots = tmp_path / "plots"
    plots.write_text("not a directory\n")
    with pytest.raises(KvmlabError) as err:
        report.write_all(_analysis(), tmp_path)
    _assert_one_line_naming(err, plots, os.strerror(errno.ENOTDIR))
    _assert_untouched(tmp_path, before)
    assert plots.read_text() == "not a directory\n"


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of our own to fill or make read-only; unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "fs", "4m") as mount_point:
        yield mount_point


def _fill(directory: Path, leave: int) -> Path:
    """A file taking all of ``directory``'s file system but ``leave`` bytes."""
    vfs = os.statvfs(directory)
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, vfs.f_bavail * vfs.f_frsize - leave)
    return filler


def test_a_full_disk_fails_in_one_line_and_spares_the_store_and_old_reports(tmpfs):
    before = _a_finished_qualification(tmpfs)
    filler = _fill(tmpfs, leave=32 * 1024)  # room for a plot or so, not for all of them
    with pytest.raises(KvmlabError) as err:
        report.write_all(_analysis(), tmpfs)
    _assert_one_line_naming(err, tmpfs, os.strerror(errno.ENOSPC))
    _assert_untouched(tmpfs, before)

    filler.unlink()
    written = report.write_all(_analysis(), tmpfs)  # with room again, the same call succeeds
    assert all(path.stat().st_size > 0 for path in written)
    assert (tmpfs / "runs.jsonl").read_bytes() == before[tmpfs / "runs.jsonl"]


def test_a_read_only_file_system_fails_in_one_line_and_spares_the_store(tmpfs):
    before = _a_finished_qualification(tmpfs)
    (tmpfs / "plots").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(KvmlabError) as err:
        report.write_all(_analysis(), tmpfs)
    _assert_one_line_naming(err, tmpfs, os.strerror(errno.EROFS))
    _assert_untouched(tmpfs, before)


def test_a_report_that_cannot_be_replaced_leaves_every_report_as_it_was(tmp_path):
    """report.html a directory: not one report changes (report.md went first, and alone)."""
    before = _a_finished_qualification(tmp_path)
    (tmp_path / "report.html").unlink()
    (tmp_path / "report.html" / "sub").mkdir(parents=True)
    del before[tmp_path / "report.html"]
    with pytest.raises(KvmlabError) as err:
        report.write_all(_analysis(), tmp_path)
    _assert_one_line_naming(err, tmp_path / "report.html", "not a regular file")
    _assert_untouched(tmp_path, before)


def test_junit_holds_a_guest_reason_with_control_characters(tmp_path):
    """A fail reason is the guest's stderr: colour codes and NULs must not break the XML."""
    import xml.etree.ElementTree as ET

    records = _records(_same_everywhere(KVM_MODULES_AB))
    test, slots = KVM_MODULES_AB.tests[0], KVM_MODULES_AB.points[0]
    records.append({"kind": "fail", "side": "patched", "test": test, "slots": slots, "run": 0,
                    "reason": "exit 1: \x1b[31mTraceback\x1b[0m\x00 end"})
    suite = ET.fromstring(report.junit(analysis.analyse(KVM_MODULES_AB, records)).split("\n", 1)[1])
    messages = [e.get("message") for e in suite.iter("error")]
    assert messages == ["exit 1: \\x1b[31mTraceback\\x1b[0m\\x00 end"]


def test_the_complexity_table_says_when_the_fit_cannot_tell_the_classes_apart():
    def fit(best, tied=()):
        aic = {name: 0.0 if name == best or name in tied else 10.0 for name in stats.COMPLEXITY}
        return stats.ComplexityFit(best, 0.5, aic)

    result = _analysis()
    result.fits = [
        analysis.Fit("unmap", "base", fit("n", ["n log n"]), False),  # both claimed: yes
        analysis.Fit("unmap", "patched", fit("log n"), False),
        analysis.Fit("move active area", "base", fit("n", ["constant"]), False),  # one claimed, one not
        analysis.Fit("move active area", "patched", fit("constant"), False),
        analysis.Fit(SLOT_SETUP, "base", fit("constant"), True),  # not the claim: no
        analysis.Fit(SLOT_SETUP, "patched", fit("log n"), True),
    ]
    lines = report.complexity_markdown(result)
    assert "| unmap | n or n log n, undecided (R² 0.50) | log n (R² 0.50) | yes |" in lines
    assert ("| move active area | n or constant, undecided (R² 0.50) | constant (R² 0.50) | cannot tell |"
            in lines)
    assert "| slot setup (per slot) | constant (R² 0.50) | log n (R² 0.50) | no |" in lines
    assert ("The fits agree with the series on 1 of 3 rows (1 where the fit cannot tell the classes apart)."
            in lines)
