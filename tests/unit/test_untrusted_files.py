"""Files kvmlab did not write itself (a shard from a CI artefact, a plan, a store a user
edited) are refused in one line with exit 2 when damaged, before anything is fetched or
booted: never an internal error (70), never a hang, never a read without end. Also
``qualify report`` (re-rendering without measuring) and the fuzz of issue 26."""

import json
import os
import random
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab import cli, files, kernels
from kvmlab.errors import KvmlabError
from kvmlab.qualify import matrix, plan
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store
from kvmlab.vm import boot

CONFIG = Config.from_json({
    "base": {"spec": "debian:bullseye", "exact": "debian:linux-image-5.10.0-32-cloud-amd64",
             "release": "5.10.0-32-cloud-amd64", "version": "5.10.223-1"},
    "patched": {"spec": "debian:bookworm", "exact": "debian:linux-image-6.1.0-50-cloud-amd64",
                "release": "6.1.0-50-cloud-amd64", "version": "6.1.176-1"},
    "workload": "memslot-perf", "tests": ["unmap chunked", "move active area"], "slots": [10, 100, 509],
    "runs": 3, "seconds": 0.5, "threshold": 0.02, "cpus": 1, "clock": "icount", "method": "welch-log",
    "boot_per_round": True, "emulator": {"version": "10.0.2", "package": "qemu-system-x86 1:10.0.2"},
    "cpu": "EPYC,+svm", "trace": None, "check_invariants": False, "accel": None, "append": "",
})


def _run(item: matrix.Item) -> dict:
    return {"kind": "run", "side": item.side, "test": item.test, "slots": item.point, "run": item.run,
            "iteration_ns": 1e6 * (1 + item.run / 100), "iterations": 10,
            "slot_setup_ns": item.point * 1000.0, "release": "r", "clock": "icount", "boot": "b"}


def _store(directory: Path, config: Config = CONFIG, records: list | None = None) -> Store:
    store = Store.create(directory, config)
    everything = matrix.run_order(list(config.tests), list(config.points), config.runs, rounds_first=True)
    store.append_all(records if records is not None else [_run(i) for i in plan.items_of(config, everything)])
    store.release()
    return store


def _shards(tmp_path: Path) -> tuple[dict, list[Path]]:
    record = plan.write(tmp_path / "plan.json", CONFIG, 2)
    return record, [_store(tmp_path / f"shard{k}", plan.shard_config(record, k, 2)).directory for k in (1, 2)]


class Reached(Exception):
    """A step that damaged input must never reach: fetching a kernel, choosing a QEMU."""


@pytest.fixture
def main(capsys, monkeypatch, tmp_path):
    """``kvmlab ARGS`` in this process, bounded by an alarm (a hang fails the test), with
    fetching kernels and choosing a machine made unreachable."""
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path / "cache"))

    def reached(*args, **kwargs):
        raise Reached("fetched or booted despite damaged input")

    monkeypatch.setattr(kernels, "fetch", reached)
    monkeypatch.setattr(boot.Machine, "choose", reached)
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}

    def alarm(signum, frame):
        raise TimeoutError("kvmlab hung on this input")

    def run(*args: str) -> SimpleNamespace:
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(30)
        try:
            code = cli.main(list(args))
        finally:
            signal.alarm(0)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    yield run
    for number, handler in saved.items():
        signal.signal(number, handler)


def refused(done, *fragments: str) -> None:
    """One line, exit 2, naming every fragment; never the unreachable step."""
    assert "Reached" not in done.stderr, done.stderr
    assert_one_line_error(done, *fragments)
    line = next(line for line in done.stderr.splitlines() if line.startswith("kvmlab: error:"))
    assert len(line) <= 600, len(line)


# -- not a regular file ------------------------------------------------------------------------
def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make, said", [
    (_fifo, "not a regular file (a FIFO)"),
    (lambda path: (path.unlink(), path.symlink_to("/dev/null")), "not a regular file (a character device)"),
    (lambda path: (path.unlink(), path.symlink_to(path.parent / "gone")), "a dangling symbolic link"),
    (lambda path: (path.unlink(), path.symlink_to(path)), "a symbolic link loop"),
])
@pytest.mark.parametrize("name", ["qualify.json", "runs.jsonl"])
def test_a_store_file_that_is_not_a_plain_file_is_refused(main, tmp_path, make, said, name):
    """A FIFO blocked for ever; /dev/null, a dangling link or a loop read as an empty store."""
    store = _store(tmp_path / "q")
    make(store.directory / name)
    for argv in (["qualify", "--resume", "-o", str(store.directory)],
                 ["qualify", "report", str(store.directory)]):
        refused(main(*argv), name, said)


@pytest.mark.parametrize("make, said", [
    (_fifo, "a FIFO"),
    (lambda path: (path.unlink(), path.symlink_to("/dev/zero")), "a character device"),
    (lambda path: (path.unlink(), path.symlink_to(path.parent / "gone")), "a dangling symbolic link"),
])
def test_a_plan_that_is_not_a_plain_file_is_refused(main, tmp_path, make, said):
    """A plan that is /dev/zero was read until the OOM killer came, at 23 GB."""
    path = tmp_path / "plan.json"
    plan.write(path, CONFIG, 2)
    make(path)
    refused(main("qualify", "--shard", "1/2", str(path), "-o", str(tmp_path / "s")), said)
    assert not (tmp_path / "s").exists()


def test_an_oversized_file_is_refused_unread(main, tmp_path):
    path = tmp_path / "plan.json"
    with open(path, "wb") as handle:
        handle.truncate(plan.LIMIT + 1)  # sparse: costs no disk
    refused(main("qualify", "--shard", "1/2", str(path), "-o", str(tmp_path / "s")), "larger than 16 MiB")
    store = _store(tmp_path / "q")
    with open(store.runs_path, "ab") as handle:
        handle.write(b"{" + b" " * files.MiB * 2)
    refused(main("qualify", "report", str(store.directory)), "runs.jsonl:", "a line longer than 1 MiB")


def test_a_fifo_given_to_a_real_process_does_not_block_it(tmp_path):
    """The same, end to end: with nobody writing the FIFO, kvmlab still answers at once."""
    path = _fifo(tmp_path / "plan.json")
    done = kvmlab("qualify", "--shard", "1/2", str(path), "-o", str(tmp_path / "s"), timeout=30)
    assert_one_line_error(done, "a FIFO")


# -- damaged values: exit 2, never 70 ------------------------------------------------------------
def _edit_store(store: Store, config=None, record=None) -> None:
    if config:
        data = json.loads(store.config_path.read_text())
        config(data)
        store.config_path.write_text(json.dumps(data))
    if record:
        lines = store.runs_path.read_text().splitlines()
        store.runs_path.write_text(record(lines[0]) + "\n" + "\n".join(lines[1:]) + "\n")


@pytest.mark.parametrize("config, record, said", [
    (None, lambda line: line.replace('"iteration_ns": 1000000.0', '"iteration_ns": ' + "9" * 400),
     "'iteration_ns' wants a time in ns"),
    (None, lambda line: line.replace('"iteration_ns": 1000000.0', '"iteration_ns": 1e308'),
     "'iteration_ns' wants a time in ns"),
    (None, lambda line: "[" * 100000, "not a JSON record"),
    (lambda data: data.update(method="coin"), None, "'method' wants a statistical method"),
    (lambda data: data.update(method=5), None, "'method' wants a statistical method"),
    (lambda data: data.update(plan=5), None, "'plan' wants a shard of a plan"),
    (lambda data: data.update(cells=5), None, "'cells' wants a list of cells"),
    (lambda data: data["base"].update(release=5), None, "'release' wants a string or null"),
    (lambda data: data["base"].update(patches=5), None, "'patches' wants a list of patches"),
    (lambda data: data.update(slots=[10, 10, 100]), None, "each once"),
    (lambda data: data.update(tests=["unmap chunked", "unmap chunked"]), None, "each once"),
    (lambda data: data.update(runs=999999999), None, "'runs' wants an integer from 2 to 1000"),
    (lambda data: data.update(tests="x" * 5000), None, "'tests' wants"),
])
def test_a_damaged_value_is_refused_in_one_short_line(main, tmp_path, config, record, said):
    store = _store(tmp_path / "q")
    _edit_store(store, config, record)
    for argv in (["qualify", "--resume", "-o", str(store.directory)],
                 ["qualify", "report", str(store.directory)]):
        refused(main(*argv), said)


def test_a_nested_qualify_json_is_refused(main, tmp_path):
    store = _store(tmp_path / "q")
    store.config_path.write_text("[" * 100000)
    refused(main("qualify", "report", str(store.directory)), "qualify.json is damaged: nested too deeply")


def test_a_crash_record_without_its_boot_still_reports(main, tmp_path):
    """A KeyError in the report once; merge also left OUT without reports."""
    record, dirs = _shards(tmp_path)
    crash = {"kind": "crash", "side": "base", "test": None, "slots": None, "run": None, "outcome": "lost",
             "message": "QEMU died", "clock": "icount"}
    with open(dirs[0] / "runs.jsonl", "a") as handle:
        handle.write(json.dumps(crash) + "\n")
    done = main("qualify", "merge", *map(str, dirs), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "guest lost (base) while idle (boot ?)" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("edit, said", [
    (lambda record: record["cells"].__setitem__(0, ["unmap chunked", "x"]), "not lists of [test, point]"),
    (lambda record: record["cells"].__setitem__(0, 5), "not lists of [test, point]"),
    (lambda record: record["cells"].__setitem__(0, [{"a": 1}, ["unmap chunked", 10]]), "not lists"),
    (lambda record: record["cells"].__setitem__(0, ["a", 1, {}, [2]]), "not lists"),
    (lambda record: record["config"].pop("clock"), "does not record 'clock'"),
    (lambda record: record["config"].update(method="coin"), "'method' wants a statistical method"),
    (lambda record: record["config"]["base"].update(release=5), "'release' wants a string or null"),
    (lambda record: record["config"]["base"].update(patches=5), "'patches' wants"),
])
def test_a_damaged_plan_is_refused_before_anything_is_fetched(main, tmp_path, edit, said):
    """Each with its id made to match again, as a careful forger would: the schema, not the
    hash, must catch it; a plan with an unknown method was once measured, failing only
    at report time."""
    path = tmp_path / "plan.json"
    record = plan.write(path, CONFIG, 2)
    edit(record)
    try:
        record["id"] = plan.plan_id(Config.from_json(record["config"]))
    except KvmlabError:
        pass
    path.write_text(json.dumps(record))
    refused(main("qualify", "--shard", "1/2", str(path), "-o", str(tmp_path / "s")), said)
    assert not (tmp_path / "s").exists()


# -- qualify report: re-render without measuring ------------------------------------------------
def test_report_rerenders_a_read_only_store_elsewhere_and_cleans_up(tmp_path):
    store = _store(tmp_path / "q")
    stale = store.directory / ".reports-99999999-abcd"
    stale.mkdir()
    done = kvmlab("qualify", "report", str(store.directory))
    assert done.returncode == 0, done.stderr
    assert (store.directory / "report.md").is_file() and not stale.exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(store.directory), str(ro)],
                             capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot bind-mount read-only here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        done = kvmlab("qualify", "report", str(ro), "--threshold", "0.5", "-o", str(tmp_path / "elsewhere"))
        assert done.returncode == 0, done.stderr
        assert "a 50% practical threshold" in (tmp_path / "elsewhere" / "report.md").read_text()
        done = kvmlab("qualify", "report", str(ro))
        assert_one_line_error(done, "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_report_refuses_an_unfinished_store_unless_partial(main, tmp_path):
    store = _store(tmp_path / "q", records=[])
    refused(main("qualify", "report", str(store.directory)), "is unfinished: 36 of 36 runs not done",
            "--partial")
    done = main("qualify", "report", str(store.directory), "--partial")
    assert done.returncode == 3
    assert "Verdict: INCOMPLETE: 36 of 36 runs never measured" in done.stdout


def test_a_directory_without_a_store_says_what_was_asked(main, tmp_path):
    refused(main("qualify", "merge", str(tmp_path), "-o", str(tmp_path / "out")),
            "holds no qualification to merge")
    refused(main("qualify", "report", str(tmp_path)), "holds no qualification to report")


# -- the fuzz ----------------------------------------------------------------------------------------
def _mutations(rng: random.Random):
    """Random damage to a JSON value: a key dropped or retyped, a number made huge, a
    list emptied or doubled, a string made long."""
    odd = [None, True, -1, 0, 5, 1e308, 10**30, "", "x" * 300, [], {}, [[]], "../../../x", float("nan")]

    def mutate(value, depth=0):
        if isinstance(value, dict) and value and (depth == 0 or rng.random() < 0.7):
            key = rng.choice(sorted(value))
            copy = dict(value)
            roll = rng.random()
            if roll < 0.2:
                del copy[key]
            elif roll < 0.6:
                copy[key] = mutate(copy[key], depth + 1)
            else:
                copy[key] = rng.choice(odd)
            return copy
        if isinstance(value, list) and value and rng.random() < 0.7:
            copy = list(value)
            roll = rng.random()
            if roll < 0.3:
                copy.append(copy[0])
            elif roll < 0.5:
                copy.pop(rng.randrange(len(copy)))
            else:
                index = rng.randrange(len(copy))
                copy[index] = mutate(copy[index], depth + 1)
            return copy
        return rng.choice(odd)

    return mutate


def _dump(value) -> str:
    return json.dumps(value, allow_nan=True)


@pytest.mark.parametrize("seed", range(int(os.environ.get("KVMLAB_FUZZ_SEEDS", "6"))))
def test_fuzz_damaged_stores_plans_and_shards(main, tmp_path, seed):
    """Damaged stores, plans and shard sets thrown at resume, shard, merge and report:
    each ends in exit 2 with one line, or is taken as sound; never 70, never a hang."""
    rng = random.Random(seed)
    mutate = _mutations(rng)
    outcomes = []
    for case in range(12):
        where = tmp_path / f"case{case}"
        where.mkdir()
        record, dirs = _shards(where)
        target = rng.choice(["shard config", "shard record", "plan", "store config", "store record"])
        if target == "shard config":
            path = dirs[rng.randrange(2)] / "qualify.json"
            path.write_text(_dump(mutate(json.loads(path.read_text()))))
            argv = ["qualify", "merge", *map(str, dirs), "-o", str(where / "out")]
        elif target == "shard record":
            path = dirs[rng.randrange(2)] / "runs.jsonl"
            lines = path.read_text().splitlines()
            index = rng.randrange(len(lines))
            lines[index] = _dump(mutate(json.loads(lines[index])))
            path.write_text("\n".join(lines) + "\n")
            argv = ["qualify", "merge", *map(str, dirs), "-o", str(where / "out")]
        elif target == "plan":
            damaged = {**record, "config": mutate(record["config"])} if rng.random() < 0.7 else mutate(record)
            if rng.random() < 0.5 and isinstance(damaged, dict):
                try:  # a forger who fixes the id
                    damaged["id"] = plan.plan_id(Config.from_json(damaged.get("config")))
                except (KvmlabError, TypeError, AttributeError):
                    pass
            (where / "plan.json").write_text(_dump(damaged))
            argv = ["qualify", "--shard", "1/2", str(where / "plan.json"), "-o", str(where / "s")]
        else:
            store = _store(where / "q")
            path = store.config_path if target == "store config" else store.runs_path
            if target == "store config":
                path.write_text(_dump(mutate(json.loads(path.read_text()))))
            else:
                lines = path.read_text().splitlines()
                lines[0] = _dump(mutate(json.loads(lines[0])))
                path.write_text("\n".join(lines) + "\n")
            argv = rng.choice([["qualify", "--resume", "-o", str(store.directory)],
                               ["qualify", "report", str(store.directory)]])
        done = main(*argv)
        if "Reached" in done.stderr:  # sound enough to go on to fetch: the damage was harmless
            outcomes.append("sound")
            continue
        assert done.returncode != 70, (target, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.returncode in (0, 1, 2, 3), (target, done.stderr)
        if done.returncode == 2:
            assert len([line for line in done.stderr.splitlines() if line.startswith("kvmlab: error:")]) == 1
        outcomes.append(done.returncode)
    assert 2 in outcomes  # the fuzz did damage something


@pytest.mark.parametrize("argv", [
    ["run", "debian:" + "x" * 5000, "--", "true"],
    ["kernel", "fetch", "debian:" + "x" * 5000],
    ["qualify", "--base", "debian:bullseye", "--patched", "debian:bookworm", "--tests", "y" * 5000,
     "-o", "q"],
    ["qualify", "--base", "debian:bullseye", "--patched", "debian:bookworm", "--slots", "9" * 5000,
     "-o", "q"],
])
def test_a_5000_character_value_gives_a_short_error_line(tmp_path, argv):
    done = kvmlab(*argv, env={"KVMLAB_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(done)
    assert len(done.stderr.strip()) <= 600


def test_a_patch_that_is_a_fifo_is_refused_unread(tmp_path):
    patch = _fifo(tmp_path / "series.patch")
    done = kvmlab("kernel", "fetch", f"kvm-modules:debian:bookworm+{patch}",
                  env={"KVMLAB_CACHE": str(tmp_path / "cache")}, timeout=60)
    assert_one_line_error(done, "not a regular file or a directory of patches")
