"""The qualification's orchestration (driver, lanes, store, resume, shards) driven by a
fake guest: crash retries, a guest lost while idle, a kernel splat, a kill after any
record, and shards, each asserted without booting. tests/vm/test_qualify.py does the
same with real guests."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kselftest_py.memslot_perf import SLOT_SETUP
from kvmlab import stats
from kvmlab.qualify import analysis, matrix, merge, plan
from kvmlab.qualify.config import Config
from kvmlab.qualify.driver import Driver
from kvmlab.qualify.lane import RESULT_JSON
from kvmlab.qualify.store import Store
from kvmlab.vm import lifecycle
from kvmlab.vm.console import Splat
from kvmlab.vm.guest import GuestDown, Reply

CONFIG = Config.from_json({
    "base": {"spec": "debian:bullseye", "exact": "debian:a", "release": "5.10.0-32-cloud-amd64"},
    "patched": {"spec": "debian:bookworm", "exact": "debian:b", "release": "6.1.0-50-cloud-amd64"},
    "tests": ["unmap", "move active area"], "slots": [10, 509], "runs": 3, "seconds": 0.5,
    "threshold": 0.02, "clock": "icount", "cpus": 1, "method": stats.WELCH_LOG, "boot_per_round": True,
    "trace": None, "check_invariants": False,
})
OPTIONS = {side: {"clock": "icount", "cpus": 1} for side in ("base", "patched")}


def figures(side: str, test: str, slots: int, run: int) -> dict:
    """What a guest measures: the patched kernel 20 % faster at 509 slots, a little run jitter."""
    faster = 0.8 if side == "patched" and slots == 509 else 1.0
    jitter = 1 + run / 1000
    return {"iteration_ns": 1e6 * faster * jitter, "slot_setup_ns": 1e3 * slots * faster * jitter,
            "iterations": 10, "iteration_cpu_ns": None, "guest_runtime_ns": 5e8}


@dataclass
class Kernel:
    side: str
    release: str


@dataclass
class Script:
    """What the fake guests do, shared by every guest of a test: which request goes down
    (by ``(side, test, slots, run)``, how many times), which pause finds a guest gone, and
    which run leaves a kernel splat. Counts what was started."""

    crash: Counter = field(default_factory=Counter)
    lost_idle: set = field(default_factory=set)
    splat: set = field(default_factory=set)
    started: list = field(default_factory=list)
    requests: list = field(default_factory=list)


class FakeGuest:
    """A ``Guest`` as a lane sees it: start, request, pause, resume, close."""

    count = 0

    def __init__(self, script: Script, kernel: Kernel, options, log, role=None, machine=None):
        FakeGuest.count += 1
        self.script, self.kernel, self.role = script, kernel, role
        self.run_dir = Path(f"/nonexistent/guest-{FakeGuest.count}")
        self.template = _Template(role) if role else None
        self.process, self.watch, self.paused = _Process(), None, False
        self._splats: list[Splat] = []
        self._run: tuple | None = None

    def start(self) -> None:
        self.script.started.append((self.kernel.side, self.role))

    def request(self, argv, files=(), timeout_s=600.0, **_) -> Reply:
        if "kselftest_py.memslot_perf" not in argv:  # conditions: say nothing, as an old guest would
            return Reply(1, "", "no conditions here", 0.1)
        slots, number, run = int(_arg(argv, "-s")), int(_arg(argv, "-f")), None
        test = CONFIG.workload.tests[number]
        run = sum(1 for r in self.script.requests if r[:3] == (self.kernel.side, test, slots))
        key = (self.kernel.side, test, slots, run)
        if self.script.crash[key] > 0:
            self.script.crash[key] -= 1
            raise GuestDown(lifecycle.RunResult("crash", 1, None, "kernel panic: oops", self.run_dir))
        self.script.requests.append(key)
        if key in self.script.splat:
            self._splats.append(Splat("WARNING", 3, "a\nb\nWARNING: CPU: 0 PID: 1 at kvm_main.c\nc"))
        result = {"kernel_release": self.kernel.release, "tests": [{"test": test, "result": "pass"}],
                  "runs": [figures(*key)]}
        return Reply(0, "ok", "", 1.0, {RESULT_JSON: json.dumps(result).encode()})

    def pause(self) -> None:
        if self.kernel.side in self.script.lost_idle:
            self.script.lost_idle.discard(self.kernel.side)
            raise GuestDown(lifecycle.RunResult("lost", 1, None, "QEMU ended (signal 9)", self.run_dir))
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def check_alive(self) -> None:
        pass

    def new_splats(self) -> list[Splat]:
        splats, self._splats = self._splats, []
        return splats

    def close(self) -> None:
        pass


@dataclass
class _Template:
    name: str

    def describe(self) -> dict:
        return {"template": self.name, "template_boot": f"boot-of-{self.name}", "template_boot_s": 9.0}


class _Process:
    def kill(self) -> None:
        pass


def _arg(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def _qualify(directory: Path, script: Script, config: Config = CONFIG, jobs: int = 1) -> Store:
    """Run (or resume) the qualification in ``directory`` with fake guests."""
    resuming = (directory / "qualify.json").exists()
    store = Store.open(directory) if resuming else Store.create(directory, config)
    kernels = {side: Kernel(side, config.side(side).release) for side in ("base", "patched")}
    log = io.StringIO()

    def guests(kernel, options, log, role=None, machine=None):
        return FakeGuest(script, kernel, options, log, role=role, machine=machine)

    Driver(store, kernels, OPTIONS, jobs=jobs, log=log, guests=guests).run()
    store.release()
    return store


def _runs(store: Store) -> Counter:
    return Counter((r["side"], r["test"], r["slots"], r["run"])
                   for r in store.records() if r["kind"] == "run")


def _everything() -> set:
    return {(i.side, i.test, i.point, i.run)
            for i in matrix.run_order(list(CONFIG.tests), list(CONFIG.points), CONFIG.runs)}


def test_every_run_once_each_in_a_guest_restored_from_its_rounds_template(tmp_path):
    script = Script()
    store = _qualify(tmp_path / "q", script)
    assert _runs(store) == Counter(_everything())
    # One guest per run (matrix.units), each restoring its side's template of that round.
    assert len(script.started) == len(_everything())
    assert set(script.started) == {(side, f"qualify-{side}-round{run}") for side in ("base", "patched")
                                   for run in range(3)}
    result = analysis.analyse(store.config, store.records())
    verdicts = {(cell.measure, cell.point): cell.verdict for cell in result.cells}
    assert verdicts[("unmap", 509)] == verdicts[(SLOT_SETUP, 509)] == stats.IMPROVED
    assert verdicts[("unmap", 10)] == stats.NO_CHANGE and result.exit_code == 0


def test_a_crashed_run_is_tried_again_in_a_fresh_boot_then_given_up(tmp_path):
    once, twice = ("base", "unmap", 509, 1), ("patched", "move active area", 10, 2)
    script = Script(crash=Counter({once: 1, twice: 2}))
    store = _qualify(tmp_path / "q", script)
    records = store.records()
    crashes = [(r["side"], r["test"], r["slots"], r["run"]) for r in records if r["kind"] == "crash"]
    assert crashes == [once, twice, twice]
    assert _runs(store) == Counter(_everything() - {twice})  # the first came back on its retry
    fails = [r for r in records if r["kind"] == "fail"]
    assert [(r["side"], r["run"], r["reason"]) for r in fails] == [("patched", 2, "guest crash in 2 boots")]
    # The retries booted afresh: no template.
    assert script.started.count(("base", None)) == 1 and script.started.count(("patched", None)) == 1
    result = analysis.analyse(store.config, records)
    assert result.exit_code == 1 and any("test failed" in line for line in result.failures)


def test_a_guest_lost_while_idle_is_recorded_and_a_new_one_takes_its_runs(tmp_path):
    """Under the wall clock a lane keeps both kernels' guests, pausing the idle one."""
    wall = CONFIG.with_(clock="wall", method=stats.MANN_WHITNEY, boot_per_round=False, runs=4)
    script = Script(lost_idle={"base"})
    store = _qualify(tmp_path / "q", script, wall)
    lost = [r for r in store.records() if r["kind"] == "crash"]
    assert [(r["side"], r["run"], r["outcome"]) for r in lost] == [("base", None, "lost")]
    assert sum(_runs(store).values()) == 2 * 2 * 2 * 4  # no run lost with it
    # A new guest took over from its template (the template did not fail: the guest was lost).
    assert script.started == [("base", "qualify-base"), ("patched", "qualify-patched"),
                              ("base", "qualify-base")]


def test_a_kernel_splat_fails_the_qualification_but_keeps_the_run(tmp_path):
    splatted = ("patched", "unmap", 10, 0)
    store = _qualify(tmp_path / "q", Script(splat={splatted}))
    splats = [r for r in store.records() if r["kind"] == "splat"]
    assert [(r["side"], r["test"], r["slots"], r["run"]) for r in splats] == [splatted]
    assert "WARNING at console line 4" in splats[0]["summary"]
    assert _runs(store)[splatted] == 1
    result = analysis.analyse(store.config, store.records())
    assert result.exit_code == 1 and "guest kernel reported a WARNING" in result.failures[0]


def test_resume_after_a_kill_at_any_record_finishes_each_run_once(tmp_path):
    whole = _qualify(tmp_path / "whole", Script())
    lines = whole.runs_path.read_text().splitlines(keepends=True)
    for kept in range(len(lines) + 1):
        directory = tmp_path / f"killed-after-{kept}"
        directory.mkdir()
        (directory / "qualify.json").write_text(whole.config_path.read_text())
        # Killed after record ``kept``, in the middle of writing the next one.
        torn = lines[kept][: len(lines[kept]) // 2] if kept < len(lines) else ""
        (directory / "runs.jsonl").write_text("".join(lines[:kept]) + torn)
        script = Script()
        store = _qualify(directory, script)
        assert store.runs_path.read_text().startswith("".join(lines[:kept]))
        assert _runs(store) == Counter(_everything()), kept
        assert len(script.requests) == len(_everything()) - kept


def test_shards_merge_into_the_one_piece_verdicts_and_figures(tmp_path):
    whole = _qualify(tmp_path / "whole", Script())
    record = plan.write(tmp_path / "plan.json", CONFIG, 2)
    for k in (1, 2):
        _qualify(tmp_path / f"shard{k}", Script(), plan.shard_config(record, k, 2))
    merge.merge(merge.read_shards([tmp_path / "shard1", tmp_path / "shard2"]), tmp_path / "merged",
                lambda store, records: None)
    merged = Store.read(tmp_path / "merged")
    one = analysis.analyse(whole.config, whole.records())
    two = analysis.analyse(merged.config, merged.records())
    assert [(c.measure, c.point, c.verdict, c.base, c.patched) for c in two.cells] == \
        [(c.measure, c.point, c.verdict, c.base, c.patched) for c in one.cells]
    assert merged.config.merged["plan"] == record["id"] and merged.config.cells is None


@pytest.mark.parametrize("jobs", [1, 3])
def test_lanes_change_nothing_but_the_order(tmp_path, jobs):
    store = _qualify(tmp_path / "q", Script(), jobs=jobs)
    assert _runs(store) == Counter(_everything())
