"""What each side of a qualification ran with, and where the two sides differ.

Every guest a qualification boots is asked for its conditions (``kvmlab_guest.conditions``:
KVM's module parameters, the command line, the CPU and its virtualisation flags, the
L1 vCPUs and memory), and the host adds the kernel's KVM-relevant configuration; the
store keeps one ``conditions`` record per boot. Here they become one set per side, and
the differences between the sides: each a possible confound of the A/B.

Two kernels differ in many small ways: a parameter only one of them has, a command-line
argument only one side was given. Those stay in the report's table. A *setting* both
sides have, set differently (``kvm.tdp_mmu`` N against Y, ``CONFIG_KASAN`` n against
y, another CPU model) is what a reader must see beside the verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvmlab.kernels.model import Kernel
from kvmlab.qualify.config import SIDES
from kvmlab.qualify.records import CONDITIONS

GUEST_COMMAND = ["python3", "-m", "kvmlab_guest.conditions"]
#: Kernel configuration that changes what KVM does or how fast: KVM's own options, and
#: the debugging that slows every path (KASAN, lockdep).
CONFIG_PREFIXES = ("CONFIG_KVM", "CONFIG_KASAN", "CONFIG_LOCKDEP", "CONFIG_PROVE_LOCKING",
                   "CONFIG_DEBUG_LOCKDEP", "CONFIG_PROVE_RCU", "CONFIG_DEBUG_ATOMIC_SLEEP")
CMDLINE = "cmdline"
#: Spellings of a boolean that mean the same: 5.10 shows some of KVM's parameters as 0/1
#: that 6.1 shows as N/Y.
_SAME = {"0": "N", "n": "N", "1": "Y", "y": "Y"}
VERDICT_NAMES = 4


@dataclass(frozen=True)
class Difference:
    name: str
    base: str | None
    patched: str | None
    """None: this side does not have it (or it was not recorded)."""

    @property
    def setting(self) -> bool:
        """A setting both sides have, set differently: what the verdict line names."""
        return self.base is not None and self.patched is not None

    def describe(self) -> str:
        return f"{self.name} {_shown(self.base)} vs {_shown(self.patched)}"


@dataclass
class Conditions:
    sides: dict[str, dict[str, str]]
    """Side → condition → value; a side no boot recorded is empty."""
    boots: dict[str, int]
    varies: dict[str, list[str]] = field(default_factory=dict)
    """Side → conditions whose value was not the same in every boot of that side."""

    @property
    def recorded(self) -> bool:
        return all(self.boots[side] for side in SIDES)

    @property
    def differences(self) -> list[Difference]:
        if not self.recorded:
            return []
        base, patched = self.sides["base"], self.sides["patched"]
        names = sorted(base.keys() | patched.keys())
        return [Difference(name, base.get(name), patched.get(name)) for name in names
                if name != CMDLINE and _normal(base.get(name)) != _normal(patched.get(name))]

    @property
    def confounds(self) -> list[Difference]:
        return [difference for difference in self.differences if difference.setting]

    def verdict_note(self) -> str:
        """``conditions differ: kvm.tdp_mmu N vs Y``, or "" when no setting differs."""
        confounds = self.confounds
        if not confounds:
            return ""
        named = ", ".join(d.describe() for d in confounds[:VERDICT_NAMES])
        more = f" and {len(confounds) - VERDICT_NAMES} more" if len(confounds) > VERDICT_NAMES else ""
        return f"conditions differ: {named}{more}"

    def to_json(self) -> dict:
        return {"sides": self.sides, "boots": self.boots, "varies": self.varies,
                "differences": [{"name": d.name, "base": d.base, "patched": d.patched, "setting": d.setting}
                                for d in self.differences]}


def kernel_config(kernel: Kernel) -> dict[str, str]:
    """The kernel's KVM-relevant config lines, ``CONFIG_X`` → value (``n`` when not set)."""
    if kernel.config is None or not kernel.config.is_file():
        return {}
    return config_lines(kernel.config.read_text(errors="replace"))


def config_lines(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            name, value = line[2:-len(" is not set")], "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
        else:
            continue
        if name.startswith(CONFIG_PREFIXES):
            found[name] = value.strip('"')
    return found


def of_boot(guest_json: str, kernel: Kernel) -> dict[str, str]:
    """One boot's conditions: what the guest said (its JSON) and the kernel's config.

    The command line is also split into its arguments (``cmdline:kvm.tdp_mmu`` → ``0``),
    so that an argument one side has and the other lacks is its own row, not a line of
    text that differs."""
    guest = json.loads(guest_json)
    if not isinstance(guest, dict):
        raise ValueError("not a JSON object")
    found = {str(name): str(value) for name, value in guest.items()}
    for word in found.get(CMDLINE, "").split():
        key, _, value = word.partition("=")
        found[f"{CMDLINE}:{key}"] = value
    found.update(kernel_config(kernel))
    return found


def from_records(records: list[dict]) -> Conditions:
    """Each side's conditions, from its boots' ``conditions`` records (first boot's value;
    a value that changed between boots of one side is listed in ``varies``)."""
    sides: dict[str, dict[str, str]] = {side: {} for side in SIDES}
    boots = dict.fromkeys(SIDES, 0)
    varies: dict[str, set[str]] = {side: set() for side in SIDES}
    for record in records:
        if record["kind"] != CONDITIONS:
            continue
        side, seen = record["side"], record["conditions"]
        if boots[side]:
            known = sides[side]
            varies[side] |= {name for name in known.keys() | seen.keys()
                             if name != CMDLINE and known.get(name) != seen.get(name)}
        else:
            sides[side] = dict(seen)
        boots[side] += 1
    shown = {side: sorted(names) for side, names in varies.items() if names}
    return Conditions(sides, boots, shown)


def _normal(value: str | None) -> str | None:
    return _SAME.get(value, value) if value is not None else None


def _shown(value: str | None) -> str:
    if value is None:
        return "(none)"
    return value if value else '""'
