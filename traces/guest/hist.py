"""Function latencies aggregated by the kernel itself: kprobes and hist triggers.

A second way to time the probe set's functions, with no per-call event in the ring
buffer: for each function a kprobe and a kretprobe event; a hist trigger on the entry
saves the timestamp per thread, one on the return computes ``lat = now - saved`` and
emits a synthetic event, and a third trigger keeps a histogram of ``lat`` (exact
nanoseconds as keys) with a hit count per key. The kernel's own ``Hits``, ``Entries``
and ``Dropped`` lines say whether it kept up.

Runs in the guest (standard library only). Needs CONFIG_HIST_TRIGGERS,
CONFIG_SYNTH_EVENTS and CONFIG_KPROBE_EVENTS: Debian's 6.1 has them, its 5.10 has no
hist triggers, and ``unavailable()`` says so.
"""

from __future__ import annotations

import os
import re

from traces.guest import tracefs

GROUP = "kvmlab"
MAP_SIZE = 1 << 17  # the largest hist map the kernel allows
ENTRY = re.compile(r"^\{ lat:\s*(\d+) \} hitcount:\s*(\d+)", re.MULTILINE)
TOTALS = re.compile(r"^\s*(Hits|Entries|Dropped): (\d+)", re.MULTILINE)


def unavailable() -> str | None:
    """Why this kernel cannot do it, or None."""
    needs = (("kprobe_events", "CONFIG_KPROBE_EVENTS"), ("synthetic_events", "CONFIG_SYNTH_EVENTS"))
    for name, option in needs:
        if not os.path.exists(tracefs.path(name)):
            return f"no {name} in tracefs ({option} off)"
    if not os.path.exists(tracefs.path("events", "sched", "sched_switch", "hist")):
        return "no hist files in tracefs (CONFIG_HIST_TRIGGERS off)"
    return None


class LatencyHistograms:
    """Set up on ``start``, read with ``read``, taken down with ``remove`` (which undoes
    whatever ``start`` managed to set up, even after a failure half way).

    Adding or removing a dynamic (kprobe or synthetic) event makes the kernel clear
    the ring buffers: start before anything worth keeping is traced, remove only after
    the trace has been extracted.
    """

    def __init__(self, functions: list[str]):
        self.functions = functions
        self._undo: list[tuple[str, ...]] = []  # (tracefs path parts..., line), run in reverse

    def start(self) -> None:
        for index, function in enumerate(self.functions):
            entry, exit_, synthetic = f"e{index}", f"x{index}", f"kvmlab_lat{index}"
            self._add(("kprobe_events",), f"p:{GROUP}/{entry} {function}", f"-:{GROUP}/{entry}")
            self._add(("kprobe_events",), f"r:{GROUP}/{exit_} {function}", f"-:{GROUP}/{exit_}")
            self._add(("synthetic_events",), f"{synthetic} u64 lat", f"!{synthetic}")
            self._trigger(GROUP, entry, "hist:keys=common_pid:ts0=common_timestamp")
            self._trigger(GROUP, exit_, f"hist:keys=common_pid:lat=common_timestamp-$ts0:"
                                        f"onmatch({GROUP}.{entry}).trace({synthetic},$lat)")
            self._trigger("synthetic", synthetic, f"hist:keys=lat:vals=hitcount:sort=lat:size={MAP_SIZE}")

    def read(self) -> dict:
        """``{function: {"latencies": [[ns, count], ...], "hits", "entries", "dropped"}}``."""
        result = {}
        for index, function in enumerate(self.functions):
            text = tracefs.read("events", "synthetic", f"kvmlab_lat{index}", "hist")
            totals = {name.lower(): int(value) for name, value in TOTALS.findall(text)}
            result[function] = {"latencies": [[int(ns), int(n)] for ns, n in ENTRY.findall(text)], **totals}
        return result

    def remove(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                tracefs.append(*undo)
            except OSError:
                pass  # already gone: nothing to undo

    def _add(self, parts: tuple[str, ...], line: str, undo: str) -> None:
        tracefs.append(*parts, line)
        self._undo.append((*parts, undo))

    def _trigger(self, system: str, event: str, trigger: str) -> None:
        # a trigger soft-enables its event: nothing to switch on
        self._add(("events", system, event, "trigger"), trigger, "!" + trigger)
