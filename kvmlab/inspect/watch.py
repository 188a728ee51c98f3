"""Check the guest kernel's memslot invariants every few seconds while a job runs.

``kvmlab run --check-invariants-every S``: once the job has started, every S seconds of
running time the guest is paused (QMP ``stop``), drgn reads every VM's memslots and the
invariants are checked, and the guest resumes (``cont``). The checks therefore see the
structures in the middle of whatever the job is doing to them, frozen in one state.

Every check is appended to ``invariants.jsonl`` in the run directory as it completes.
The first violation fails the run; later checks are skipped, so the report shows the
state that first went wrong. A check that cannot run (no debuginfo, drgn cannot attach)
also fails the run: a run that asked for checks must not pass without them.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab.errors import KvmlabError
from kvmlab.inspect import attach
from kvmlab.kernels.model import Kernel


@dataclass
class WatchReport:
    checks: int = 0
    checks_with_vms: int = 0
    max_slots: int = 0
    paused_s: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.violations) or self.error is not None

    def summary(self) -> str:
        mean = sum(self.paused_s) / len(self.paused_s) if self.paused_s else 0.0
        text = (f"invariant checks: {self.checks} ran, {self.checks_with_vms} saw a VM "
                f"(up to {self.max_slots} slots), guest paused {mean:.2f} s per check")
        if self.violations:
            text += f"; VIOLATIONS at check {self.checks}:\n" + "\n".join(self.violations)
        elif self.error:
            text += f"; checks stopped: {self.error}"
        else:
            text += "; no violations"
        return text


class InvariantWatch:
    """A ``kvmlab.vm.lifecycle.Checker``: the memslot invariants, checked with drgn."""

    @classmethod
    def every(cls, kernel: Kernel, every_s: float):
        """What ``RunOptions.checker`` wants: a watch for the machine once it is booted."""
        return lambda machine: cls(kernel, machine.debug_socket, machine.qmp_socket, machine.run_dir, every_s)

    def __init__(self, kernel: Kernel, debug_socket: Path, control_socket: Path, run_dir: Path,
                 every_s: float):
        target = attach.Target(debug_socket, control_socket, kernel.pinned, run_dir.name)
        self.inspector = attach.Inspector(target)
        self.every_s = every_s
        self.journal = run_dir / "invariants.jsonl"
        self.report = WatchReport()
        self._next_at: float | None = None

    def due(self, now: float) -> bool:
        """Whether to check now; the first check comes ``every_s`` after the first call."""
        if self.report.failed:
            return False
        if self._next_at is None:
            self._next_at = now + self.every_s
        return now >= self._next_at

    def check(self) -> float:
        """Pause, read, check, resume; returns how long the guest was paused."""
        from drgn_scripts import memslot_invariants

        try:
            if self.inspector.prog is None:
                self.inspector.attach()  # seconds of DWARF loading, with the guest running
            snapshot = self.inspector.snapshot(check=True)
        except KvmlabError as err:
            self.report.error = str(err)
            return 0.0
        finally:
            self._next_at = time.monotonic() + self.every_s
        report = self.report
        report.checks += 1
        report.checks_with_vms += bool(snapshot.vms)
        slots = [len(space.slots) for vm in snapshot.vms for space in vm.address_spaces]
        report.max_slots = max([report.max_slots, *slots])
        report.paused_s.append(snapshot.paused_s)
        report.violations = memslot_invariants.render(snapshot.violations).splitlines()
        with open(self.journal, "a") as journal:
            journal.write(json.dumps({
                "check": report.checks, "vms": len(snapshot.vms), "slots": slots,
                "read_s": snapshot.read_s, "paused_s": snapshot.paused_s,
                "violations": memslot_invariants.to_json(snapshot.violations),
            }) + "\n")
        return snapshot.paused_s
