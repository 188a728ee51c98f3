"""Run a qualification's matrix: one guest per kernel, runs interleaved, each recorded at once.

Both guests stay booted; the one whose turn it is runs, the other is paused over QMP
(a paused TCG guest costs the host nothing), so the two kernels take turns on the same
quiet host and drift in the host's speed falls on both alike. A guest that hangs,
crashes or vanishes mid-run is recorded with its console excerpt, and the run is tried
once more in a fresh boot of that kernel; the rest of the matrix goes on either way.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from kselftest_py.ktap import KSFT_SKIP
from kvmlab import durations
from kvmlab.inspect.watch import InvariantWatch
from kvmlab.kernels.model import Kernel
from kvmlab.qualify import matrix
from kvmlab.qualify.store import CRASH, FAIL, RUN, SKIP, Cell, Store, record_key
from kvmlab.vm import boot
from kvmlab.vm.session import GuestDown, GuestSession

RESULT_JSON = "/tmp/kvmlab-qualify-run.json"
TRACE_OUT = "/tmp/kvmlab-qualify-trace"
TRACE_FILES = ("trace.dat", "capture.json", "latency_hist.json")
ATTEMPTS = 2
"""Tries of one run before it counts as failed: one fresh boot after a guest went down."""
CHECK_EVERY_S = 5.0


class Driver:
    def __init__(self, store: Store, kernels: dict[str, Kernel], session_options: dict,
                 check_invariants: bool = False, log=sys.stderr):
        self.store, self.kernels, self.log = store, kernels, log
        self.config = store.config
        self.session_options = session_options
        self.check_invariants = check_invariants
        self.sessions: dict[str, GuestSession | None] = dict.fromkeys(matrix.SIDES)
        self._reported_watch: set[str] = set()
        self._not_applicable: set[Cell] = set()

    # -- the matrix -------------------------------------------------------------------
    def run(self) -> None:
        config = self.config
        per_round = bool(config.get("boot_per_round"))
        items = matrix.plan(config["tests"], config["slots"], config["runs"], rounds_first=per_round)
        records = self.store.records()
        crashes = Counter(record_key(r) for r in records if r["kind"] == CRASH)
        self._not_applicable = {record_key(r).cell for r in records if r["kind"] == SKIP}
        todo = [item for item in items if not _finished(item, records, crashes)]
        done_before = len(items) - len(todo)
        if done_before:
            self._say(f"resuming: {done_before} of {len(items)} runs already in {self.store.runs_path}")
        started = time.monotonic()
        current_round = None
        try:
            for number, item in enumerate(todo):
                if item.key.cell in self._not_applicable:
                    continue
                if per_round and item.run != current_round:
                    for side in matrix.SIDES:  # a round's runs come from boots of their own
                        self._retire(side, close=True)
                    current_round = item.run
                self._progress(item, done_before + number, len(items), started, number, len(todo))
                self._attempt(item, crashes)
        finally:
            for side in matrix.SIDES:
                self._retire(side, close=True)

    def _record(self, record: dict) -> None:
        """Append to the store, stamped with the clock the run was measured by."""
        self.store.append({**record, "clock": self.config.get("clock", "wall")})

    def _attempt(self, item: matrix.Item, crashes: Counter) -> None:
        while True:
            try:
                self._run_item(item)
                return
            except GuestDown as down:
                self._retire(item.side)
                crashes[item.key] += 1
                result = down.result
                self._record(
                    {
                        "kind": "crash",
                        **_fields(item),
                        "outcome": result.outcome,
                        "message": result.message,
                        "boot": result.run_dir.name,
                    }
                )
                first = result.message.splitlines()[0] if result.message else result.outcome
                again = crashes[item.key] < ATTEMPTS
                self._say(
                    f"{item.describe()}: guest {result.outcome}: {first}; "
                    f"{'trying again in a fresh boot' if again else 'giving up on this run'} "
                    f"(console: {result.run_dir / 'console.log'})"
                )
                if not again:
                    self._record(
                        {
                            "kind": "fail",
                            **_fields(item),
                            "reason": f"guest {result.outcome} in {ATTEMPTS} boots",
                        }
                    )
                    return

    def _run_item(self, item: matrix.Item) -> None:
        session = self._session(item.side)
        argv, files = self._command(item)
        reply = session.request(argv, files, timeout_s=self._timeout())
        self._note_kernel_reports(item, session)
        record = _json_file(reply.files.get(RESULT_JSON))
        tests = record.get("tests", []) if record else []
        if reply.code == KSFT_SKIP and tests and tests[0].get("result") == "skip":
            self._record({"kind": "skip", **_fields(item), "reason": tests[0]["reason"]})
            self._not_applicable.add(item.key.cell)
            self._say(f"{item.side} {item.test} @{item.slots}: n/a: {tests[0]['reason']}")
            return
        if reply.code != 0 or not record or not record.get("runs"):
            reason = (
                tests[0].get("reason") if tests else None
            ) or f"exit {reply.code}: {reply.stderr.strip()[-500:] or reply.stdout.strip()[-500:]}"
            self._record({"kind": "fail", **_fields(item), "reason": reason})
            self._say(f"{item.describe()}: FAILED: {reason}")
            return
        run = record["runs"][0]
        extra = {"trace_dir": self._save_trace(item, reply.files)} if self.config.get("trace") else {}
        self._record(
            {
                "kind": "run",
                **_fields(item),
                "iteration_ns": run["iteration_ns"],
                "iteration_cpu_ns": run.get("iteration_cpu_ns"),
                "iterations": run["iterations"],
                "slot_setup_ns": run["slot_setup_ns"],
                "guest_runtime_ns": run["guest_runtime_ns"],
                "release": record["kernel_release"],
                "default_sizes": record.get("default_sizes"),
                "boot": session.run_dir.name,
                "elapsed_s": round(reply.elapsed_s, 3),
                **extra,
            }
        )

    def _command(self, item: matrix.Item) -> tuple[list[str], tuple[str, ...]]:
        number = matrix.test_number(item.test)
        argv = [
            "python3",
            "-m",
            "kselftest_py.memslot_perf",
            "-s",
            str(item.slots),
            "-f",
            str(number),
            "-e",
            str(number),
            "-r",
            "1",
            "-l",
            str(self.config["seconds"]),
            "--json",
            RESULT_JSON,
        ]
        files = (RESULT_JSON,)
        if self.config.get("trace"):
            argv = boot.traced(argv, out=TRACE_OUT)
            files += tuple(f"{TRACE_OUT}/{name}" for name in TRACE_FILES)
        return argv, files

    def _timeout(self) -> float:
        # Slot setup at tens of thousands of slots takes minutes under TCG; the
        # heartbeat catches a frozen guest long before this.
        return 900.0 + 4 * float(self.config["seconds"])

    # -- guests -----------------------------------------------------------------------
    def _session(self, side: str) -> GuestSession:
        """The guest of ``side``, running; the other one paused."""
        for other, session in self.sessions.items():
            if other != side and session is not None and not session.paused:
                self._pause_idle(other, session)
        session = self.sessions[side]
        if session is None:
            options = boot.RunOptions(argv=[], **self.session_options)
            if self.check_invariants:
                options.checker = InvariantWatch.every(self.kernels[side], CHECK_EVERY_S)
            session = GuestSession(self.kernels[side], options, self.log)
            self.sessions[side] = session
            try:
                session.start()
            except GuestDown:
                self.sessions[side] = None
                raise
            self._say(f"{side}: {self.kernels[side].release} up in {session.run_dir}")
        elif session.paused:
            session.resume()
        return session

    def _pause_idle(self, side: str, session: GuestSession) -> None:
        """Pause the guest whose turn is over; if it went away meanwhile, say so, boot it afresh later."""
        try:
            session.pause()
        except GuestDown as down:
            self._retire(side)
            result = down.result
            self._record({"kind": "crash", "side": side, "test": None, "slots": None, "run": None,
                               "outcome": result.outcome, "message": result.message,
                               "boot": result.run_dir.name})
            self._say(f"{side}: guest {result.outcome} while idle; it boots afresh for its next run")

    def _retire(self, side: str, close: bool = False) -> None:
        """Forget a guest (closing it when asked), recording what its invariant checks saw."""
        session = self.sessions[side]
        if session is None:
            return
        self.sessions[side] = None
        if close:
            session.close()
        report = session.watch.report if session.watch else None
        if report is not None and report.checks:
            self._record({"kind": "checks", "side": side, "test": None, "slots": None, "run": None,
                               "checks": report.checks, "checks_with_vms": report.checks_with_vms,
                               "max_slots": report.max_slots, "violations": len(report.violations),
                               "boot": session.run_dir.name})

    def _note_kernel_reports(self, item: matrix.Item, session: GuestSession) -> None:
        for splat in session.new_splats():
            self._record(
                {
                    "kind": "splat",
                    **_fields(item),
                    "summary": splat.summary(),
                    "excerpt": splat.excerpt,
                    "boot": session.run_dir.name,
                }
            )
            self._say(f"{item.side}: guest kernel reported a {splat.summary()}")
        watch = session.watch
        if watch is not None and watch.report.failed and session.run_dir.name not in self._reported_watch:
            self._reported_watch.add(session.run_dir.name)
            self._record(
                {
                    "kind": "invariant",
                    **_fields(item),
                    "summary": watch.report.summary(),
                    "violations": watch.report.violations,
                    "error": watch.report.error,
                    "boot": session.run_dir.name,
                }
            )
            self._say(f"{item.side}: {watch.report.summary()}")

    def _save_trace(self, item: matrix.Item, files: dict) -> str:
        slug = item.test.replace(" ", "-")
        relative = Path("traces") / item.side / f"{slug}-{item.slots}-{item.run}"
        target = self.store.directory / relative
        target.mkdir(parents=True, exist_ok=True)
        for path, data in files.items():
            if data is not None and path.startswith(TRACE_OUT):
                (target / Path(path).name).write_bytes(data)
        return str(relative)

    # -- telling the user ---------------------------------------------------------------
    def _progress(self, item, position: int, total: int, started: float, done_now: int, todo: int) -> None:
        elapsed = time.monotonic() - started
        eta = f", ETA {durations.clock(elapsed / done_now * (todo - done_now))}" if done_now else ""
        self._say(f"[{position + 1}/{total}] {item.describe()} (elapsed {durations.clock(elapsed)}{eta})")

    def _say(self, text: str) -> None:
        print(f"kvmlab qualify: {text}", file=self.log, flush=True)


def _fields(item: matrix.Item) -> dict:
    return {"side": item.side, "test": item.test, "slots": item.slots, "run": item.run}


def _finished(item: matrix.Item, records: list[dict], crashes: Counter) -> bool:
    """Measured, failed or n/a already; or tried in as many boots as a run gets."""
    for record in records:
        if record["kind"] == SKIP and record_key(record).cell == item.key.cell:
            return True
        if record["kind"] in (RUN, FAIL) and record_key(record) == item.key:
            return True
    return crashes[item.key] >= ATTEMPTS


def _json_file(data: bytes | None) -> dict | None:
    if not data:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None
