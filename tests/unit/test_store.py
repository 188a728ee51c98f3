"""The qualification store refuses what it did not write: damaged, foreign or doubled
records, a damaged qualify.json, a second writer, and resume options it cannot honour."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error, kvmlab

from kvmlab.errors import KvmlabError
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store
from kvmlab.vm import emulator

CONFIG = {
    "base": {"spec": "debian:bullseye", "exact": "x", "release": "5.10"},
    "patched": {"spec": "debian:bookworm", "exact": "y", "release": "6.1"},
    "tests": ["unmap"],
    "slots": [10],
    "runs": 3,
    "seconds": 0.5,
    "threshold": 0.02,
    "trace": None,
    "check_invariants": False,
    "append": "",
    "clock": "icount",
    "emulator": {"version": "10.0.2", "package": "qemu-system-x86 1:10.0.2+ds-2+deb13u1~bpo12+1"},
}
RUN = {"kind": "run", "side": "base", "test": "unmap", "slots": 10, "run": 0, "iteration_ns": 1500.0,
       "iterations": 20, "slot_setup_ns": 40000.0, "release": "5.10.0-32-cloud-amd64"}


def _store_with(tmp_path, *lines: str) -> Store:
    store = Store.create(tmp_path / "q", Config.from_json(CONFIG))
    store.runs_path.write_text("".join(line + "\n" for line in lines))
    store.release()  # the kvmlab processes a test starts write here
    return store


@pytest.mark.parametrize("line, complaint", [
    ("[1, 2]", "a record is a JSON object, found list"),
    ("null", "found NoneType"),
    (json.dumps({k: v for k, v in RUN.items() if k != "kind"}), "a record without 'kind'"),
    (json.dumps({**RUN, "kind": "runn"}), "unknown record kind 'runn'"),
    (json.dumps({**RUN, "side": "left"}), "'side' is 'left'"),
    (json.dumps({k: v for k, v in RUN.items() if k != "iteration_ns"}), "run record without 'iteration_ns'"),
    (json.dumps({**RUN, "iteration_ns": "fast"}), "'iteration_ns' wants a time in ns or null, found 'fast'"),
    (json.dumps({**RUN, "iteration_ns": 0}), "'iteration_ns' wants a time in ns or null, found 0"),
    (json.dumps({**RUN, "run": -1}), "'run' wants an integer of at least 0, found -1"),
    ('{"kind": "crash", "side": "base", "test": null, "slots": null, "run": null, "outcome": "hang"}',
     "crash record without 'message'"),
    ('{"kind": "checks", "side": "base", "test": null, "slots": null, "run": null, "checks": 3}',
     "checks record without 'max_slots'"),
    ('{"kind": "run", "n": ' + "9" * 5000 + "}", "not a JSON record"),
    (json.dumps({**RUN, "slots": True}), "'slots' wants an integer, found True"),
    ('{"kind": "crash", "side": "base", "test": null, "slots": null, "run": null}',
     "crash record without 'outcome'"),
])
def test_a_record_kvmlab_did_not_write_is_named_by_its_line(tmp_path, line, complaint):
    store = _store_with(tmp_path, json.dumps(RUN), line)
    with pytest.raises(KvmlabError, match=r"runs.jsonl:2: ") as raised:
        store.records()
    assert complaint in str(raised.value)


def test_a_second_result_for_one_run_is_refused(tmp_path):
    crash = {"kind": "crash", "side": "base", "test": "unmap", "slots": 10, "run": 1, "outcome": "hang",
             "message": "no heartbeat for 20 s"}
    other_run = {**RUN, "run": 1}
    store = _store_with(tmp_path, json.dumps(RUN), json.dumps(crash), json.dumps(other_run))
    assert len(store.records()) == 3  # a crash and then the run that worked: one result
    store.append({**RUN, "iteration_ns": 1600.0})
    with pytest.raises(KvmlabError, match=r"runs.jsonl:4: a second result for base unmap @10 run 0 "
                                          r"\(the first is line 1\): were two processes writing"):
        store.records()


def test_a_record_cut_short_by_a_kill_does_not_block_resume(tmp_path):
    """The torn tail is no record: reading skips it, and resume drops it (it used to refuse)."""
    store = _store_with(tmp_path, json.dumps(RUN))
    qemu = emulator.choose()  # the resume checks the QEMU first: this host's, then
    _with(store.config_path, {"emulator": {"version": qemu.version, "package": qemu.package}})
    with open(store.runs_path, "a") as handle:
        handle.write(json.dumps({**RUN, "run": 1})[:50])
    assert store.records() == [RUN]
    done = kvmlab("qualify", "--resume", "-o", str(store.directory))
    assert_one_line_error(done, "unknown kernel spec 'x'")  # past every check of the store, to the kernels
    assert store.runs_path.read_text() == json.dumps(RUN) + "\n"  # and the torn tail is gone


def test_a_second_skip_for_one_cell_is_refused(tmp_path):
    skip = {"kind": "skip", "side": "patched", "test": "unmap", "slots": 10, "run": 0, "reason": "too many"}
    store = _store_with(tmp_path, json.dumps(skip), json.dumps({**skip, "run": 2}))
    with pytest.raises(KvmlabError, match=r"runs.jsonl:2: a second result for patched unmap @10 \(n/a\)"):
        store.records()


OPEN_STORE = "import sys, time; from pathlib import Path; from kvmlab.qualify.store import Store; " \
             "Store.open(Path(sys.argv[1])); print('held', flush=True); time.sleep(float(sys.argv[2]))"


def test_one_writer_per_directory(tmp_path):
    _store_with(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", OPEN_STORE, str(tmp_path / "q"), "60"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = kvmlab("qualify", "--resume", "-o", str(tmp_path / "q"))
        assert_one_line_error(done, "is being written by another kvmlab qualify", f"(pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    other = subprocess.run([sys.executable, "-c", OPEN_STORE, str(tmp_path / "q"), "0"],
                           cwd=REPO, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr  # the lock went with its process


def _with(path, fields: dict) -> None:
    path.write_text(json.dumps({**CONFIG, **fields}))


@pytest.mark.parametrize("damage, complaint", [
    (lambda path: path.write_text('{"base": '), "is damaged: Expecting value"),
    (lambda path: path.write_text("[]"), "is damaged: a JSON object is expected, found list"),
    (lambda path: path.write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "runs"})),
     "is damaged: no 'runs'"),
    (lambda path: path.write_text(json.dumps({**CONFIG, "slots": "10,100"})),
     "'slots' wants a list of slot counts from 2 to 1048576, each once, found '10,100'"),
    (lambda path: path.write_text(json.dumps({**CONFIG, "base": "debian:bullseye"})),
     "'base' wants the kernel's spec and exact spec"),
    (lambda path: (path.unlink(), path.mkdir()), "not a regular file (a directory)"),
    (lambda path: _with(path, {"runs": 0}), "'runs' wants an integer from 2 to 1000"),
    (lambda path: _with(path, {"slots": [-5, 0]}), "'slots' wants a list of slot counts"),
    (lambda path: path.write_text(json.dumps({**CONFIG, "threshold": -1})), "'threshold' wants a fraction"),
    (lambda path: _with(path, {"seconds": -1}), "'seconds' wants a positive number"),
    (lambda path: _with(path, {"clock": "sundial"}), "'clock' wants icount or wall"),
    (lambda path: path.write_text(json.dumps({**CONFIG, "emulator": "abc"})), "'emulator' wants an object"),
    (lambda path: path.write_text(json.dumps({**CONFIG, "tests": ["bogus"]})), "unknown test 'bogus'"),
])
def test_a_damaged_qualify_json_refuses_resume_and_changes_nothing(tmp_path, damage, complaint):
    store = _store_with(tmp_path, json.dumps(RUN))
    damage(store.config_path)
    before = store.runs_path.read_bytes()
    done = kvmlab("qualify", "--resume", "-o", str(store.directory))
    assert_one_line_error(done, "qualify.json", complaint)
    assert store.runs_path.read_bytes() == before


def test_a_lock_that_is_a_symlink_is_refused_in_one_line(tmp_path):
    store = _store_with(tmp_path, json.dumps(RUN))
    (store.directory / ".lock").unlink(missing_ok=True)
    (store.directory / ".lock").symlink_to(".lock")
    assert_one_line_error(kvmlab("qualify", "--resume", "-o", str(store.directory)), ".lock: cannot lock it")


def test_resume_refuses_records_outside_its_matrix(tmp_path):
    store = _store_with(tmp_path, json.dumps(RUN), json.dumps({**RUN, "run": 7}))
    done = kvmlab("qualify", "--resume", "-o", str(store.directory))
    assert_one_line_error(done, "runs.jsonl:2: ", "outside this qualification's matrix")


def test_resume_refuses_a_damaged_record_before_anything_boots(tmp_path):
    store = _store_with(tmp_path, json.dumps(RUN), json.dumps({**RUN, "kind": "measure"}))
    done = kvmlab("qualify", "--resume", "-o", str(store.directory))
    assert_one_line_error(done, "runs.jsonl:2: unknown record kind 'measure'")


@pytest.mark.parametrize("option", [
    ["--trace", "memslot-lookup"], ["--check-invariants"], ["--append", "kvm.tdp_mmu=0"], ["--accel", "kvm"],
    ["--base-append", "kvm.tdp_mmu=0"], ["--patched-append", "kvm.tdp_mmu=0"], ["--setup-budget", "60"]])
def test_resume_refuses_options_that_change_what_is_measured(tmp_path, option):
    store = _store_with(tmp_path, json.dumps(RUN))
    before = store.runs_path.read_bytes()
    done = kvmlab("qualify", "--resume", *option, "-o", str(store.directory))
    assert_one_line_error(done, f"--resume: {option[0]} differ")
    assert store.runs_path.read_bytes() == before


def test_resume_refuses_a_threshold_that_is_no_fraction(tmp_path):
    store = _store_with(tmp_path, json.dumps(RUN))
    assert_one_line_error(kvmlab("qualify", "--resume", "--threshold", "nan", "-o", str(store.directory)),
                          "--threshold wants a fraction")


def test_out_that_is_a_file_is_refused_before_anything_is_fetched(tmp_path):
    (tmp_path / "results").write_text("my notes\n")
    done = kvmlab("qualify", "--base", "debian:bullseye", "--patched", "debian:bookworm",
                  "-o", str(tmp_path / "results"), env={"KVMLAB_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(done, "results: not a directory")
    assert (tmp_path / "results").read_text() == "my notes\n"
    assert not os.path.exists(tmp_path / "cache" / "kernels")
