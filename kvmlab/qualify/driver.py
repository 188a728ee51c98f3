"""Run a qualification's matrix in ``jobs`` lanes at once, each run recorded as it ends.

A lane (``lane.Lane``) is a pair of guests, one per kernel, taking turns. Lanes pull
units of work (``matrix.units``) from one queue in the plan's order. Under the wall
clock a unit is a whole cell, so both kernels of a cell share one pair of guests and
one quiet host, and drift in its speed falls on both alike; parallel lanes disturb
each other's timing (qualify says so). Under the instruction clock (icount) a run's
result does not depend on how busy the host is, so ``--jobs N`` runs N lanes side by
side; a unit is one guest's worth (one run restored from its round's template, or with
``--fresh-boot`` one kernel's row of one round, booted afresh), closed after it, so that
every guest runs the same runs whatever N is.

Lanes run in threads: their work is waiting on guests. Ctrl-C reaches the main thread,
which kills every lane's QEMU; runs cut short that way are not recorded.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import Counter

from kvmlab import durations
from kvmlab.kernels.model import Kernel
from kvmlab.qualify import completion, matrix
from kvmlab.qualify.lane import CHECK_EVERY_S, Lane
from kvmlab.qualify.records import CONDITIONS, Record
from kvmlab.qualify.store import Share, Store
from kvmlab.vm.boot import Machine
from kvmlab.vm.guest import Guest

__all__ = ["CHECK_EVERY_S", "Driver", "default_jobs"]

#: What one lane's two guests hold of the host's memory at most (4 GiB each, touched
#: lazily: a memslot_perf guest at 32764 slots stays under 1 GiB resident).
LANE_MEMORY_MB = 2 * 1024


def default_jobs(clock: str) -> int:
    """Lanes for this host: one per core under icount (a lane keeps one core busy), as
    memory allows; one under the wall clock, where parallel runs disturb each other."""
    if clock != matrix.ICOUNT:
        return 1
    cores = len(os.sched_getaffinity(0))
    memory_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    return max(1, min(cores, int(memory_mb * 0.75) // LANE_MEMORY_MB))


class Driver:
    def __init__(self, store: Store, kernels: dict[str, Kernel], session_options: dict,
                 check_invariants: bool = False, jobs: int = 1, log=sys.stderr, guests=Guest,
                 machine: Machine | None = None):
        """``guests``: makes a lane's guests, called as ``Guest`` is (the unit tests give a
        fake); ``machine``: the accelerator, QEMU and clock every guest runs under."""
        self.store, self.kernels, self.log = store, kernels, log
        self._guests, self.machine = guests, machine
        self.config = store.config
        self.workload = store.workload
        self.session_options = session_options
        self.check_invariants = check_invariants
        self.jobs = jobs
        self.per_round = self.config.boot_per_round
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._crashes: Counter = Counter()
        self._not_applicable: set[Share] = set()
        self._conditions_known: set[str] = set()
        self._done_now = self._begun = 0
        self._started = 0.0
        self._total = self._before = self._todo = 0

    # -- the matrix -------------------------------------------------------------------
    def run(self) -> None:
        config = self.config
        items = completion.items(config, rounds_first=self.per_round)
        records = self.store.records()
        done = completion.Completion.of(records, self.workload.axis.name)
        self._crashes, self._not_applicable = done.crashes, done.not_applicable
        self._conditions_known = {r["template"] for r in records
                                  if r["kind"] == CONDITIONS and r.get("template")}
        todo = [item for item in items if not done.is_done(item)]
        self._total, self._before, self._todo = len(items), len(items) - len(todo), len(todo)
        if self._before:
            self.say(f"resuming: {self._before} of {len(items)} runs already in {self.store.runs_path}")
        units = matrix.units(todo, by_cell=not self.per_round, restored=not config.fresh_boot)
        self.jobs = jobs = max(1, min(self.jobs, len(units)))
        if jobs > 1 and not self.per_round:
            self.say(f"warning: {jobs} lanes under the wall clock disturb each other's timing; "
                     "each cell's two kernels still share one pair of guests")
        self._started = time.monotonic()
        work: queue.SimpleQueue = queue.SimpleQueue()
        for unit in units:
            work.put(unit)
        lanes = [Lane(self, number) for number in range(jobs)]
        if jobs == 1:
            self._work(lanes[0], work)
        else:
            self._run_lanes(lanes, work)

    def _run_lanes(self, lanes: list[Lane], work: queue.SimpleQueue) -> None:
        failures: list[BaseException] = []
        threads = [threading.Thread(target=self._work, args=(lane, work, failures),
                                    name=f"lane-{lane.number}", daemon=True) for lane in lanes]
        for thread in threads:
            thread.start()
        try:
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(0.2)
                if failures and not self.stopping.is_set():
                    self._stop(lanes)
        except KeyboardInterrupt:
            self._stop(lanes)
            for thread in threads:
                thread.join(30)
            raise
        if failures:
            raise failures[0]

    def _stop(self, lanes: list[Lane]) -> None:
        self.stopping.set()
        for lane in lanes:
            lane.kill()

    def _work(self, lane: Lane, work: queue.SimpleQueue, failures: list | None = None) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    unit = work.get_nowait()
                except queue.Empty:
                    return
                for item in unit:
                    if self.stopping.is_set():
                        return
                    if item.key.share in self._not_applicable:
                        continue
                    self._progress(lane, item)
                    lane.run(item)
                    with self._lock:
                        self._done_now += 1
                if self.per_round and not self.stopping.is_set():
                    lane.close()  # each unit is one guest's worth (matrix.units)
        except BaseException as err:
            if failures is None:
                raise
            if not self.stopping.is_set():
                failures.append(err)
        finally:
            if not self.stopping.is_set():
                lane.close()

    # -- what the lanes share ----------------------------------------------------------
    def guest(self, kernel: Kernel, options, role: str | None) -> Guest:
        """A guest of ``kernel`` for a lane, not started yet."""
        return self._guests(kernel, options, self.log, role=role, machine=self.machine)

    def record(self, record: Record) -> None:
        """Append to the store, stamped with the clock the run was measured by; nothing
        once the qualification is being stopped (those runs were cut short by us)."""
        with self._lock:
            if self.stopping.is_set():
                return
            self.store.append({**record.to_json(self.workload.axis.name), "clock": self.config.clock})

    def count_crash(self, item: matrix.Item) -> int:
        """One more boot of ``item`` went down; how many have so far."""
        with self._lock:
            self._crashes[item.key] += 1
            return self._crashes[item.key]

    def claim_conditions(self, template: str | None) -> bool:
        """Whether a guest's conditions are still to be asked: every booted guest's, and the
        first closed guest's of each template (its guests share one boot)."""
        with self._lock:
            if template is None:
                return True
            if template in self._conditions_known:
                return False
            self._conditions_known.add(template)
            return True

    def claim_skip(self, share: Share) -> bool:
        """Whether this lane is the first to find ``share`` n/a (only the first records it)."""
        with self._lock:
            if share in self._not_applicable:
                return False
            self._not_applicable.add(share)
            return True

    # -- telling the user ---------------------------------------------------------------
    def _progress(self, lane: Lane, item: matrix.Item) -> None:
        with self._lock:
            done_now = self._done_now
            self._begun += 1
            position = self._before + self._begun
        elapsed = time.monotonic() - self._started
        eta = f", ETA {durations.elapsed(elapsed / done_now * (self._todo - done_now))}" if done_now else ""
        who = f"lane {lane.number}: " if self.jobs > 1 else ""
        self.say(f"[{position}/{self._total}] {who}{item.describe(self.workload.axis.name)} "
                 f"(elapsed {durations.elapsed(elapsed)}{eta})")

    def say(self, text: str) -> None:
        with self._lock:
            print(f"kvmlab qualify: {text}", file=self.log, flush=True)

