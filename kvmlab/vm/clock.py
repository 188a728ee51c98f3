"""The measurement clock of a guest: what a second means to the tests that run in it.

``wall``: multi-threaded TCG (or KVM), where guest time is host time; one run can be
several times another on a busy 2-core host, so an A/B needs many runs. ``icount``:
QEMU counts emulated instructions and the guest clock advances 1 ns per instruction
(``shift=0``), skipping idle time (``sleep=off``), so a guest measures work, not how
fast or how loaded the host is. It runs the vCPUs round-robin on one host thread and
is only possible under TCG, with a QEMU that boots SMP guests with it (≥ 10.0).
What it cannot see: cache misses, memory latency and any cost that is not an
instruction, so a patch that only changes locality shows no change under it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmlab.errors import KvmlabError
from kvmlab.vm.accel import Accel
from kvmlab.vm.emulator import ICOUNT_MIN_VERSION, Emulator

ICOUNT, WALL = "icount", "wall"
CLOCKS = (ICOUNT, WALL)
#: ``-seed``: RDRAND and RDSEED give the guest the same numbers in every QEMU, so a
#: restored guest's randomness (its slab freelists, say) repeats too: without it, one of
#: four restores ran memslot_perf 1.4 % apart (docs/benchmarks.md, determinism).
ICOUNT_ARGS = ("-icount", "shift=0,sleep=off", "-seed", "1")
#: Under icount the guest itself is the remaining source of run-to-run differences: fix
#: what the kernel and Python randomise per boot (layout of the kernel, its stacks, the
#: page allocator's free lists, userspace mappings, str hashing).
QUIET_APPEND = "nokaslr page_alloc.shuffle=0 randomize_kstack_offset=off norandmaps"
QUIET_ENV = {"PYTHONHASHSEED": "0"}
#: The RTC follows the guest's own clock (it stops when the guest is paused or saved,
#: so a restored guest's time does not leap); under icount it also starts from a fixed
#: date, so that no boot differs from another by the host's time of day.
RTC_ARGS = ("-rtc", "clock=vm")
ICOUNT_RTC_ARGS = ("-rtc", "base=2026-01-01T00:00:00,clock=vm")


@dataclass(frozen=True)
class Clock:
    name: str
    reason: str

    def qemu_args(self) -> list[str]:
        return [*ICOUNT_ARGS, *ICOUNT_RTC_ARGS] if self.name == ICOUNT else list(RTC_ARGS)

    def describe(self) -> str:
        return f"clock {self.name}: {self.reason}"


def choose(requested: str | None, accel: Accel, emulator: Emulator, default: str = ICOUNT) -> Clock:
    """The clock for a guest: ``requested`` (``icount``/``wall``/``auto``), else ``default``
    where the accelerator and emulator allow it, else wall. Refuses icount where it cannot run."""
    if requested not in (None, "auto", *CLOCKS):
        raise KvmlabError(f"unknown clock {requested!r}. Available: auto, {', '.join(CLOCKS)}")
    if requested == ICOUNT:
        if accel.name != "tcg":
            raise KvmlabError(
                "--clock icount counts TCG's emulated instructions; under --accel kvm the guest runs on "
                "the host CPU: use --clock wall (or --accel tcg)"
            )
        if not _runs_icount(emulator):
            wanted = ".".join(map(str, ICOUNT_MIN_VERSION))
            raise KvmlabError(
                f"--clock icount needs QEMU >= {wanted}: {emulator.describe()} hangs SMP guests in early "
                "boot with icount; unset KVMLAB_QEMU to use kvmlab's own QEMU (make setup fetches it)"
            )
        return Clock(ICOUNT, "requested: guest time counts emulated instructions (1 ns each)")
    if requested == WALL:
        return Clock(WALL, "requested: guest time is host time")
    if accel.name != "tcg":
        return Clock(WALL, f"{accel.name} runs the guest on the host CPU, where icount is impossible")
    if default == WALL:
        return Clock(WALL, "guest time is host time (--clock icount: reproducible timings)")
    if not _runs_icount(emulator):
        return Clock(WALL, f"QEMU {emulator.version} cannot run SMP guests with icount")
    return Clock(ICOUNT, "guest time counts emulated instructions (1 ns each), whatever the host's load")


def _runs_icount(emulator: Emulator) -> bool:
    return emulator.version_tuple >= ICOUNT_MIN_VERSION
