"""Cutting calls into test loops and the base-vs-patched statistics, on plain data; ``kvmlab trace
report`` on runs whose files are damaged, alike or unreadable, on the lab's 5.10 sample."""

import json
import lzma
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, assert_one_line_error, kvmlab

from kvmlab.cli import main
from kvmlab.cli.qualify import _say
from kvmlab.qualify import report as qualify_report
from kvmlab.qualify.config import Config
from kvmlab.qualify.qualification import traced_runs
from kvmlab.qualify.store import Store
from kvmlab.stats import bootstrap_ratio
from kvmlab.trace_report import TracedRun, calls_file, distinct_labels, load_run
from traces import segments
from traces.profile import cross_check
from traces.tracedat import TraceFile


def print_events(*marks: tuple[int, str, dict]) -> pd.DataFrame:
    return pd.DataFrame([{"ts": ts, "comm": comm, "event": "print", "buf": "kvmlab " + json.dumps(payload)}
                         for ts, comm, payload in marks])


def test_calls_are_cut_into_loops_by_marks_and_comm():
    events = print_events(
        (100, "python3", {"edge": "begin", "phase": "loop", "test": "unmap", "slots": 10, "run": 0}),
        (200, "python3", {"edge": "end", "phase": "loop", "test": "unmap", "slots": 10, "run": 0}),
        (300, "python3", {"edge": "begin", "phase": "loop", "test": "unmap", "slots": 10, "run": 1}),
    )  # run 1 never ended: dropped
    loops = segments.intervals(segments.marks(events))
    assert loops[["test", "run", "begin_ts", "end_ts"]].values.tolist() == [["unmap", 0, 100, 200]]
    calls = pd.DataFrame({"function": ["f", "f", "f", "g"], "ts": [50, 150, 150, 199],
                          "duration_ns": [1, 2, 3, 4],
                          "comm": ["python3", "python3", "khugepaged", "python3"]})
    inside = segments.assign(calls, loops)
    assert inside["duration_ns"].tolist() == [2, 4]
    assert set(inside["loop_ns"]) == {100}


def test_bootstrap_sees_a_doubling_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.lognormal(7, 0.3, 400)
    ratio, low, high = bootstrap_ratio(base, 2 * rng.lognormal(7, 0.3, 400))
    assert 1.8 < low < ratio < high < 2.2
    ratio, low, high = bootstrap_ratio(base, rng.lognormal(7, 0.3, 400))
    assert low < 1 < high


def test_histogram_counts_are_checked_against_the_graph_calls_of_the_job():
    hist = pd.DataFrame({"function": ["f", "g"], "hits": [2, 1], "dropped": [0, 0],
                         "mean_ns": [10.0, 5.0], "p50_ns": [10.0, 5.0], "p99_ns": [10.0, 5.0]})
    calls = pd.DataFrame({"function": ["f", "f", "f"], "ts": [5, 15, 25], "duration_ns": [8, 12, 99]})
    table = cross_check(hist, calls, (10, 30)).set_index("function")
    assert table.loc["f", "graph_calls"] == 2 and table.loc["f", "graph_mean_ns"] == 55.5
    assert table.loc["g", "graph_calls"] == 0


# ---------------------------------------------------------------- kvmlab trace report on damaged runs

RELEASE = "5.10.0-32-cloud-amd64"
CAPTURE = {"set": "memslot-update", "release": RELEASE, "calibration": {"overhead_ns_per_call": 2000.0}}
QUALIFY_CONFIG = Config.from_json({"base": {"spec": "debian:bullseye", "exact": "x", "release": RELEASE},
                  "patched": {"spec": "kvm-modules:debian:bullseye+/src/v2/fix.patch", "exact": "y",
                              "release": RELEASE},
                  "tests": ["move active area"], "slots": [10], "runs": 2, "seconds": 0.5, "threshold": 0.02,
                  "cpus": 1, "trace": {"name": "memslot-update"}, "check_invariants": False})


@pytest.fixture(scope="module")
def bullseye() -> bytes:
    """The 5.10 sample (kselftest_py marks, a loop, the calibration) as trace-cmd wrote it."""
    return lzma.decompress((REPO / "traces" / "samples" / "bullseye-update-v6.dat.xz").read_bytes())


def run_dir(directory: Path, trace: bytes) -> Path:
    """The results of a ``kvmlab run --trace``: trace.dat and capture.json."""
    directory.mkdir(parents=True)
    (directory / "trace.dat").write_bytes(trace)
    (directory / "capture.json").write_text(json.dumps(CAPTURE))
    return directory


@pytest.fixture
def cli(capsys):
    """``kvmlab trace report ARGS`` in this process: its exit code, stdout and stderr.

    main() takes SIGINT and SIGTERM over for Ctrl-C; they are given back afterwards."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def run(*args: str) -> SimpleNamespace:
        code = main(["trace", "report", *args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    yield run
    for number, handler in saved.items():
        signal.signal(number, handler)


def test_partial_reports_the_intact_run_beside_one_with_damaged_headers(cli, tmp_path, bullseye):
    good, bad = run_dir(tmp_path / "good", bullseye), run_dir(tmp_path / "bad", bullseye[:300])
    out = tmp_path / "out"
    assert_one_line_error(cli(str(good), str(bad), "-o", str(out)),
                          f"{bad / 'trace.dat'}: truncated at offset 300")
    done = cli(str(bad), str(good), "--partial", "-o", str(out))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, done.stderr
    assert warnings[0].startswith(f"kvmlab: warning: {bad / 'trace.dat'}: truncated at offset 300")
    assert warnings[0].endswith("nothing of this run is reported")
    table = pd.read_csv(out / "latency.csv")
    assert set(table["kernel"]) == {RELEASE}
    assert table["calls"].sum() == len(load_run(good).calls) > 1000
    assert (out / "calls-good.csv").exists() and not (out / "calls-bad.csv").exists()


def test_qualify_keeps_its_trace_report_when_one_trace_is_damaged(tmp_path, bullseye, capsys):
    """qualify --trace reads every traced run partially: a cut trace.dat is named, a damaged
    capture.json left out with a warning, the rest reported under each side's spec."""
    store = Store.create(tmp_path / "q", QUALIFY_CONFIG)
    for number, (side, trace) in enumerate([("base", bullseye), ("patched", bullseye[:300]),
                                            ("patched", bullseye), ("base", bullseye)]):
        run_dir(store.directory / f"t{number}", trace)
        store.append({"kind": "run", "side": side, "test": "move active area", "slots": 10, "run": number,
                      "iteration_ns": 1e6, "iterations": 10, "slot_setup_ns": 1e6, "release": RELEASE,
                      "trace_dir": f"t{number}"})
    (store.directory / "t3" / "capture.json").write_text("{")
    text = "\n".join(qualify_report.trace_markdown(traced_runs(store, QUALIFY_CONFIG, _say)))
    assert "| base debian:bullseye | move active area |" in text
    assert "| patched kvm-modules:debian:bullseye+fix.patch | move active area |" in text
    assert f"- {store.directory / 't1' / 'trace.dat'}: truncated at offset 300" in text
    warning, = capsys.readouterr().err.splitlines()
    assert warning.startswith("kvmlab qualify: warning: trace of base move active area @10 run 3 left out")
    assert "capture.json" in warning


def headers_only(trace: bytes, scratch: Path) -> bytes:
    """The sample cut 8 bytes into its CPU data: headers whole, not one event."""
    path = scratch / "whole.dat"
    path.write_bytes(trace)
    return trace[:TraceFile.open(path).cpu_data[0][1] + 8]


@pytest.mark.parametrize("garbage", ["zeros", "random", "empty", "headers only"])
def test_partial_report_of_nothing_readable_is_one_error(cli, tmp_path, bullseye, garbage):
    content = {"zeros": lambda: bytes(100_000), "random": lambda: random.Random(1).randbytes(100_000),
               "empty": lambda: b"", "headers only": lambda: headers_only(bullseye, tmp_path)}[garbage]()
    run = run_dir(tmp_path / "run", content)
    assert_one_line_error(cli(str(run), "--partial", "-o", str(tmp_path / "out")),
                          "nothing could be read from any trace.dat", str(run / "trace.dat"))
    other = run_dir(tmp_path / "other", bytes(10))
    assert_one_line_error(cli(str(run), str(other), "--partial", "-o", str(tmp_path / "out")),
                          str(run / "trace.dat"), str(other / "trace.dat"))
    assert not (tmp_path / "out" / "latency.csv").exists()


def test_runs_in_directories_of_one_name_stay_apart(cli, tmp_path, bullseye):
    a, b = run_dir(tmp_path / "a" / "results", bullseye), run_dir(tmp_path / "b" / "results", bullseye)
    out = tmp_path / "out"
    done = cli(str(a), str(b), "-o", str(out))
    assert done.returncode == 0, done.stderr
    single = len(load_run(a).calls)
    table = pd.read_csv(out / "latency.csv")
    assert table.groupby("kernel")["calls"].sum().to_dict() == {
        f"{RELEASE} (a/results)": single, f"{RELEASE} (b/results)": single}
    assert [len(pd.read_csv(out / name)) for name in ("calls-a-results.csv", "calls-b-results.csv")] == [
        single, single]
    assert_one_line_error(cli(str(a), str(tmp_path / "a" / "." / "results"), "-o", str(out)),
                          f"{a} is given twice")


def test_labels_are_the_shortest_distinct_path_suffixes(tmp_path):
    directories = [tmp_path / "x" / "a" / "r", tmp_path / "y" / "a" / "r", tmp_path / "z" / "b" / "r",
                   tmp_path / "solo"]
    assert distinct_labels(directories) == ["x/a/r", "y/a/r", "b/r", "solo"]
    runs = [TracedRun(tmp_path, "k", {}, pd.DataFrame(), [], label=label) for label in ("a/b", "a-b", "c")]
    assert [calls_file(run, runs) for run in runs] == ["calls-a-b-1.csv", "calls-a-b-2.csv", "calls-c.csv"]


DAMAGED_FILES = [
    ("trace.dat", None, "cannot be read: not a regular file but a directory"),
    ("capture.json", None, "cannot be read: not a regular file but a directory"),
    ("capture.json", "{", "not JSON"),
    ("capture.json", "[]", "wants a JSON object, found list"),
    ("capture.json", '{"set": "memslot-update"}', "no 'release'"),
    ("capture.json", '{"release": 5.1}', "'release' wants the kernel release as a string, found 5.1"),
    ("capture.json", '{"release": "5.10", "calibration": 3}', "'calibration' wants an object, found int"),
    ("capture.json", '{"release": "5.10", "calibration": {"overhead_ns_per_call": "2"}}',
     "'calibration.overhead_ns_per_call' wants a number"),
    ("latency_hist.json", None, "cannot be read: not a regular file but a directory"),
    ("latency_hist.json", "hits: 3", "not JSON"),
    ("latency_hist.json", "[]", "wants an object of functions, found list"),
    ("latency_hist.json", '{"kvm_set_memslot": {"hits": 1}}',
     "kvm_set_memslot: wants an object with 'latencies'"),
    ("latency_hist.json", '{"f": {"latencies": [[900, "2"]]}}', "f: 'latencies' wants [[ns, count], ...]"),
    ("latency_hist.json", '{"f": {"latencies": [900, 2]}}', "f: 'latencies' wants [[ns, count], ...]"),
    ("latency_hist.json", '{"f": {"latencies": [], "dropped": -1}}', "f: 'dropped' wants a non-negative"),
]


@pytest.mark.parametrize("name, partial", [("trace.dat", False), ("trace.dat", True), ("capture.json", False),
                                           ("latency_hist.json", False)])
def test_a_fifo_for_a_run_file_is_refused_not_waited_on(tmp_path, bullseye, name, partial):
    """Nothing would ever write to the FIFO: reading it would block for ever. The report runs
    in a child process, so that the old hang fails the test instead of hanging it."""
    run = run_dir(tmp_path / "run", bullseye)
    path = run / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    done = kvmlab("trace", "report", str(run), "-o", str(tmp_path / "out"), *["--partial"] * partial,
                  timeout=60)
    if partial:  # the run is left out with a warning naming the FIFO, and then no run is left
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"{path}: cannot be read: not a regular file but a FIFO" in done.stderr
    else:
        assert_one_line_error(done, f"{path}: cannot be read: not a regular file but a FIFO")


@pytest.mark.parametrize("name, content, what", DAMAGED_FILES)
def test_damaged_run_files_are_one_error(cli, tmp_path, bullseye, name, content, what):
    run = run_dir(tmp_path / "run", bullseye)
    path = run / name
    path.unlink(missing_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    assert_one_line_error(cli(str(run), "-o", str(tmp_path / "out")), f"{path}: {what}")
