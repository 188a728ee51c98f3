"""The function_graph calls table: one row per completed call, from ``funcgraph_exit``.

A call's own event is its exit: the kernel writes ``calltime`` (when the function was
entered) and ``rettime`` (when it returned) into the exit event, so a call needs no
matching with its entry event, and a call whose entry was lost or came before the
recording is still whole. Calls still running when recording stopped have an entry
but no exit, and are not in the table.

calltime and rettime are not on the events' clock. The kernel takes them with
``trace_clock_local()``, while event timestamps use the ring buffer's trace clock,
and on a guest whose sched_clock is unstable (the lab's TCG guests) the kernel
switches that to "global" at boot. On the lab's 6.1 samples calltime is 6 to 50 ms
*after* its entry event's ts, an offset that differs per run and drifts by a few ms
within one. So ``entry_ts``/``exit_ts`` only order calls among themselves, and
``duration_ns`` (rettime - calltime, both read on the CPU that ran the call) is not
the difference of the entry and exit events' ts; ``ts`` (the exit event's time) puts
a call on the timeline of the other events.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["COLUMNS", "calls"]

COLUMNS = ("function", "depth", "entry_ts", "duration_ns", "exit_ts", "ts", "cpu", "pid", "comm")
#: the table's dtypes when it has no rows, as a table with rows has them: numbers stay
#: numbers when an empty table (a trace with no calls) is concatenated with others
EMPTY_DTYPES = {"function": object, "depth": np.int64, "entry_ts": np.int64, "duration_ns": np.int64,
                "exit_ts": np.int64, "ts": np.int64, "cpu": np.int64, "pid": np.int64, "comm": object}


def calls(events: pd.DataFrame) -> pd.DataFrame:
    """The completed calls in ``events`` (a frame from :func:`traces.tracedat.read_events`).

    Columns: ``function`` (the name trace-cmd shows), ``depth`` (0: the outermost traced
    call), ``entry_ts`` (calltime, ns), ``duration_ns`` (rettime - calltime),
    ``exit_ts`` (rettime), ``ts`` (the exit event's time, on the events' clock), ``cpu``,
    ``pid``, ``comm``; one row per funcgraph_exit event, in the events' order.
    """
    if "event" not in events or "calltime" not in events:
        return pd.DataFrame({name: pd.Series(dtype=EMPTY_DTYPES[name]) for name in COLUMNS})
    exits = events[(events["event"] == "funcgraph_exit").to_numpy()]
    calltime = exits["calltime"].to_numpy(dtype=np.int64)
    rettime = exits["rettime"].to_numpy(dtype=np.int64)
    return pd.DataFrame({
        "function": exits["func_name"].to_numpy(),
        "depth": exits["depth"].to_numpy(dtype=np.int64),
        "entry_ts": calltime,
        "duration_ns": rettime - calltime,
        "exit_ts": rettime,
        "ts": exits["ts"].to_numpy(),
        "cpu": exits["cpu"].to_numpy(),
        "pid": exits["pid"].to_numpy(),
        "comm": exits["comm"].to_numpy(),
    })
