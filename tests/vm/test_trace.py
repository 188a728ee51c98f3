"""ftrace in the lab: memslot_perf recorded with a probe set, read back on the host and
checked against trace-cmd's own reading of the same file."""

import collections
import json
import re
import subprocess

import pandas as pd
import pytest
from conftest import kvmlab, kvmlab_retrying

from traces import profile, segments
from traces.calls import calls
from traces.tracedat import read_events

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaked_qemu")]

TESTS = ["unmap", "unmap chunked", "move active area"]


def report_exits(trace_dat) -> collections.Counter:
    """funcgraph_exit lines per function, as trace-cmd report prints them."""
    done = subprocess.run(["trace-cmd", "report", "-R", str(trace_dat)], capture_output=True, text=True,
                          check=True)
    return collections.Counter(re.findall(r"funcgraph_exit:\s+func=(\S+)", done.stdout))


def test_traced_memslot_perf(tmp_path):
    out = tmp_path / "results"
    done = kvmlab_retrying(
        "run", "debian:bookworm", "--trace", "memslot-lookup", "--trace-profile", "--out", str(out), "--",
        "python3", "-m", "kselftest_py.memslot_perf", "-s", "10", "-f", "1", "-e", "3", "-l", "1",
        "--unmap-size-mib", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    capture = json.loads((out / "capture.json").read_text())
    assert "kvm_mmu_page_fault" in capture["functions"]
    assert "kvm_handle_hva_range" in capture["skipped_functions"]  # the 5.10 name, absent in 6.1
    skipped = [line for line in done.stderr.splitlines() if "not in this kernel: " in line]
    assert len(skipped) == 1 and "kvm_handle_hva_range" in skipped[0], done.stderr[-3000:]
    calibration = capture["calibration"]
    assert calibration["function"] in capture["functions"] or calibration["function"] == "__do_sys_getppid"
    assert calibration["overhead_ns_per_call"] > 0

    events = read_events(out / "trace.dat")
    table = calls(events)
    assert len(table) > 100
    assert collections.Counter(table["function"]) == report_exits(out / "trace.dat")

    # nothing lost: every getppid() of the calibration loop was recorded, every mark too
    window = segments.intervals(segments.marks(events), "calibration")
    assert len(window) == 1
    timed = table[table["function"].astype(str).str.contains("getppid")
                  & table["ts"].between(window["begin_ts"].iloc[0], window["end_ts"].iloc[0])]
    assert len(timed) == calibration["calls"]

    loops = segments.intervals(segments.marks(events), "loop")
    assert sorted(loops["test"]) == sorted(TESTS)
    inside = segments.assign(table, loops)
    assert set(inside["test"]) == set(TESTS)
    assert (inside["comm"] == "python3").all()

    # the kernel's own histograms (kprobes + hist triggers) count the same calls
    job = segments.intervals(segments.marks(events), "job")
    checked = profile.cross_check(profile.read_hist(out / "latency_hist.json"), table,
                                  (int(job["begin_ts"].iloc[0]), int(job["end_ts"].iloc[0])))
    busy = checked[checked["graph_calls"] >= 100]
    assert len(busy) >= 3, checked
    assert ((busy["hits"] - busy["graph_calls"]).abs() <= 0.02 * busy["graph_calls"]).all(), busy

    report = kvmlab("trace", "report", str(out), "-o", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "| move active area | 10 | kvm_mmu_page_fault |" in report.stdout
    assert "kernel latency histograms (kprobes + hist triggers) vs function_graph" in report.stdout
    latency = pd.read_csv(tmp_path / "report" / "latency.csv")
    assert (latency["tracer_floor_ns"] > 0).all() and (latency["tracer_overhead_ns"] > 0).all()
    assert (tmp_path / "report" / "latency-kvm_mmu_page_fault.png").exists()


def test_probe_set_matching_nothing_is_an_error(tmp_path):
    probe_set = tmp_path / "nothing.toml"
    probe_set.write_text('functions = ["kvmlab_no_such_function"]\n')
    done = kvmlab("run", "debian:bookworm", "--trace", str(probe_set), "--out", str(tmp_path / "r"),
                  "--", "true")
    assert done.returncode == 2, done.stderr
    assert "probe set nothing matches nothing in kernel 6.1" in done.stderr
