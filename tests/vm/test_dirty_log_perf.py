"""dirty_log_perf inside the lab: 1 and 64 memslots, 1 and 2 vCPUs, with and without
manual protect, on 5.10 and 6.1; and a page missing from the dirty log fails the test."""

import json

import pytest
from conftest import kvmlab_retrying

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaked_qemu")]

STALLED = "stopped responding"
#: Small enough for a few guest seconds a run under nested TCG (16 MiB: 4096 pages a vCPU).
SIZE = "16M"
CASES = [(1, 1), (64, 1), (1, 2), (64, 2)]  # (memslots, vCPUs)


def _stalled(done) -> bool:
    return done.returncode == 124 and STALLED in done.stderr


def _command(name: str, *args: str) -> str:
    return f"python3 -m kselftest_py.dirty_log_perf -b {SIZE} {' '.join(args)} --json /results/{name}.json"


def _figures_are_positive(report: dict, iterations: int, manual: bool) -> None:
    assert report["result"] == "pass" and report["exit_code"] == 0, report
    assert report["iterations"] == iterations
    assert report["populate_ns"] > 0
    assert report["enable_dirty_logging_ns"] > 0 and report["disable_dirty_logging_ns"] > 0
    for name in ("dirty_memory_ns", "get_dirty_log_ns"):
        assert len(report[name]) == iterations and all(ns > 0 for ns in report[name]), (name, report[name])
    assert len(report["clear_dirty_log_ns"]) == (iterations if manual else 0)
    assert all(ns > 0 for ns in report["clear_dirty_log_ns"])
    assert report["manual_protect"] is manual
    # every page written is in the bitmap each iteration (the test checks it; the count says so too)
    assert report["dirty_pages"] == [report["pages"]] * iterations
    assert len(report["vcpu_run_ns"]) == report["vcpus"]


@pytest.mark.parametrize("spec", ["debian:bullseye", "debian:bookworm"])
def test_runs_and_reports_every_figure(spec, tmp_path):
    """Four slot and vCPU counts with manual protect, and one without (-g, 3 iterations): one boot."""
    commands = [_command(f"x{slots}-v{vcpus}", "-x", str(slots), "-v", str(vcpus)) for slots, vcpus in CASES]
    commands.append(_command("no-manual", "-g", "-i", "3", "-x", "64"))
    script = "; ".join(f"{command} || exit $?" for command in commands)
    done = kvmlab_retrying("run", spec, "--timeout", "600", "--out", str(tmp_path), "--", "sh", "-c", script,
                           retry_if=_stalled, timeout=720)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.count("ok 1 dirty_log_perf") == len(commands)
    for slots, vcpus in CASES:
        report = json.loads((tmp_path / f"x{slots}-v{vcpus}.json").read_text())
        assert (report["slots"], report["vcpus"], report["bytes_per_vcpu"]) == (slots, vcpus, 16 << 20)
        assert report["manual_protect_caps"] == 3
        _figures_are_positive(report, 2, manual=True)
    report = json.loads((tmp_path / "no-manual.json").read_text())
    _figures_are_positive(report, 3, manual=False)
    assert "Get dirty log over 3 iterations took" in done.stdout
    assert "Clear dirty log over 2 iterations took" in done.stdout


def test_a_page_missing_from_the_dirty_log_fails(tmp_path):
    """A guest that skips a page: with manual protect its bit is still set from the initial
    all-set bitmap in iteration 1, so the check fails in iteration 2; without, in iteration 1."""
    script = "; ".join([_command("manual", "--inject-missing-page"),
                        _command("plain", "-g", "--inject-missing-page")])
    done = kvmlab_retrying("run", "debian:bookworm", "--out", str(tmp_path), "--", "sh", "-c", script,
                           retry_if=_stalled)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.count("not ok 1 dirty_log_perf") == 2
    for name, iteration in (("manual", 2), ("plain", 1)):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["result"] == "fail" and report["exit_code"] == 1
        assert report["reason"] == (f"Iteration {iteration}: 1 page(s) the guest wrote are not in the dirty "
                                    f"log: slot 1 page 4095 (gpa 0x10fff000)")
