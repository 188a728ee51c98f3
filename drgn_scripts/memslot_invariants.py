"""Check the invariants KVM keeps in a VM's memslots, on the plain-data model.

Run as a drgn script, it reads every VM of the kernel (``memslots.read_vms``) and checks
it: exit 0 when clean, 1 with one line per violation (``--json`` for records)::

    drgn --qemu QMP_SOCKET --no-default-symbols -s vmlinux -s kvm.ko \
        drgn_scripts/memslot_invariants.py [--pid P] [--json]

Read the guest while it is paused (QMP ``stop``; ``kvmlab inspect --check`` does so):
a running guest changes its memslots under the reader.

Each check looks at one property and reports each breach as its own ``Violation`` of one
kind (the ``KIND_*`` constants), so a test or a report can tell a mis-sorted tree from a
stale hva interval. Messages name the VM (``struct kvm`` address and pid), the address
space, the set, the slot ids and their gfn/hva ranges. Walking the kernel is the reader's
job; validating the rbtree's colours is drgn's ``validate_rbtree``; this module adds the
memslot-level rules beside them, from what ``virt/kvm/kvm_main.c`` maintains:

Generations (both layouts). ``kvm_create_vm`` starts address space ``as_id`` at
generation ``as_id``; every update adds ``KVM_ADDRESS_SPACE_NUM``, so generations stay
unique across address spaces. An update (6.1 ``kvm_swap_active_memslots``, 5.10
``install_new_memslots``) sets ``KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`` (bit 63) on the
incoming set's copy of the active generation, publishes that set, waits for SRCU readers,
then stores the clean, incremented generation. In the tree layout the outgoing set keeps
its old generation, so once a swap has finished ``active == inactive + N``; before the
first update both equal ``as_id``; mid-swap exactly one set carries the bit over the other
set's generation (the inactive one while KVM waits for MMU-notifier invalidations, the
active one while it waits for SRCU).

"In flight". The kernel's own test is the bit on the active generation: caches (MMIO
sptes, gfn_to_hva caches) refuse to trust a generation with the bit set. That bit covers
only the swap. A tree update also edits the inactive set before the swap and propagates the
change to the other set after it, with the bit clear both times, so two sets that differ
with no bit set may be a snapshot of that window. All of it, bit included, runs under
``kvm->slots_lock``: when the reader recorded that mutex free, the sets must agree and no
generation may carry the bit; when it recorded it held, only the active set is sure to be
whole; when it did not record it, the bit is all there is and a ``sets_out_of_sync`` may be
such a window (its message says so).

Not checked: each vCPU's ``last_used_slot`` (it may point at a freed slot until the vCPU's
next lookup sees ``last_used_slot_gen`` differ), and the internal ``KVM_MEMSLOT_INVALID``
flag (legitimately set on a slot being deleted or moved).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

try:
    import drgn_scripts  # noqa: F401 - run as a script by drgn, the package may not be importable
except ImportError:
    sys.path.insert(0, __file__.rsplit("/", 2)[0])
from drgn_scripts.memslot_model import (
    ID_HASH_BITS,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    PAGE_SIZE,
    AddressSpace,
    ArraySet,
    Slot,
    TreeSet,
    VmMemslots,
)

__all__ = [
    "KIND_ARRAY_ORDER",
    "KIND_GMEM_WITHOUT_FLAG",
    "KIND_DUPLICATE_SLOT",
    "KIND_GENERATION_AS_ID",
    "KIND_GENERATION_PAIR",
    "KIND_GFN_ORDER",
    "KIND_GFN_OVERLAP",
    "KIND_GFN_TREE_DEPTH",
    "KIND_HVA_SPAN",
    "KIND_ID_HASH_BUCKET",
    "KIND_ID_TO_INDEX",
    "KIND_IN_PROGRESS_WHILE_IDLE",
    "KIND_LAST_USED_SLOT",
    "KIND_LRU_SLOT",
    "KIND_MISSING_FROM_GFN_TREE",
    "KIND_MISSING_FROM_HVA_TREE",
    "KIND_MISSING_FROM_ID_HASH",
    "KIND_NODE_IDX",
    "KIND_SETS_OUT_OF_SYNC",
    "KIND_SHAPE",
    "Violation",
    "check_vm",
    "hash_32",
    "render",
    "to_json",
    "update_in_flight",
]

KIND_SHAPE = "shape"  # the record cannot be a real layout (set count, active index, used_slots)
KIND_GENERATION_AS_ID = "generation_as_id"  # generation not congruent to as_id modulo the AS count
KIND_IN_PROGRESS_WHILE_IDLE = "in_progress_while_idle"  # bit 63 set while slots_lock is free
KIND_GFN_OVERLAP = "gfn_overlap"  # two slots of one set share gfns
# tree layout
KIND_GFN_ORDER = "gfn_order"  # in-order walk of gfn_tree not strictly increasing by base_gfn
KIND_DUPLICATE_SLOT = "duplicate_slot"  # one index of a set holds a slot id twice
KIND_MISSING_FROM_GFN_TREE = "missing_from_gfn_tree"  # id in the hva tree or id hash only
KIND_MISSING_FROM_HVA_TREE = "missing_from_hva_tree"  # id in the gfn tree or id hash only
KIND_MISSING_FROM_ID_HASH = "missing_from_id_hash"  # id in the gfn tree or hva tree only
KIND_HVA_SPAN = "hva_span"  # hva node is not [userspace_addr, userspace_addr + npages*PAGE_SIZE - 1]
KIND_ID_HASH_BUCKET = "id_hash_bucket"  # id not in bucket hash_32(id, 7), or not 128 buckets
KIND_LAST_USED_SLOT = "last_used_slot"  # the set's last_used_slot is not one of its slots
KIND_GFN_TREE_DEPTH = "gfn_tree_depth"  # depth impossible for a red-black tree of that size
KIND_NODE_IDX = "node_idx"  # set j of an address space does not use node_idx j
KIND_GENERATION_PAIR = "generation_pair"  # the two sets' generations match no state KVM passes through
KIND_SETS_OUT_OF_SYNC = "sets_out_of_sync"  # with no update in flight, the sets hold different slots
KIND_GMEM_WITHOUT_FLAG = "gmem_without_flag"  # a guest_memfd file bound to a slot without KVM_MEM_GUEST_MEMFD
# array layout
KIND_ARRAY_ORDER = "array_order"  # used entries not strictly descending by base_gfn
KIND_ID_TO_INDEX = "id_to_index"  # id_to_index is not the inverse of the array (-1 for unused ids)
KIND_LRU_SLOT = "lru_slot"  # lru_slot outside [0, used_slots), or not 0 when used_slots is 0

_GOLDEN_RATIO_32 = 0x61C88647
_MAX_LISTED = 8


@dataclass(frozen=True)
class Violation:
    """One broken invariant.

    :param vm: ``"kvm <address> pid <pid>"``.
    :param set_index: tree: index of the set in ``__memslots[as_id]``; array: 0; None when
        the violation is between the two sets of an address space.
    :param kind: one of the ``KIND_*`` constants.
    :param message: one self-contained line: VM, address space, set, slots and ranges.
    """

    vm: str
    as_id: int
    set_index: int | None
    kind: str
    message: str
    slot_ids: tuple[int, ...] = ()


def hash_32(value: int, bits: int) -> int:
    """The kernel's ``hash_32``: the top ``bits`` of ``value * GOLDEN_RATIO_32`` in 32 bits.

    ``hash_add(slots->id_hash, ..., new->id)`` uses ``hash_min``, which picks ``hash_32``
    for keys of at most 4 bytes (``short id``; lookups pass an ``int``, same value). The
    arches that override ``__hash_32`` (h8300, m68k, microblaze, parisc) do so only to
    multiply faster, with the same result.
    """
    return ((value * _GOLDEN_RATIO_32) & 0xFFFFFFFF) >> (32 - bits)


def update_in_flight(vm: VmMemslots, space: AddressSpace) -> bool:
    """Whether a memslot update may be under way in ``space`` (see the module docstring).

    ``kvm->slots_lock`` when the reader recorded it; otherwise the kernel's own signal,
    ``KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`` on a generation.
    """
    if vm.slots_lock_held is not None:
        return vm.slots_lock_held
    return any(s.generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS for s in space.sets)


def check_vm(vm: VmMemslots) -> list[Violation]:
    """Every violation in every address space of ``vm``."""
    found: list[Violation] = []
    for space in vm.address_spaces:
        check = _check_tree_space if space.layout == "tree" else _check_array_space
        found.extend(check(vm, space))
    return found


def render(violations: Iterable[Violation]) -> str:
    """One line per violation: ``kind: message``."""
    return "\n".join(f"{v.kind}: {v.message}" for v in violations)


def to_json(violations: Iterable[Violation]) -> list[dict[str, Any]]:
    """Violations as dicts of plain values, for ``json.dumps`` or ``pandas.DataFrame``."""
    return [{**dataclasses.asdict(v), "slot_ids": list(v.slot_ids)} for v in violations]


class _Reporter:
    """Builds the violations of one VM, address space and set (None: between the two sets)."""

    def __init__(self, vm: VmMemslots, space: AddressSpace, set_index: int | None):
        self.vm_label = f"kvm {vm.address:#x} pid {vm.pid}"
        self.as_id, self.set_index = space.as_id, set_index
        self.where = f"{self.vm_label} as {space.as_id}"
        if set_index is not None and space.layout == "tree":
            self.where += f" set {set_index} ({'active' if set_index == space.active else 'inactive'})"

    def __call__(self, kind: str, text: str, slot_ids: Iterable[int] = ()) -> Violation:
        message = f"{self.where}: {text}"
        return Violation(self.vm_label, self.as_id, self.set_index, kind, message, tuple(slot_ids))


def _describe(slot: Slot) -> str:
    return (f"slot {slot.id} gfn [{slot.base_gfn:#x}, {slot.gfn_end:#x}) "
            f"hva [{slot.userspace_addr:#x}, {slot.hva_end:#x}) flags {slot.flags:#x}")


def _listed(items: Iterable[Any], sep: str = ", ") -> str:
    items = list(items)
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return sep.join(map(str, items[:_MAX_LISTED])) + more


# --- both layouts -----------------------------------------------------------------------------


def _check_overlaps(report: _Reporter, slots: list[Slot]) -> list[Violation]:
    """Slots sharing gfns, found on a sorted copy so that an ordering fault cannot hide them."""
    found = []
    reach: Slot | None = None  # the slot reaching furthest so far
    for slot in sorted(slots, key=lambda s: s.base_gfn):
        if reach is not None and slot.base_gfn < reach.gfn_end:
            text = f"{_describe(reach)} overlaps {_describe(slot)}"
            found.append(report(KIND_GFN_OVERLAP, text, (reach.id, slot.id)))
        if reach is None or slot.gfn_end > reach.gfn_end:
            reach = slot
    return found


def _check_generation(vm: VmMemslots, report: _Reporter, generation: int) -> list[Violation]:
    found = []
    count = len(vm.address_spaces)
    clean = generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    if clean % count != report.as_id:
        text = (f"generation {generation:#x} is {clean % count} modulo {count} address spaces, expected "
                f"{report.as_id}: generations of different address spaces can collide")
        found.append(report(KIND_GENERATION_AS_ID, text))
    if vm.slots_lock_held is False and generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        text = (f"generation {generation:#x} has KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS set while slots_lock "
                "is free: one update under slots_lock sets and clears it, so a swap never finished")
        found.append(report(KIND_IN_PROGRESS_WHILE_IDLE, text))
    return found


# --- tree layout ------------------------------------------------------------------------------


def _check_tree_space(vm: VmMemslots, space: AddressSpace) -> list[Violation]:
    report = _Reporter(vm, space, None)
    sets: list[TreeSet] = space.sets  # type: ignore[assignment]
    indexes = [s.index for s in sets]
    if indexes != [0, 1] or space.active not in (0, 1):
        text = f"expected sets [0, 1] and active 0 or 1, got sets {indexes} and active {space.active}"
        return [report(KIND_SHAPE, text)]
    active, inactive = sets[space.active], sets[1 - space.active]
    found = _check_node_idx(report, sets) + _check_generation_pair(vm, report, space, active, inactive)
    for tree_set in sets:
        set_report = _Reporter(vm, space, tree_set.index)
        found += _check_generation(vm, set_report, tree_set.generation)
        if tree_set is inactive and vm.slots_lock_held:
            continue  # KVM may be editing the inactive set right now
        found += _check_tree_set(set_report, tree_set)
    if not update_in_flight(vm, space):
        found += _check_sync(vm, report, active, inactive)
    return found


def _check_tree_set(report: _Reporter, tree_set: TreeSet) -> list[Violation]:
    walk = tree_set.gfn_order
    found = [
        report(KIND_GFN_ORDER, f"gfn_tree walk has {_describe(a)} before {_describe(b)}: base_gfn must "
                               "strictly increase", (a.id, b.id))
        for a, b in zip(walk, walk[1:], strict=False)
        if b.base_gfn <= a.base_gfn
    ]
    found += _check_overlaps(report, walk)
    found += _check_membership(report, tree_set)
    found += _check_hva_spans(report, tree_set)
    found += _check_id_hash(report, tree_set.id_hash)
    last_used = tree_set.last_used_slot_id
    if last_used is not None and last_used not in {slot.id for slot in walk}:
        text = f"last_used_slot points at slot {last_used}, which is not in this set"
        found.append(report(KIND_LAST_USED_SLOT, text, (last_used,)))
    found += _check_depth(report, tree_set)
    found += _check_gmem(report, walk)
    return found


def _check_gmem(report: _Reporter, slots: list[Slot]) -> list[Violation]:
    """Only a slot created with KVM_MEM_GUEST_MEMFD gets a guest_memfd file (kvm_gmem_bind);
    the file may go away before the slot does (kvm_gmem_release clears it), so the
    converse does not hold."""
    return [report(KIND_GMEM_WITHOUT_FLAG, f"{_describe(slot)} has guest_memfd file {slot.gmem_file:#x} "
                   "but no KVM_MEM_GUEST_MEMFD flag", (slot.id,))
            for slot in slots if slot.gmem_file and not slot.flags & KVM_MEM_GUEST_MEMFD]


def _check_membership(report: _Reporter, tree_set: TreeSet) -> list[Violation]:
    """The gfn tree, the hva tree and the id hash must index the same slots, each once."""
    indexes = {
        "gfn_tree": [slot.id for slot in tree_set.gfn_order],
        "hva_tree": [node.slot_id for node in tree_set.hva_nodes],
        "id_hash": [slot_id for bucket in tree_set.id_hash for slot_id in bucket],
    }
    kinds = {"gfn_tree": KIND_MISSING_FROM_GFN_TREE, "hva_tree": KIND_MISSING_FROM_HVA_TREE,
             "id_hash": KIND_MISSING_FROM_ID_HASH}
    found = []
    for name, ids in indexes.items():
        twice = sorted(slot_id for slot_id, n in Counter(ids).items() if n > 1)
        if twice:
            found.append(report(KIND_DUPLICATE_SLOT, f"{name} holds slot ids {_listed(twice)} more than once",
                                twice))
    everywhere = set().union(*indexes.values())
    for name, ids in indexes.items():
        missing = sorted(everywhere - set(ids))
        if missing:
            holders = " and ".join(other for other, held in indexes.items() if set(missing) & set(held))
            text = f"slot ids {_listed(missing)} are in the {holders} but missing from the {name}"
            found.append(report(kinds[name], text, missing))
    return found


def _check_hva_spans(report: _Reporter, tree_set: TreeSet) -> list[Violation]:
    by_id = {slot.id: slot for slot in reversed(tree_set.gfn_order)}
    found = []
    for node in tree_set.hva_nodes:
        slot = by_id.get(node.slot_id)
        if slot is None:
            continue  # reported as missing from the gfn tree
        if (node.start, node.last) != (slot.userspace_addr, slot.hva_end - 1):
            text = (f"hva node of slot {slot.id} spans [{node.start:#x}, {node.last:#x}] but the slot's "
                    f"userspace_addr {slot.userspace_addr:#x} + {slot.npages} pages * {PAGE_SIZE} gives "
                    f"[{slot.userspace_addr:#x}, {slot.hva_end - 1:#x}]")
            found.append(report(KIND_HVA_SPAN, text, (slot.id,)))
    return found


def _check_id_hash(report: _Reporter, id_hash: list[list[int]]) -> list[Violation]:
    buckets = 1 << ID_HASH_BITS
    if len(id_hash) != buckets:
        return [report(KIND_ID_HASH_BUCKET, f"id_hash has {len(id_hash)} buckets, expected {buckets}")]
    found = []
    for bucket, ids in enumerate(id_hash):
        for slot_id in ids:
            expected = hash_32(slot_id, ID_HASH_BITS)
            if expected != bucket:
                text = (f"slot {slot_id} is in id_hash bucket {bucket} but hash_32({slot_id}, "
                        f"{ID_HASH_BITS}) is {expected}: id_to_memslot cannot find it")
                found.append(report(KIND_ID_HASH_BUCKET, text, (slot_id,)))
    return found


def _check_depth(report: _Reporter, tree_set: TreeSet) -> list[Violation]:
    """A binary tree of n nodes is at least n.bit_length() deep, a red-black one at most 2*log2(n+1)."""
    n, depth = len(tree_set.gfn_order), tree_set.gfn_tree_depth
    if n.bit_length() <= depth and (1 << depth) <= (n + 1) ** 2:
        return []
    text = f"gfn_tree of {n} slots is {depth} deep; a red-black tree of {n} nodes is {n.bit_length()} to "
    return [report(KIND_GFN_TREE_DEPTH, text + f"2*log2({n + 1}) deep")]


def _check_node_idx(report: _Reporter, sets: list[TreeSet]) -> list[Violation]:
    """``kvm_get_inactive_memslots`` finds the other set at ``__memslots[as_id][active->node_idx ^ 1]``."""
    if all(s.node_idx == s.index for s in sets):
        return []
    got = ", ".join(f"set {s.index} node_idx {s.node_idx}" for s in sets)
    text = (f"{got}: set j must use node_idx j, else the sets share the nodes of each slot or the "
            "inactive set is looked up at the wrong index")
    return [report(KIND_NODE_IDX, text)]


def _check_generation_pair(vm: VmMemslots, report: _Reporter, space: AddressSpace,
                           active: TreeSet, inactive: TreeSet) -> list[Violation]:
    """Settled: active = inactive + N, or both still ``as_id``; mid-swap: one flagged over the other."""
    bit, count = KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, len(vm.address_spaces)
    flagged = [s for s in (active, inactive) if s.generation & bit]
    if len(flagged) == 1:
        ok = active.generation & ~bit == inactive.generation & ~bit
    elif not flagged:
        ok = (active.generation == inactive.generation + count
              or active.generation == inactive.generation == space.as_id)
    else:
        ok = False
    if ok:
        return []
    text = (f"active set {active.index} generation {active.generation:#x}, inactive set {inactive.index} "
            f"generation {inactive.generation:#x}: expected active = inactive + {count} (address spaces), "
            f"both {space.as_id} before the first update, or one flagged in-progress over the other's value")
    return [report(KIND_GENERATION_PAIR, text)]


def _check_sync(vm: VmMemslots, report: _Reporter, active: TreeSet, inactive: TreeSet) -> list[Violation]:
    """With no update in flight both sets hold the same slots with the same fields."""
    a = {slot.id: slot for slot in active.gfn_order}
    b = {slot.id: slot for slot in inactive.gfn_order}
    differ = sorted(slot_id for slot_id in a.keys() | b.keys() if a.get(slot_id) != b.get(slot_id))
    if not differ:
        return []
    details = []
    for slot_id in differ:
        mine, theirs = a.get(slot_id), b.get(slot_id)
        if theirs is None and mine is not None:
            details.append(f"{_describe(mine)} only in active set {active.index}")
        elif mine is None and theirs is not None:
            details.append(f"{_describe(theirs)} only in inactive set {inactive.index}")
        elif mine is not None and theirs is not None:
            details.append(f"active set {active.index} has {_describe(mine)}, inactive set {inactive.index} "
                           f"has {_describe(theirs)}")
    why = ("slots_lock is free" if vm.slots_lock_held is False else
           "no generation has the in-progress bit (slots_lock not read: a snapshot taken while KVM edits "
           "the inactive set looks like this too)")
    text = f"sets differ although {why}: {_listed(details, '; ')}"
    return [report(KIND_SETS_OUT_OF_SYNC, text, differ)]


# --- array layout -----------------------------------------------------------------------------


def _check_array_space(vm: VmMemslots, space: AddressSpace) -> list[Violation]:
    report = _Reporter(vm, space, 0)
    if len(space.sets) != 1 or space.active != 0:
        text = f"expected one set, active 0; got {len(space.sets)} sets, active {space.active}"
        return [report(KIND_SHAPE, text)]
    array: ArraySet = space.sets[0]  # type: ignore[assignment]
    if array.used_slots != len(array.memslots):
        return [report(KIND_SHAPE, f"used_slots {array.used_slots} but {len(array.memslots)} entries read")]
    slots = array.memslots
    found = _check_generation(vm, report, array.generation)
    for i, (a, b) in enumerate(zip(slots, slots[1:], strict=False)):
        if b.base_gfn >= a.base_gfn:
            text = (f"memslots[{i}] {_describe(a)} before memslots[{i + 1}] {_describe(b)}: base_gfn must "
                    "strictly decrease (search_memslots bisects on it)")
            found.append(report(KIND_ARRAY_ORDER, text, (a.id, b.id)))
    found += _check_overlaps(report, slots)
    found += _check_id_to_index(report, array)
    if not (0 <= array.lru_slot < array.used_slots or array.lru_slot == array.used_slots == 0):
        text = (f"lru_slot {array.lru_slot} outside [0, {array.used_slots}): search_memslots reads "
                "memslots[lru_slot] before bisecting")
        found.append(report(KIND_LRU_SLOT, text))
    return found


def _check_id_to_index(report: _Reporter, array: ArraySet) -> list[Violation]:
    """``id_to_index[memslots[i].id] == i``; -1 for every other id, as kvm_alloc_memslots and
    kvm_memslot_delete leave it."""
    expected = {slot.id: i for i, slot in enumerate(array.memslots)}
    wrong = [(slot_id, index) for slot_id, index in enumerate(array.id_to_index)
             if index != expected.get(slot_id, -1)]
    beyond = sorted(slot_id for slot_id in expected if not 0 <= slot_id < len(array.id_to_index))
    found = []
    if wrong:
        shown = _listed(f"id {slot_id} -> {index} (expected {expected.get(slot_id, -1)})"
                        for slot_id, index in wrong)
        text = f"id_to_index is not the inverse of memslots[]: {shown}"
        found.append(report(KIND_ID_TO_INDEX, text, [slot_id for slot_id, _ in wrong]))
    if beyond:
        text = f"slot ids {_listed(beyond)} lie outside id_to_index's {len(array.id_to_index)} entries"
        found.append(report(KIND_ID_TO_INDEX, text, beyond))
    return found


def main(prog, argv: list[str]) -> int:
    """The drgn script: check every VM (or those of ``--pid``) of ``prog``'s kernel."""
    from drgn_scripts.memslots import read_vms

    parser = argparse.ArgumentParser(prog="memslot_invariants.py", description="check KVM memslot invariants")
    parser.add_argument("--pid", type=int, help="only the VMs of this process")
    parser.add_argument("--json", action="store_true", help="JSON records instead of lines")
    args = parser.parse_args(argv)
    vms = read_vms(prog, args.pid)
    violations = [v for vm in vms for v in check_vm(vm)]
    if args.json:
        print(json.dumps({"vms": len(vms), "violations": to_json(violations)}))
    elif violations:
        print(render(violations))
    else:
        print(f"{len(vms)} VMs checked, no violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main(prog, sys.argv[1:]))  # noqa: F821 - drgn defines prog for scripts
