"""kvmlab qualify on plain data: the matrix order, the store, the analysis and the reports."""

import json
import xml.etree.ElementTree as ET

import pytest
from conftest import assert_one_line_error, kvmlab

from kselftest_py.memslot_perf import SLOT_SETUP
from kvmlab import stats
from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, matrix, report, workloads
from kvmlab.qualify.completion import Completion
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store

CONFIG = Config.from_json({
    "base": {"spec": "debian:bullseye", "exact": "x", "release": "5.10"},
    "patched": {"spec": "debian:bookworm", "exact": "y", "release": "6.1"},
    "tests": ["unmap", "move active area"],
    "slots": [10, 100, 509],
    "runs": 5,
    "seconds": 1.0,
    "threshold": 0.05,
    "trace": None,
    "check_invariants": False,
})


def test_runs_alternate_between_kernels_and_swap_who_goes_first():
    items = matrix.run_order(["unmap"], [10, 509], 4)
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
    assert {i.point for i in items[8:]} == {509}


def test_test_and_slot_lists():
    memslot_perf = workloads.get("memslot-perf")
    assert matrix.parse_tests(memslot_perf, "unmap, Unmap_Chunked,move-active") == [
        "unmap",
        "unmap chunked",
        "move active area",
    ]
    assert len(matrix.parse_tests(memslot_perf, None)) == 6
    assert matrix.parse_points(memslot_perf, "509,10,10") == [10, 509]
    for bad in ("unmapp", "rw,bogus"):
        with pytest.raises(KvmlabError, match="has no test"):
            matrix.parse_tests(memslot_perf, bad)
    for bad in ("ten", "1,10"):
        with pytest.raises(KvmlabError, match="--slots"):
            matrix.parse_points(memslot_perf, bad)


def _run(n: int, **fields) -> dict:
    """A run record as the driver writes one (run number ``n``)."""
    return {"kind": "run", "side": "base", "test": "unmap", "slots": 10, "run": n, "iteration_ns": 1000.0 + n,
            "iterations": 10, "slot_setup_ns": 5000.0, "release": "5.10.0-32-cloud-amd64", **fields}


def test_store_appends_and_drops_a_torn_last_line(tmp_path):
    store = Store.create(tmp_path / "q", CONFIG)
    store.append(_run(1))
    store.append(_run(2))
    with open(store.runs_path, "a") as handle:
        handle.write(json.dumps(_run(3))[:40])  # killed mid-write
    reopened = Store.open(tmp_path / "q")
    assert [r["run"] for r in reopened.records()] == [1, 2]
    reopened.append(_run(4))
    assert [r["run"] for r in reopened.records()] == [1, 2, 4]
    assert reopened.config == CONFIG
    with pytest.raises(KvmlabError, match="--resume"):
        Store.create(tmp_path / "q", CONFIG)
    with pytest.raises(KvmlabError, match="no qualification"):
        Store.open(tmp_path / "elsewhere")


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    """A kill between a record's bytes and its newline loses nothing: the record is whole."""
    store = Store.create(tmp_path / "q", CONFIG)
    store.append(_run(1))
    with open(store.runs_path, "a") as handle:
        handle.write(json.dumps({**_run(2), "kind": "fail", "reason": "exit 1"}))
    reopened = Store.open(tmp_path / "q")
    assert [r["run"] for r in reopened.records()] == [1, 2]
    reopened.append(_run(3))
    assert [r["run"] for r in reopened.records()] == [1, 2, 3]


def test_a_refused_resume_changes_nothing(tmp_path):
    store = Store.create(tmp_path / "q", CONFIG)
    store.append(_run(1))
    with open(store.runs_path, "a") as handle:
        handle.write(json.dumps(_run(2))[:40])
    before = store.runs_path.read_bytes()
    done = kvmlab("qualify", "--resume", "--runs", "9", "-o", str(tmp_path / "q"))
    assert_one_line_error(done, "--runs differ")
    assert store.runs_path.read_bytes() == before


def test_finished_runs_are_not_run_again():
    item = matrix.Item("base", "unmap", 10, 2)
    run = {"kind": "run", "side": "base", "test": "unmap", "slots": 10, "run": 2}
    skip = {"kind": "skip", "side": "base", "test": "unmap", "slots": 10, "run": 0, "reason": "too many"}
    crash = {**run, "kind": "crash"}

    def done(records):
        return Completion.of(records, "slots").is_done(item)

    assert done([run])
    assert done([skip])
    assert done([{**run, "kind": "fail"}])
    assert not done([{**run, "run": 1}])
    assert not done([{**skip, "side": "patched"}])
    assert not done([crash])  # one crash: tried again
    assert done([crash, crash])


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
                    "release": CONFIG.side(side).release,
                }
            )
    return records


def _matrix(base_times, patched_times) -> dict:
    values = {}
    for slots in CONFIG.points:
        for test in CONFIG.tests:
            values[("base", test, slots)] = base_times(slots)
            values[("patched", test, slots)] = patched_times(slots)
    return values


SPREAD = [1.0, 1.01, 0.99, 1.02, 0.98]


def test_a_faster_patched_kernel_is_improved_everywhere_and_passes():
    records = _records(
        _matrix(lambda n: [1e6 * n * s for s in SPREAD], lambda n: [0.5e6 * n * s for s in SPREAD])
    )
    result = analysis.analyse(CONFIG, records)
    timed = [cell for cell in result.cells if cell.measure != SLOT_SETUP]
    assert [cell.verdict for cell in timed] == [stats.IMPROVED] * 6
    assert all(abs(cell.comparison.change + 0.5) < 0.01 for cell in timed)
    setup = [cell for cell in result.cells if cell.measure == SLOT_SETUP]
    assert [cell.verdict for cell in setup] == [stats.NO_CHANGE] * 3  # the same setup times
    assert len(setup[0].base) == 5  # from the whole-area test only (move active area)
    assert result.exit_code == 0
    fits = {(f.measure, f.side): f.fit.best for f in result.fits}
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
    cells = {(c.measure, c.point): c for c in result.cells}
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
        "has no test 'mapp'",
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
    assert json.loads((tmp_path / "done" / "qualify.json").read_text()) == CONFIG.to_json()


def test_a_run_length_or_threshold_that_is_not_a_number_is_refused(tmp_path):
    for option, value, complaint in (("--seconds", "nan", "--seconds wants a positive time"),
                                     ("--seconds", "inf", "--seconds wants a positive time"),
                                     ("--threshold", "nan", "--threshold wants a fraction in [0, 1)")):
        done = kvmlab("qualify", "--base", "debian:bullseye", "--patched", "debian:bookworm", option, value,
                      "-o", str(tmp_path / value))
        assert_one_line_error(done, complaint)
        assert not (tmp_path / value).exists()


def test_under_icount_the_matrix_runs_round_by_round():
    items = matrix.run_order(["unmap", "move active area"], [10, 509], 3, rounds_first=True)
    assert len(items) == 2 * 2 * 3 * 2
    rounds = [item.run for item in items]
    assert rounds == sorted(rounds)  # every cell once per round, each round in its own boots
    first_round = {(i.test, i.point) for i in items if i.run == 0}
    assert len(first_round) == 4
    assert [i.side for i in items if i.run == 1][:2] == ["patched", "base"]


ICOUNT_CONFIG = CONFIG.with_(
    clock="icount",
    method=stats.WELCH_LOG,
    boot_per_round=True,
    emulator={"version": "10.0.2", "package": "qemu-system-x86 1:10.0.2+ds-2+deb13u1~bpo12+1"},
    cpu="EPYC,+svm",
    cpus=1,
    threshold=0.02,
    runs=3,
)


def test_an_icount_report_names_its_clock_emulator_and_statistic(tmp_path):
    tight = [1.0, 1.002, 0.998]
    values = _matrix(lambda n: [1e6 * s for s in tight], lambda n: [1e6 * s for s in tight])
    values[("patched", "unmap", 509)] = [1.03e6 * s for s in tight]  # 3 %: over the 2 % threshold
    result = analysis.analyse(ICOUNT_CONFIG, _records(values))
    cells = {(c.measure, c.point): c for c in result.cells}
    assert cells[("unmap", 509)].verdict == stats.REGRESSED
    assert cells[("unmap", 509)].comparison.method == stats.WELCH_LOG
    assert cells[("unmap", 10)].verdict == stats.NO_CHANGE
    report.write_all(result, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "Clock: icount" in markdown and "QEMU 10.0.2" in markdown and "Welch's t-test" in markdown
    properties = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "junit.xml").iter("property")}
    assert properties["clock"] == "icount" and properties["qemu"] == "10.0.2"
    assert "# Clock: icount" in (tmp_path / "report.ktap").read_text()


def test_resume_refuses_another_clock_or_emulator(tmp_path):
    Store.create(tmp_path / "q", ICOUNT_CONFIG)
    assert_one_line_error(
        kvmlab("qualify", "--resume", "--clock", "wall", "-o", str(tmp_path / "q")), "--clock differ"
    )
    other = ICOUNT_CONFIG.with_(emulator={"version": "9.2.0", "package": "qemu-system-x86 1:9.2"})
    Store.create(tmp_path / "old-qemu", other)
    assert_one_line_error(
        kvmlab("qualify", "--resume", "-o", str(tmp_path / "old-qemu")), "measured under QEMU 9.2.0"
    )
    Store.create(tmp_path / "unrecorded", CONFIG)  # made before clocks were recorded
    done = kvmlab("qualify", "--resume", "-o", str(tmp_path / "unrecorded"))
    assert_one_line_error(done, "records no clock")


def test_icount_with_kvm_or_an_old_qemu_is_refused_before_anything_boots(tmp_path):
    kernels = ["--base", "debian:bookworm", "--patched", "debian:bookworm"]
    assert_one_line_error(
        kvmlab("qualify", *kernels, "--clock", "icount", "--accel", "kvm", "-o", str(tmp_path / "a")),
        "--accel kvm",
    )
    old = tmp_path / "qemu-7.2"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)'\n")
    old.chmod(0o755)
    done = kvmlab("qualify", *kernels, "--clock", "icount", "-o", str(tmp_path / "b"),
                  env={"KVMLAB_QEMU": str(old)})
    assert_one_line_error(done, "--clock icount needs QEMU >= 10.0", "7.2.19")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    done = kvmlab("run", "debian:bookworm", "--clock", "icount", "--", "true", env={"KVMLAB_QEMU": str(old)})
    assert_one_line_error(done, "--clock icount needs QEMU >= 10.0")


def test_a_crash_with_a_vmcore_names_it_in_the_report():
    records = _records(_matrix(lambda n: [100.0, 101.0, 99.0], lambda n: [100.0, 101.0, 99.0]))
    crash = {"kind": "crash", "side": "patched", "test": CONFIG.tests[0], "slots": CONFIG.points[0],
             "run": 0, "outcome": "splat", "boot": "20261201-1", "vmcore": "/runs/20261201-1/vmcore",
             "message": "guest kernel reported a panic: Kernel panic - not syncing: sysrq\nexcerpt"}
    lost = {**crash, "boot": "20261201-2", "outcome": "lost", "message": "VM lost", "vmcore": None}
    lines = report.problems_markdown(analysis.analyse(CONFIG, records + [crash, lost]))
    named = [line for line in lines if "boot 20261201-1" in line]
    assert len(named) == 1 and named[0].endswith("(vmcore: /runs/20261201-1/vmcore)"), lines
    assert not any("vmcore" in line for line in lines if "boot 20261201-2" in line)
