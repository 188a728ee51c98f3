"""kvmlab qualify on plain data: the matrix order, the store, the analysis and the reports."""

import json
import xml.etree.ElementTree as ET

import pytest
from conftest import kvmlab
from test_cli_errors import assert_one_line_error

from kvmlab import stats
from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, matrix, report
from kvmlab.qualify.driver import _finished
from kvmlab.qualify.store import Store

CONFIG = {
    "base": {"spec": "debian:bullseye", "exact": "x", "release": "5.10"},
    "patched": {"spec": "debian:bookworm", "exact": "y", "release": "6.1"},
    "tests": ["unmap", "move active area"],
    "slots": [10, 100, 509],
    "runs": 5,
    "seconds": 1.0,
    "threshold": 0.05,
    "trace": None,
    "check_invariants": False,
}


def test_runs_alternate_between_kernels_and_swap_who_goes_first():
    items = matrix.plan(["unmap"], [10, 509], 4)
    assert len(items) == 2 * 4 * 2
    first_cell = [(i.side, i.run) for i in items[:8]]
    assert first_cell == [
        ("base", 0),
        ("patched", 0),
        ("patched", 1),
        ("base", 1),
        ("base", 2),
        ("patched", 2),
        ("patched", 3),
        ("base", 3),
    ]
    assert {i.slots for i in items[8:]} == {509}


def test_test_and_slot_lists():
    assert matrix.parse_tests("unmap, Unmap_Chunked,move-active") == [
        "unmap",
        "unmap chunked",
        "move active area",
    ]
    assert len(matrix.parse_tests(None)) == 6
    assert matrix.parse_slots("509,10,10") == [10, 509]
    for bad in ("unmapp", "rw,bogus"):
        with pytest.raises(KvmlabError, match="unknown test"):
            matrix.parse_tests(bad)
    for bad in ("ten", "1,10"):
        with pytest.raises(KvmlabError, match="--slots"):
            matrix.parse_slots(bad)


def test_store_appends_and_drops_a_torn_last_line(tmp_path):
    store = Store.create(tmp_path / "q", CONFIG)
    store.append({"kind": "run", "n": 1})
    store.append({"kind": "run", "n": 2})
    with open(store.runs_path, "a") as handle:
        handle.write('{"kind": "run", "n": 3, "iterat')  # killed mid-write
    reopened = Store.open(tmp_path / "q")
    assert [r["n"] for r in reopened.records()] == [1, 2]
    reopened.append({"kind": "run", "n": 4})
    assert [r["n"] for r in reopened.records()] == [1, 2, 4]
    assert reopened.config == CONFIG
    with pytest.raises(KvmlabError, match="--resume"):
        Store.create(tmp_path / "q", CONFIG)
    with pytest.raises(KvmlabError, match="no qualification"):
        Store.open(tmp_path / "elsewhere")


def test_finished_runs_are_not_run_again():
    item = matrix.Item("base", "unmap", 10, 2)
    run = {"kind": "run", "side": "base", "test": "unmap", "slots": 10, "run": 2}
    skip = {"kind": "skip", "side": "base", "test": "unmap", "slots": 10, "run": 0, "reason": "too many"}
    crash = {**run, "kind": "crash"}
    from collections import Counter

    assert _finished(item, [run], Counter())
    assert _finished(item, [skip], Counter())
    assert not _finished(item, [{**run, "run": 1}], Counter())
    assert not _finished(item, [crash], Counter([item.key]))  # one crash: tried again
    assert _finished(item, [crash, crash], Counter([item.key, item.key]))


def _records(values: dict) -> list[dict]:
    """Run records from {(side, test, slots): [iteration_ns, ...]}; setup time = slots µs."""
    records = []
    for (side, test, slots), times in values.items():
        for run, value in enumerate(times):
            records.append(
                {
                    "kind": "run",
                    "side": side,
                    "test": test,
                    "slots": slots,
                    "run": run,
                    "iteration_ns": value,
                    "slot_setup_ns": slots * 1000 * (1 + run / 100),
                    "iterations": 10,
                    "release": CONFIG[side]["release"],
                }
            )
    return records


def _matrix(base_times, patched_times) -> dict:
    values = {}
    for slots in CONFIG["slots"]:
        for test in CONFIG["tests"]:
            values[("base", test, slots)] = base_times(slots)
            values[("patched", test, slots)] = patched_times(slots)
    return values


SPREAD = [1.0, 1.01, 0.99, 1.02, 0.98]


def test_a_faster_patched_kernel_is_improved_everywhere_and_passes():
    records = _records(
        _matrix(lambda n: [1e6 * n * s for s in SPREAD], lambda n: [0.5e6 * n * s for s in SPREAD])
    )
    result = analysis.analyse(CONFIG, records)
    timed = [cell for cell in result.cells if cell.test != analysis.SLOT_SETUP]
    assert [cell.verdict for cell in timed] == [stats.IMPROVED] * 6
    assert all(abs(cell.comparison.change + 0.5) < 0.01 for cell in timed)
    setup = [cell for cell in result.cells if cell.test == analysis.SLOT_SETUP]
    assert [cell.verdict for cell in setup] == [stats.NO_CHANGE] * 3  # the same setup times
    assert len(setup[0].base) == 5  # from the whole-area test only (move active area)
    assert result.exit_code == 0
    fits = {(f.test, f.side): f.fit.best for f in result.fits}
    assert fits[("unmap", "base")] == "n" and fits[("unmap", "patched")] == "n"

    text = report.markdown(result)
    assert "509 slots in use:" in text and "| Unmap | 0.509s | 0.255s | 50% |" in text
    assert text.rstrip().endswith("Verdict: PASS (6 improved, 3 no significant change).")


def test_a_regression_a_failure_and_an_na_cell_each_show_and_fail_the_run(tmp_path):
    values = _matrix(lambda n: [1e6 * s for s in SPREAD], lambda n: [1e6 * s for s in SPREAD])
    values[("patched", "unmap", 100)] = [1.3e6 * s for s in SPREAD]
    del values[("base", "unmap", 509)], values[("patched", "unmap", 509)]
    records = _records(values)
    records.append(
        {
            "kind": "skip",
            "side": "base",
            "test": "unmap",
            "slots": 509,
            "run": 0,
            "reason": "slot cap 509 is above this kernel's limit of 508 memslots",
        }
    )
    records.append(
        {
            "kind": "fail",
            "side": "patched",
            "test": "move active area",
            "slots": 10,
            "run": 3,
            "reason": "guest written value should read back correctly",
        }
    )
    result = analysis.analyse(CONFIG, records)
    cells = {(c.test, c.slots): c for c in result.cells}
    assert cells[("unmap", 100)].verdict == stats.REGRESSED
    assert cells[("unmap", 509)].note.startswith("n/a: base: slot cap 509")
    assert cells[("move active area", 10)].note == "test failed (see below)"
    assert cells[("unmap", 10)].verdict == stats.NO_CHANGE
    assert result.exit_code == 1 and len(result.failures) == 1

    report.write_all(result, tmp_path)
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("9", "1", "1")
    assert int(suite.get("skipped")) >= 1
    ktap = (tmp_path / "report.ktap").read_text()
    assert "not ok 1 unmap@10" not in ktap and "not ok 4 unmap@100" in ktap
    assert "# SKIP n/a: base: slot cap 509" in ktap
    markdown = (tmp_path / "report.md").read_text()
    assert "**-30% (regressed)**" in markdown and "FAILED: patched move active area @10 run 4" in markdown
    assert "Verdict: FAIL: 1 regressed, 1 failures" in markdown


def test_cli_refuses_bad_qualify_usage(tmp_path):
    assert_one_line_error(kvmlab("qualify", "-o", str(tmp_path / "q")), "--base", "--patched")
    assert_one_line_error(kvmlab("qualify", "--resume", "-o", str(tmp_path / "none")), "no qualification")
    assert_one_line_error(
        kvmlab(
            "qualify",
            "--base",
            "debian:bullseye",
            "--patched",
            "debian:bookworm",
            "--tests",
            "mapp",
            "-o",
            str(tmp_path / "q"),
        ),
        "unknown test 'mapp'",
    )
    Store.create(tmp_path / "done", CONFIG)
    assert_one_line_error(
        kvmlab(
            "qualify",
            "--base",
            "debian:bullseye",
            "--patched",
            "debian:bookworm",
            "-o",
            str(tmp_path / "done"),
        ),
        "--resume",
    )
    assert_one_line_error(
        kvmlab("qualify", "--resume", "--runs", "9", "-o", str(tmp_path / "done")), "--runs differ"
    )
    assert json.loads((tmp_path / "done" / "qualify.json").read_text()) == CONFIG
