"""Plans, shards and merging them back, on plain data: every cell in one shard, shards of
one plan only, none missing or doubled, and the merge a qualification like any other."""

import json

import pytest
from conftest import assert_one_line_error, kvmlab

from kselftest_py.memslot_perf import SLOT_SETUP
from kvmlab import stats
from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, matrix, merge, plan, workloads
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store

MEMSLOT_PERF = workloads.get("memslot-perf")
CONFIG = Config.from_json({
    "base": {"spec": "debian:bullseye", "exact": "debian:linux-image-5.10.0-32-cloud-amd64",
             "release": "5.10.0-32-cloud-amd64", "version": "5.10.223-1"},
    "patched": {"spec": "debian:bookworm", "exact": "debian:linux-image-6.1.0-50-cloud-amd64",
                "release": "6.1.0-50-cloud-amd64", "version": "6.1.176-1"},
    "tests": ["unmap chunked", "move active area"], "slots": [10, 100, 509], "runs": 3, "seconds": 0.5,
    "threshold": 0.02, "cpus": 1, "clock": "icount", "method": stats.WELCH_LOG, "boot_per_round": True,
    "emulator": {"version": "10.0.2", "package": "qemu-system-x86 1:10.0.2+ds-2+deb13u1~bpo12+1"},
    "cpu": "EPYC,+svm", "trace": None, "check_invariants": False, "accel": None, "append": "",
    "created": "2026-12-01T10:00:00+0000",
})
TESTS, SLOTS = list(CONFIG.tests), list(CONFIG.points)


def _run(side, test, slots, run, value):
    return {"kind": "run", "side": side, "test": test, "slots": slots, "run": run, "iteration_ns": value,
            "iterations": 10, "slot_setup_ns": slots * 1000.0 * (1 + run / 100), "release": "r",
            "clock": "icount", "boot": f"boot-{side}-{run}"}


def _records(cells) -> list[dict]:
    """Runs of every item of ``cells``: the patched kernel 20 % faster at 509 slots."""
    everything = matrix.run_order(TESTS, SLOTS, 3, rounds_first=True)
    items = plan.items_of(CONFIG.with_(cells=cells), everything)
    return [_run(i.side, i.test, i.point, i.run,
                 1e6 * (1 + i.run / 200) * (0.8 if i.side == "patched" and i.point == 509 else 1.0))
            for i in items]


@pytest.fixture
def planned(tmp_path):
    return plan.write(tmp_path / "plan.json", CONFIG, 2)


def _shard(tmp_path, record, k, records=None) -> Store:
    config = plan.shard_config(record, k, record["shards"])
    store = Store.create(tmp_path / f"shard{k}", config)
    for line in records if records is not None else _records(config.cells):
        store.append(line)
    store.release()
    return store


def test_the_cells_are_dealt_once_each_and_evenly():
    dealt = plan.deal(MEMSLOT_PERF, TESTS, SLOTS, 2)
    cells = sorted(cell for shard in dealt for cell in shard)
    assert cells == sorted([t, s] for s in SLOTS for t in TESTS)
    # Whole rows, so that a shard's boots run what a one-piece run's boots run: the
    # costliest row (509) alone, the two cheap ones together.
    tests = TESTS
    assert dealt == [[[t, 509] for t in tests], [[t, s] for s in (10, 100) for t in tests]]
    assert plan.deal(MEMSLOT_PERF, TESTS, SLOTS, 2) == dealt  # the same plan everywhere
    four = plan.deal(MEMSLOT_PERF, TESTS, SLOTS, 4)  # more shards than rows: cells
    assert sorted(len(shard) for shard in four) == [1, 1, 2, 2]
    assert sorted(cell for shard in four for cell in shard) == cells
    with pytest.raises(KvmlabError, match="only 6 cells"):
        plan.deal(MEMSLOT_PERF, TESTS, SLOTS, 7)


def test_each_icount_unit_is_one_kernels_row_in_one_round_whatever_the_lanes():
    items = matrix.run_order(TESTS, SLOTS, 3, rounds_first=True)
    units = matrix.units(items, by_cell=False)
    assert len(units) == 3 * 2 * len(SLOTS)
    for unit in units:
        assert len({(i.run, i.side, i.point) for i in unit}) == 1
        assert [i.test for i in unit] == TESTS
    flat = [i for unit in units for i in unit]
    assert sorted(flat, key=items.index) == items  # nothing lost or doubled
    assert all(unit == sorted(unit, key=items.index) for unit in units)
    # A shard's units are the one-piece run's units of its rows, test for test.
    shard = [i for i in items if i.point == 509]
    assert matrix.units(shard, by_cell=False) == [u for u in units if u[0].point == 509]
    # The wall clock keeps whole cells: both kernels of a cell on one pair of guests.
    cells = matrix.units(matrix.run_order(TESTS, SLOTS, 3), by_cell=True)
    assert all({i.side for i in cell} == set(matrix.SIDES) and len(cell) == 6 for cell in cells)


def test_a_restored_icount_guest_runs_one_run():
    """Every run in a guest of its own, restored from its template: none follows another
    run in its guest, whose timing the host's gap between requests would shift."""
    items = matrix.run_order(TESTS, SLOTS, 3, rounds_first=True)
    assert matrix.units(items, by_cell=False, restored=True) == [[item] for item in items]
    # The wall clock keeps its cells even with templates: a cell's pair alternates on one pair.
    wall = matrix.run_order(TESTS, SLOTS, 3)
    assert matrix.units(wall, by_cell=True, restored=True) == matrix.units(wall, by_cell=True)


def test_a_shard_runs_exactly_its_cells_in_the_plans_order(planned):
    everything = matrix.run_order(TESTS, SLOTS, 3, rounds_first=True)
    shards = [plan.items_of(plan.shard_config(planned, k, 2), everything) for k in (1, 2)]
    assert sorted(shards[0] + shards[1], key=everything.index) == everything
    assert not set(shards[0]) & set(shards[1])
    for items in shards:
        assert items == sorted(items, key=everything.index)
        cells = {(i.test, i.point) for i in items}
        assert all({(side, run) for side in matrix.SIDES for run in range(3)} ==
                   {(i.side, i.run) for i in items if (i.test, i.point) == cell} for cell in cells)


def test_a_plan_edited_by_hand_or_foreign_is_refused(tmp_path, planned):
    path = tmp_path / "plan.json"
    edited = json.loads(path.read_text())
    edited["config"]["threshold"] = 0.5
    path.write_text(json.dumps(edited))
    with pytest.raises(KvmlabError, match="its id does not match its config"):
        plan.read(path)
    path.write_text('{"format": "something else"}')
    with pytest.raises(KvmlabError, match="is not a kvmlab plan"):
        plan.read(path)
    with pytest.raises(KvmlabError, match="K must be between 1 and N"):
        plan.parse_shard("3/2")
    with pytest.raises(KvmlabError, match="the plan has 2 shards"):
        plan.shard_config(planned, 1, 3)


def test_merged_shards_analyse_as_one_qualification(tmp_path, planned):
    shards = [_shard(tmp_path, planned, k) for k in (1, 2)]
    merge.merge(merge.read_shards([s.directory for s in shards]), tmp_path / "merged",
                lambda store, records: None)
    merged = Store.read(tmp_path / "merged")
    whole = analysis.analyse(CONFIG, _records(None))
    together = analysis.analyse(merged.config, merged.records())
    assert [(c.measure, c.point, c.verdict, c.base, c.patched) for c in together.cells] == \
        [(c.measure, c.point, c.verdict, c.base, c.patched) for c in whole.cells]
    measured = [c.verdict for c in together.cells if c.point == 509 and c.measure != SLOT_SETUP]
    assert measured == [stats.IMPROVED] * 2
    written = json.loads(merged.config_path.read_text())
    assert "cells" not in written and "plan" not in written  # a whole qualification now
    assert merged.config.cells is None and merged.config.plan is None
    assert merged.config.merged["plan"] == planned["id"]


def test_the_merge_command_writes_the_reports_and_the_verdicts_exit_code(tmp_path, planned):
    shards = [_shard(tmp_path, planned, k) for k in (2, 1)]
    done = kvmlab("qualify", "merge", *(str(s.directory) for s in shards), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "| Move active area |" in done.stdout
    assert all((tmp_path / "out" / name).stat().st_size for name in ("report.md", "report.html", "junit.xml"))


@pytest.mark.parametrize("damage, complaint", [
    ("twice", "are both shard 1/2"),
    ("missing", "shard 2 of 2 missing"),
    ("foreign", "not of plan"),
    ("outside", "outside shard 2's cells"),
    ("damaged", "runs.jsonl:1: not a JSON record"),
    ("not a shard", "is not a shard of a plan"),
])
def test_a_mix_of_shards_is_refused_and_nothing_is_written(tmp_path, planned, damage, complaint):
    one, two = _shard(tmp_path, planned, 1), _shard(tmp_path, planned, 2)
    dirs = [one.directory, two.directory]
    if damage == "twice":
        dirs = [one.directory, one.directory]
    elif damage == "missing":
        dirs = [one.directory]
    elif damage == "foreign":
        other = plan.write(tmp_path / "other.json", CONFIG.with_(seconds=1.0), 2)
        (tmp_path / "other").mkdir()
        dirs = [one.directory, _shard(tmp_path / "other", other, 2).directory]
    elif damage == "outside":
        stray = _records(plan.shard_config(planned, 1, 2).cells)[0]
        with open(two.runs_path, "a") as handle:
            handle.write(json.dumps(stray) + "\n")
    elif damage == "damaged":
        two.runs_path.write_text("{not json\n")
    elif damage == "not a shard":
        plain = Store.create(tmp_path / "plain", CONFIG)
        plain.release()
        dirs = [one.directory, plain.directory]
    done = kvmlab("qualify", "merge", *map(str, dirs), "-o", str(tmp_path / "out"))
    assert_one_line_error(done, complaint)
    assert not (tmp_path / "out").exists()


def test_shard_refuses_options_the_plan_decides(tmp_path, planned):
    done = kvmlab("qualify", "--shard", "1/2", str(tmp_path / "plan.json"), "--runs", "5",
                  "-o", str(tmp_path / "s"))
    assert_one_line_error(done, "--shard takes the whole qualification from its plan", "drop --runs")
    done = kvmlab("qualify", "--shard", "1/2", "-o", str(tmp_path / "s"))
    assert_one_line_error(done, "wants one plan file")
    assert not (tmp_path / "s").exists()


# -- what a CI job may trust a merge with (issue 26) -------------------------------------------
def _merge(tmp_path, dirs, *options, out="out"):
    return kvmlab("qualify", "merge", *map(str, dirs), "-o", str(tmp_path / out), *options)


@pytest.mark.parametrize("damage, complaint", [
    ("seven runs", "7 of"),  # only some of its runs
    ("no runs", "runs not done (first: base"),
    ("no runs.jsonl", "runs.jsonl is missing"),
])
def test_an_unfinished_shard_is_refused_and_partial_is_never_a_pass(tmp_path, planned, damage, complaint):
    one = _shard(tmp_path, planned, 1)
    cells = plan.shard_config(planned, 2, 2).cells
    two = _shard(tmp_path, planned, 2, _records(cells)[:7] if damage == "seven runs" else [])
    if damage == "no runs.jsonl":
        two.runs_path.unlink()
    done = _merge(tmp_path, [one.directory, two.directory])
    assert_one_line_error(done, str(two.directory), complaint)
    if damage != "no runs.jsonl":
        assert "shard 2/2" in done.stderr and "--resume -o" in done.stderr
    assert not (tmp_path / "out").exists()
    if damage == "no runs.jsonl":
        return
    done = _merge(tmp_path, [one.directory, two.directory], "--partial")
    assert done.returncode == 3, done.stderr  # asked for on purpose: still never a pass
    assert "Verdict: INCOMPLETE" in done.stdout or "Verdict: FAIL" in done.stdout
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    total = len(_records(None))
    assert written["runs_planned"] == total
    assert written["runs_missing"] == total - len(_records(plan.shard_config(planned, 1, 2).cells)) - \
        (7 if damage == "seven runs" else 0)
    assert written["exit_code"] == 3


def test_a_shard_still_being_written_is_refused(tmp_path, planned):
    import subprocess
    import sys
    one, two = _shard(tmp_path, planned, 1), _shard(tmp_path, planned, 2)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(two.directory / '.lock')!r}, 'r+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write(f'{os.getpid()}\\n'); f.flush()\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _merge(tmp_path, [one.directory, two.directory])
        assert_one_line_error(done, str(two.directory),
                              f"still being written by kvmlab qualify (pid {holder.pid})")
        assert not (tmp_path / "out").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _merge(tmp_path, [one.directory, two.directory]).returncode == 0


@pytest.mark.parametrize("edit, named", [
    (lambda data: data.update(runs=9), "runs"),
    (lambda data: data["patched"].update(exact="debian:linux-image-6.1.0-99-cloud-amd64"), "patched"),
])
def test_a_shard_edited_after_it_was_made_is_refused_naming_the_difference(tmp_path, planned, edit, named):
    one, two = _shard(tmp_path, planned, 1), _shard(tmp_path, planned, 2)
    data = json.loads(two.config_path.read_text())
    edit(data)
    two.config_path.write_text(json.dumps(data))
    done = _merge(tmp_path, [one.directory, two.directory])
    assert_one_line_error(done, "shard 2/2", f"no longer matches plan {planned['id']}",
                          f"({named} differ from shard 1/2")
    assert not (tmp_path / "out").exists()


def test_shards_of_another_shard_count_say_so(tmp_path, planned):
    one = _shard(tmp_path, planned, 1)
    three = plan.write(tmp_path / "three.json", CONFIG, 3)
    (tmp_path / "other").mkdir()
    other = _shard(tmp_path / "other", three, 2)
    done = _merge(tmp_path, [one.directory, other.directory])
    assert_one_line_error(done, f"of plan {three['id']} (3 shards)",
                          f"not of plan {planned['id']} (2 shards)")


def test_a_trace_dir_outside_its_store_is_refused(tmp_path, planned):
    one, two = _shard(tmp_path, planned, 1), _shard(tmp_path, planned, 2)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "secret").write_text("x")
    lines = two.runs_path.read_text().splitlines()
    record = json.loads(lines[0])
    two.runs_path.write_text("\n".join([json.dumps({**record, "trace_dir": "../evil"}), *lines[1:]]) + "\n")
    done = _merge(tmp_path, [one.directory, two.directory])
    assert_one_line_error(done, "runs.jsonl:1", "'trace_dir' wants a path inside the store")
    # A link inside the shard that leads out of it is refused as well.
    (two.directory / "traces").symlink_to(tmp_path / "evil")
    two.runs_path.write_text("\n".join([json.dumps({**record, "trace_dir": "traces"}), *lines[1:]]) + "\n")
    done = _merge(tmp_path, [one.directory, two.directory])
    assert_one_line_error(done, "trace_dir 'traces' leads outside the shard")
    assert not (tmp_path / "out").exists()
    # A trace directory inside its shard is copied.
    (two.directory / "traces").unlink()
    (two.directory / "traces" / "t1").mkdir(parents=True)
    (two.directory / "traces" / "t1" / "trace.dat").write_bytes(b"data")
    two.runs_path.write_text("\n".join([json.dumps({**record, "trace_dir": "traces/t1"}), *lines[1:]]) + "\n")
    assert _merge(tmp_path, [one.directory, two.directory]).returncode == 0
    assert (tmp_path / "out" / "traces" / "t1" / "trace.dat").read_bytes() == b"data"


def test_merge_threshold_is_honoured_and_recorded(tmp_path, planned):
    dirs = [_shard(tmp_path, planned, k).directory for k in (1, 2)]
    done = _merge(tmp_path, dirs, "--threshold", "0.5")
    assert done.returncode == 0, done.stderr
    assert "judging with --threshold 0.5" in done.stderr
    assert "a 50% practical threshold" in done.stdout
    verdicts = {c["verdict"] for c in json.loads((tmp_path / "out" / "report.json").read_text())["cells"]}
    assert verdicts == {stats.NO_CHANGE}  # the 20 % change at 509 slots is under 50 %
    assert json.loads((tmp_path / "out" / "qualify.json").read_text())["threshold"] == 0.5


@pytest.mark.parametrize("argv, complaint", [
    (["merge", "a", "b", "--base", "debian:bullseye", "-o", "out"], "drop --base"),
    (["merge", "a", "b", "--resume", "-o", "out"], "drop --resume"),
    (["--shard", "1/3", "plan.json", "--threshold", "0.5", "-o", "out"], "drop --threshold"),
    (["--shard", "1/3", "plan.json", "--accel", "tcg", "-o", "out"], "drop --accel"),
    (["--shard", "1/3", "plan.json", "--fresh-boot", "-o", "out"], "drop --fresh-boot"),
    (["--base", "a", "--patched", "b", "--shards", "3", "-o", "out"], "--shards N goes with --plan"),
    (["--base", "a", "--patched", "b", "--partial", "-o", "out"], "--partial goes with merge or report"),
    (["--plan", "--base", "a", "--patched", "b", "--jobs", "2", "-o", "out"], "--plan writes a new plan"),
    (["--base", "a", "--patched", "b", "--runs", "999999999", "-o", "out"], "--runs wants 2 to 1000"),
    (["--base", "a", "--patched", "b", "--jobs", "100000", "-o", "out"], "--jobs wants 1 to 64"),
    (["--plan", "--base", "a", "--patched", "b", "--shards", "5000", "-o", "out"],
     "--shards wants 1 to 1000"),
    (["--base", "a", "--patched", "b", "--seconds", "1e9", "-o", "out"], "--seconds wants a positive time"),
    (["report"], "wants one qualification directory"),
    (["--base", "a", "--patched", "b"], "qualify needs -o DIR"),
])
def test_options_that_would_do_nothing_are_refused(tmp_path, argv, complaint):
    done = kvmlab("qualify", *argv)
    assert_one_line_error(done, complaint)
    assert not (tmp_path / "out").exists()


def _big_shards(tmp_path, runs: int) -> list:
    """Two finished shards of a plan of ``runs`` runs a cell (12 records per run)."""
    config = CONFIG.with_(runs=runs)
    record = plan.write(tmp_path / "big-plan.json", config, 2)
    everything = matrix.run_order(TESTS, SLOTS, runs, rounds_first=True)
    stores = []
    for k in (1, 2):
        shard = plan.shard_config(record, k, 2)
        store = Store.create(tmp_path / f"big{k}", shard)
        store.append_all([_run(i.side, i.test, i.point, i.run, 1e6 * (1 + (i.run % 7) / 200))
                          for i in plan.items_of(shard, everything)])
        store.release()
        stores.append(store.directory)
    return stores


def test_a_killed_merge_leaves_no_out_or_a_whole_one(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    dirs = _big_shards(tmp_path, 500)
    total = 6 * 2 * 500
    for attempt, delay in enumerate((0.5, 1.0, 1.5, 2.0, 3.0)):
        out = tmp_path / f"out{attempt}"
        merging = subprocess.Popen([sys.executable, "-m", "kvmlab.cli", "qualify", "merge", *map(str, dirs),
                                    "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        merging.send_signal(signal.SIGKILL)
        merging.wait()
        if out.exists():  # finished before the kill: whole
            assert len((out / "runs.jsonl").read_text().splitlines()) == total
            assert (out / "report.md").stat().st_size and (out / "report.json").stat().st_size
        done = _merge(tmp_path, dirs, out=f"out{attempt}")
        if out.exists() and done.returncode == 2:
            assert "already holds a qualification" in done.stderr
        else:
            assert done.returncode == 0, done.stderr  # the kill left nothing in the way
        assert len((out / "runs.jsonl").read_text().splitlines()) == total
        assert not list(tmp_path.glob(f".out{attempt}.merge-*"))  # the killed one's scratch is gone


def test_a_full_disk_leaves_no_out_and_names_the_path(tmp_path, planned):
    import subprocess
    dirs = [_shard(tmp_path, planned, k).directory for k in (1, 2)]
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(small)],
                             capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        done = kvmlab("qualify", "merge", *map(str, dirs), "-o", str(small / "out"))
        assert_one_line_error(done, f"-o {small / 'out'}", "No space left on device",
                              "nothing was left there")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
