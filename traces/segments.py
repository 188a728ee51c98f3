"""Cut a traced run into the tests that ran in it, using the marks they left.

kselftest_py writes ``kvmlab {json}`` lines to ftrace's ``trace_marker`` at the begin
and end of each test phase (``kselftest_py.trace_marker``); they come back as
``ftrace:print`` events. A call belongs to a test's loop when it returned inside the
loop's [begin, end] and was made by the test's own threads (the comm of the process
that wrote the marks: kernel threads such as khugepaged also hit the MMU notifiers
but are not the test).

The time compared is the call's exit event's timestamp (``ts``), on the trace clock
like the marks. Not its calltime: function_graph stamps calltime and rettime with the
local clock, and on these TCG guests the kernel switches the trace clock to "global"
at boot (unstable TSC), so calltime is tens of ms off the marks.
"""

from __future__ import annotations

import json

import pandas as pd
from kvmlab_guest.protocol import MARK_PREFIX as PREFIX

LABELS = ["test", "slots", "run"]


def marks(events: pd.DataFrame) -> pd.DataFrame:
    """Every kvmlab mark: ts, comm, edge, phase and the labels it carried."""
    if "buf" not in events.columns:
        return pd.DataFrame(columns=["ts", "comm", "edge", "phase", *LABELS])
    printed = events[(events["event"] == "print") & events["buf"].astype(str).str.startswith(PREFIX)]
    rows = []
    for ts, comm, text in zip(printed["ts"], printed["comm"], printed["buf"], strict=True):
        try:
            payload = json.loads(str(text)[len(PREFIX):].strip())
        except json.JSONDecodeError:
            continue
        rows.append({"ts": int(ts), "comm": comm, **payload})
    return pd.DataFrame(rows, columns=None if rows else ["ts", "comm", "edge", "phase", *LABELS])


def intervals(marked: pd.DataFrame, phase: str = "loop") -> pd.DataFrame:
    """[begin, end] of each run of ``phase``, with its labels; an unfinished one is dropped
    (its end mark never came: the test crashed or the trace was cut)."""
    rows = []
    chosen = marked[marked["phase"] == phase] if len(marked) else marked
    open_marks: dict[tuple, dict] = {}
    for mark in chosen.to_dict("records"):
        key = tuple(None if pd.isna(mark.get(label)) else mark.get(label) for label in LABELS)
        if mark["edge"] == "begin":
            open_marks[key] = mark
        elif mark["edge"] == "end" and key in open_marks:
            begin = open_marks.pop(key)
            rows.append({**{label: begin.get(label) for label in LABELS}, "comm": begin["comm"],
                         "begin_ts": begin["ts"], "end_ts": mark["ts"],
                         "iterations": mark.get("iterations")})
    return pd.DataFrame(rows, columns=[*LABELS, "comm", "begin_ts", "end_ts", "iterations"])


def window(marked: pd.DataFrame, phase: str) -> tuple[int, int] | None:
    """[begin, end] of the first finished ``phase`` (the capture's "job", "calibration")."""
    found = intervals(marked, phase)
    if found.empty:
        return None
    return int(found["begin_ts"].iloc[0]), int(found["end_ts"].iloc[0])


def assign(calls: pd.DataFrame, loops: pd.DataFrame) -> pd.DataFrame:
    """``calls`` that returned inside a test loop, made by the test's threads, with the
    loop's labels."""
    parts = []
    for loop in loops.to_dict("records"):
        inside = calls[(calls["ts"] >= loop["begin_ts"]) & (calls["ts"] <= loop["end_ts"])
                       & (calls["comm"] == loop["comm"])]
        parts.append(inside.assign(**{label: loop[label] for label in LABELS},
                                   loop_ns=loop["end_ts"] - loop["begin_ts"]))
    if not parts:
        return calls.iloc[0:0].assign(**{label: None for label in LABELS}, loop_ns=0)
    return pd.concat(parts, ignore_index=True)
