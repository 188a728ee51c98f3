"""The kernel's own latency histograms beside function_graph: a second opinion, same run.

``kvmlab run --trace SET --trace-profile`` also times the set's functions with kprobes
and hist triggers aggregated in the kernel (``traces.guest.hist``), saved as
latency_hist.json. No per-call event reaches the ring buffer, so the hit counts check
function_graph's (they must agree for calls that began inside the job), and the
durations, measured by a different mechanism with its own cost (a kprobe and a
kretprobe per call), bracket what function_graph reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from traces.errors import TraceError, read_json


def read_hist(path: Path) -> pd.DataFrame:
    """latency_hist.json as function, hits, mean_ns, p50_ns, p99_ns and the kernel's
    own ``dropped`` count (histogram entries it had no room for).

    TraceError, naming the file and what is wrong, when it is not what
    ``traces.guest.hist`` writes: the report must say so in a line, not crash."""
    rows = []
    for function, (pairs, dropped) in _load_hist(path).items():
        latencies, counts = pairs[:, 0], pairs[:, 1]
        hits = int(counts.sum())
        row = {"function": function, "hits": hits, "dropped": dropped,
               "mean_ns": float((latencies * counts).sum() / hits) if hits else np.nan}
        cumulative = np.cumsum(counts)
        for quantile in (50, 99):
            row[f"p{quantile}_ns"] = float(latencies[np.searchsorted(cumulative, hits * quantile / 100)]) \
                if hits else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["function", "hits", "dropped", "mean_ns", "p50_ns", "p99_ns"])


def _load_hist(path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Per function, its (latency ns, count) pairs as an n × 2 array and its dropped count."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise TraceError(f"{path}: wants an object of functions, found {type(data).__name__}")
    return {function: _function_hist(path, function, entry) for function, entry in data.items()}


def _function_hist(path: Path, function: str, entry) -> tuple[np.ndarray, int]:
    if not isinstance(entry, dict) or "latencies" not in entry:
        raise TraceError(f"{path}: {function}: wants an object with 'latencies', found {_short(entry)}")
    latencies = entry["latencies"]
    if not isinstance(latencies, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(_count(v) for v in pair) for pair in latencies):
        raise TraceError(f"{path}: {function}: 'latencies' wants [[ns, count], ...] of non-negative "
                         f"integers, found {_short(latencies)}")
    dropped = entry.get("dropped", 0)
    if not _count(dropped):
        raise TraceError(f"{path}: {function}: 'dropped' wants a non-negative integer, "
                         f"found {_short(dropped)}")
    return np.array(latencies, dtype=float).reshape(-1, 2), dropped


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def cross_check(hist: pd.DataFrame, calls: pd.DataFrame, job: tuple[int, int]) -> pd.DataFrame:
    """Per function: the kernel's hits and mean against function_graph's calls that returned
    inside the job's [begin, end] (by exit event time, see ``traces.segments``; the
    histograms cover the job, give or take the capture's own few lines around it)."""
    begin, end = job
    inside = calls[(calls["ts"] >= begin) & (calls["ts"] <= end)]
    graph = inside.groupby("function")["duration_ns"].agg(graph_calls="count", graph_mean_ns="mean")
    table = hist.set_index("function").join(graph, how="left").reset_index()
    table["graph_calls"] = table["graph_calls"].fillna(0).astype(int)
    table["mean_ratio"] = table["mean_ns"] / table["graph_mean_ns"]
    return table
