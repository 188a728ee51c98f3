"""One lane of a qualification: a pair of guests, one per kernel, running items in turn.

The guest whose turn it is runs, the other is paused over QMP (a paused TCG guest
costs the host nothing), so one lane keeps about one host core busy. (Under icount a
unit of work holds one kernel's runs, so only one of the pair is ever booted.) A guest that
hangs, crashes or vanishes mid-run is recorded with its console excerpt, and the run
is tried once more in a fresh boot of that kernel; the lane goes on either way.

Lanes share nothing but their ``Driver``: the store, the log, and the cells found n/a.
"""

from __future__ import annotations

import json
from pathlib import Path

from kselftest_py.ktap import KSFT_SKIP
from kvmlab.inspect.watch import InvariantWatch
from kvmlab.qualify import conditions, matrix, records
from kvmlab.qualify.completion import ATTEMPTS
from kvmlab.vm import boot
from kvmlab.vm.guest import Guest, GuestDown

RESULT_JSON = "/tmp/kvmlab-qualify-run.json"
TRACE_OUT = "/tmp/kvmlab-qualify-trace"
TRACE_FILES = ("trace.dat", "capture.json", "latency_hist.json")
CHECK_EVERY_S = 5.0


class Lane:
    def __init__(self, driver, number: int):
        """``driver``: the ``driver.Driver`` whose queue this lane works through."""
        self.driver, self.number = driver, number
        self.config = driver.config
        self.axis = driver.workload.axis.name
        self.sessions: dict[str, Guest | None] = dict.fromkeys(matrix.SIDES)
        self.current: matrix.Item | None = None
        self._reported_watch: set[str] = set()
        self._boot_next: set[str] = set()
        """Sides whose next guest boots afresh: a run is retried in a fresh boot after its guest
        went down (the template it was restored from may be what failed)."""

    def run(self, item: matrix.Item) -> None:
        """Run ``item`` (and again in a fresh boot if its guest goes down), recording how it went."""
        self.current = item
        try:
            self._attempt(item)
        finally:
            self.current = None

    def close(self) -> None:
        """Power both guests off; one found dead by now is recorded as lost while idle."""
        for side in matrix.SIDES:
            session = self.sessions[side]
            if session is not None and not self.driver.stopping.is_set():
                try:
                    session.check_alive()
                except GuestDown as down:
                    self._lost_while_idle(side, down)
                    continue
            self._retire(side, close=True)

    def kill(self) -> None:
        """End this lane's QEMUs at once (another thread is interrupted: no goodbyes)."""
        for session in self.sessions.values():
            if session is not None and session.process is not None:
                session.process.kill()  # not Guest.kill: another thread may be using the guest

    # -- one run ----------------------------------------------------------------------
    def _attempt(self, item: matrix.Item) -> None:
        while True:
            try:
                self._run_item(item)
                return
            except GuestDown as down:
                self._retire(item.side)
                self._boot_next.add(item.side)
                if self.driver.stopping.is_set():
                    return  # we killed it: the run was cut short, not crashed
                tries = self.driver.count_crash(item)
                result = down.result
                self.driver.record(records.Crash(*_key(item), outcome=result.outcome, message=result.message,
                                                 boot=result.run_dir.name, vmcore=result.vmcore))
                first = result.message.splitlines()[0] if result.message else result.outcome
                again = tries < ATTEMPTS
                self.driver.say(
                    f"{item.describe(self.axis)}: guest {result.outcome}: {first}; "
                    f"{'trying again in a fresh boot' if again else 'giving up on this run'} "
                    f"(console: {result.run_dir / 'console.log'})"
                )
                if not again:
                    self._boot_next.discard(item.side)  # the next run restores as its round's others do
                    self.driver.record(records.Fail(*_key(item),
                                                    reason=f"guest {result.outcome} in {ATTEMPTS} boots"))
                    return

    def _run_item(self, item: matrix.Item) -> None:
        session = self._session(item)
        argv, files = self._command(item)
        reply = session.request(argv, files, timeout_s=self._timeout())
        self._note_kernel_reports(item, session)
        record = _json_file(reply.files.get(RESULT_JSON))
        tests = record.get("tests", []) if record else []
        if reply.code == KSFT_SKIP and tests and tests[0].get("result") == "skip":
            if self.driver.claim_skip(item.key.share):
                self.driver.record(records.Skip(*_key(item), reason=tests[0]["reason"]))
                self.driver.say(f"{item.side} {item.test} @{item.point}: n/a: {tests[0]['reason']}")
            return
        if reply.code != 0 or not record or not record.get("runs"):
            reason = (
                tests[0].get("reason") if tests else None
            ) or f"exit {reply.code}: {reply.stderr.strip()[-500:] or reply.stdout.strip()[-500:]}"
            self._fail(item, reason)
            return
        try:
            figures = self.driver.workload.figures(record)
        except (KeyError, IndexError, TypeError) as err:
            self._fail(item, f"its JSON result lacks {err} (what the workload declares it holds)")
            return
        trace = {"trace_dir": self._save_trace(item, reply.files)} if self.config.trace else {}
        release = record.get("kernel_release") or "?"
        self.driver.record(records.Run(*_key(item), figures=figures, release=release,
                                       boot=session.run_dir.name, origin=_origin(session),
                                       elapsed_s=round(reply.elapsed_s, 3), lane=self.number, trace=trace))

    def _fail(self, item: matrix.Item, reason: str) -> None:
        self.driver.record(records.Fail(*_key(item), reason=reason))
        self.driver.say(f"{item.describe(self.axis)}: FAILED: {reason}")

    def _command(self, item: matrix.Item) -> tuple[list[str], tuple[str, ...]]:
        argv = self.driver.workload.argv(item.test, item.point, self.config.seconds, RESULT_JSON,
                                         self.config.setup_budget)
        files = (RESULT_JSON,)
        if self.config.trace:
            argv = boot.traced(argv, out=TRACE_OUT)
            files += tuple(f"{TRACE_OUT}/{name}" for name in TRACE_FILES)
        return argv, files

    def _timeout(self) -> float:
        # Slot setup at tens of thousands of slots takes minutes under TCG; the
        # heartbeat catches a frozen guest long before this. The setup budget is guest
        # time, which under icount on a busy 2-core host ran 6x slower than the wall
        # (5.10's 32764 slots: 59 s of guest time, 384 s on the wall).
        return 900.0 + 4 * self.config.seconds + 8 * (self.config.setup_budget or 0)

    # -- guests -----------------------------------------------------------------------
    def _session(self, item: matrix.Item) -> Guest:
        """The guest of ``item``'s side, running; the other one paused."""
        side = item.side
        for other, session in self.sessions.items():
            if other != side and session is not None and not session.paused:
                self._pause_idle(other, session)
        session = self.sessions[side]
        if session is None:
            kernel = self.driver.kernels[side]
            options = boot.RunOptions(argv=[], **self.driver.session_options[side])
            if self.driver.check_invariants:
                options.checker = InvariantWatch.every(kernel, CHECK_EVERY_S)
            session = self.driver.guest(kernel, options, role=self._role(item))
            self.sessions[side] = session
            try:
                session.start()
            except GuestDown:
                self.sessions[side] = None
                raise
            how = f"restored from {session.template.name}" if session.template else "booted"
            self.driver.say(f"{self._name(side)}: {kernel.release} {how}, in {session.run_dir}")
        elif session.paused:
            session.resume()
        return session

    def _role(self, item: matrix.Item) -> str | None:
        """The template a guest for ``item`` restores: one per side, kernel and round under
        icount (each round samples a boot of its own), one per side under the wall clock;
        None with ``--fresh-boot``. The sides never share one, even for one kernel: a
        self-qualification compares two boots, as a qualification of two kernels does."""
        if self.config.fresh_boot or item.side in self._boot_next:
            self._boot_next.discard(item.side)
            return None
        if self.driver.per_round:
            return f"qualify-{item.side}-round{item.run}"
        return f"qualify-{item.side}"

    def _record_conditions(self, side: str, session: Guest) -> None:
        """What this boot's KVM ran with (``qualify.conditions``), asked as the guest is
        closed, so that its runs ran before kvmlab asked anything (a template's guests are
        asked once: they are all one boot). A guest that cannot say is named, and its
        runs stand without it."""
        try:
            if session.paused:
                session.resume()
            reply = session.request(conditions.GUEST_COMMAND, timeout_s=120)
        except GuestDown:
            return  # close() finds it gone too
        try:
            if reply.code != 0:
                raise ValueError(f"exit {reply.code}: {reply.stderr.strip()[-300:]}")
            found = conditions.of_boot(reply.stdout, self.driver.kernels[side])
        except ValueError as err:
            self.driver.say(f"{self._name(side)}: warning: its conditions could not be read: {err}")
            return
        self.driver.record(records.Conditions(side, conditions=found, boot=session.run_dir.name,
                                              origin=_origin(session)))

    def _name(self, side: str) -> str:
        return f"lane {self.number} {side}" if self.driver.jobs > 1 else side

    def _pause_idle(self, side: str, session: Guest) -> None:
        """Pause the guest whose turn is over; if it went away meanwhile, say so, boot it afresh later."""
        try:
            session.pause()
        except GuestDown as down:
            self._lost_while_idle(side, down)

    def _lost_while_idle(self, side: str, down: GuestDown) -> None:
        """Record a guest that went away between its runs; its next run boots afresh."""
        self._retire(side)
        result = down.result
        self.driver.record(records.Crash(side, outcome=result.outcome, message=result.message,
                                         boot=result.run_dir.name))
        self.driver.say(f"{self._name(side)}: guest {result.outcome} while idle "
                        f"(console: {result.run_dir / 'console.log'})")

    def _retire(self, side: str, close: bool = False) -> None:
        """Forget a guest (closing it when asked), recording what its invariant checks saw."""
        session = self.sessions[side]
        if session is None:
            return
        self.sessions[side] = None
        if close:
            template = session.template.name if session.template else None
            if not self.driver.stopping.is_set() and self.driver.claim_conditions(template):
                self._record_conditions(side, session)
            session.close()
        report = session.watch.report if session.watch else None
        if report is not None and report.checks:
            self.driver.record(records.Checks(side, checks=report.checks, max_slots=report.max_slots,
                                              checks_with_vms=report.checks_with_vms,
                                              violations=len(report.violations), boot=session.run_dir.name))

    def _note_kernel_reports(self, item: matrix.Item, session: Guest) -> None:
        for splat in session.new_splats():
            self.driver.record(records.Splat(*_key(item), summary=splat.summary(), excerpt=splat.excerpt,
                                             boot=session.run_dir.name))
            self.driver.say(f"{self._name(item.side)}: guest kernel reported a {splat.summary()}")
        watch = session.watch
        if watch is not None and watch.report.failed and session.run_dir.name not in self._reported_watch:
            self._reported_watch.add(session.run_dir.name)
            self.driver.record(records.Invariant(*_key(item), summary=watch.report.summary(),
                                                 violations=watch.report.violations, error=watch.report.error,
                                                 boot=session.run_dir.name))
            self.driver.say(f"{self._name(item.side)}: {watch.report.summary()}")

    def _save_trace(self, item: matrix.Item, files: dict) -> str:
        slug = item.test.replace(" ", "-")
        relative = Path("traces") / item.side / f"{slug}-{item.point}-{item.run}"
        target = self.driver.store.directory / relative
        target.mkdir(parents=True, exist_ok=True)
        for path, data in files.items():
            if data is not None and path.startswith(TRACE_OUT):
                (target / Path(path).name).write_bytes(data)
        return str(relative)


def _origin(session: Guest) -> dict:
    """Whether a run's guest was restored, and from which template (with its boot)."""
    if session.template is None:
        return {"restored": False}
    return {"restored": True, **session.template.describe()}




def _key(item: matrix.Item) -> tuple:
    """Which run a record is about."""
    return item.side, item.test, item.point, item.run


def _json_file(data: bytes | None) -> dict | None:
    if not data:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None
