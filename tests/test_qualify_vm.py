"""kvmlab qualify in the lab: a real A/B of Debian's 5.10 (memslot array) against 6.1
(memslot trees), a kernel against itself, and the store surviving a killed guest and a
killed qualify."""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter

import pytest
from conftest import REPO, kvmlab

from kvmlab import cache, stats
from kvmlab.qualify import analysis
from kvmlab.qualify.store import Store

pytestmark = pytest.mark.vm

REPORT_FILES = (
    "qualify.json",
    "runs.jsonl",
    "report.md",
    "report.html",
    "junit.xml",
    "report.ktap",
    "runs.csv",
)


def _run_keys(out) -> Counter:
    return Counter(
        (r["side"], r["test"], r["slots"], r["run"]) for r in Store(out).records() if r["kind"] == "run"
    )


def test_bullseye_against_bookworm(tmp_path, no_leaked_qemu):
    """The issue's small qualify, with 6 runs a side instead of 4: 4 reach p < 0.05 only
    when no run of one kernel overlaps the other's, and under TCG a slow run broke that
    for unmap chunked at 509 slots in 2 of 7 hand and CI runs; 6 tolerate a few."""
    out = tmp_path / "q"
    matrix = ["--tests", "unmap,unmap-chunked", "--slots", "10,509", "--runs", "6", "--seconds", "2"]
    kernels = ["--base", "debian:bullseye", "--patched", "debian:bookworm"]
    done = kvmlab("qualify", *kernels, *matrix, "-o", str(out), timeout=1500)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "plots").glob("*.png"))) == 3  # unmap, unmap chunked, slot setup
    keys = _run_keys(out)
    assert len(keys) == 2 * 2 * 2 * 6 and set(keys.values()) == {1}

    store = Store(out)
    result = analysis.analyse(store.config, store.records())
    cells = {(cell.test, cell.slots): cell for cell in result.cells}
    # The seed's direction, which TCG reproduces for the 2 MiB unmaps (25-45 % faster);
    # plain unmap at 509 slots stays within TCG's noise (README).
    assert cells[("unmap chunked", 509)].verdict == stats.IMPROVED
    assert cells[("unmap", 509)].comparison is not None
    assert "509 slots in use:" in done.stdout and "| Unmap chunked |" in done.stdout
    assert done.returncode == result.exit_code

    suite = ET.parse(out / "junit.xml").getroot()
    assert int(suite.get("tests")) == len(result.cells) == 6
    assert int(suite.get("failures")) == len(result.regressions)
    ktap = (out / "report.ktap").read_text().splitlines()
    assert ktap[:2] == ["KTAP version 1", "1..6"]
    assert "data:image/png;base64," in (out / "report.html").read_text()


def _wait_for_runs(out, count: int, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs_path = out / "runs.jsonl"
        if runs_path.exists() and runs_path.read_text().count('"kind": "run"') >= count:
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.5)
    raise AssertionError(f"no {count} runs recorded in {timeout} s")


def _qemu_of(boot: str) -> int:
    return json.loads((cache.area("runs") / boot / "run.json").read_text())["qemu_pid"]


def test_self_qualify_survives_a_dead_guest_and_a_killed_qualify(tmp_path, no_leaked_qemu):
    """bookworm against itself: no significant change anywhere, even after its guest was
    killed mid-run and qualify itself was killed and resumed."""
    out = tmp_path / "q"
    args = [
        "qualify",
        "--base",
        "debian:bookworm",
        "--patched",
        "debian:bookworm",
        "--tests",
        "unmap-chunked",
        "--slots",
        "10,509",
        "--runs",
        "4",
        "--seconds",
        "1",
        "-o",
        str(out),
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmlab.cli", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ,
    )
    try:
        _wait_for_runs(out, 3, process)
        patched_boot = next(r["boot"] for r in Store(out).records() if r["side"] == "patched")
        os.kill(_qemu_of(patched_boot), signal.SIGKILL)  # the guest vanishes mid-matrix
        _wait_for_runs(out, 8, process)
        process.kill()  # and qualify itself dies without a word
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    before = (out / "runs.jsonl").read_bytes()
    crashes = [r for r in Store(out).records() if r["kind"] == "crash"]
    assert crashes and crashes[0]["outcome"] == "lost" and crashes[0]["side"] == "patched"
    assert "QEMU ended" in crashes[0]["message"]
    assert len(_run_keys(out)) < 16

    done = kvmlab("qualify", "--resume", "-o", str(out), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert (out / "runs.jsonl").read_bytes().startswith(before), "resume rewrote finished records"
    keys = _run_keys(out)
    assert len(keys) == 2 * 2 * 4 and set(keys.values()) == {1}, keys
    assert "resuming:" in done.stderr
    store = Store(out)
    result = analysis.analyse(store.config, store.records())
    assert [cell.verdict for cell in result.cells] == [stats.NO_CHANGE] * 4, done.stdout
    assert "guest lost during patched" in done.stdout
