"""Cutting calls into test loops, and the base-vs-patched statistics, on plain data."""

import json

import numpy as np
import pandas as pd

from kvmlab.stats import bootstrap_ratio
from traces import segments
from traces.profile import cross_check


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
