"""The memslot invariant checker against hand-built layouts: clean ones, then one corruption each.

Every corruption test asserts the exact multiset of violation kinds, so a check that also
fires on the clean parts (or a corruption reported under two kinds) fails the test.
"""

import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict as dataclasses_asdict
from dataclasses import replace

import pytest

from drgn_scripts import memslot_invariants as inv
from drgn_scripts.memslot_model import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    AddressSpace,
    ArraySet,
    HvaNode,
    Slot,
    TreeSet,
    VmMemslots,
)

VM_ADDRESS = 0xFFFF888004A10000
PID = 4242
BIT = KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
WHERE = f"kvm {VM_ADDRESS:#x} pid {PID}"


def make_slots(count: int = 40, hva_base: int = 0x7F0000000000) -> list[Slot]:
    """Slots whose id order, gfn order and hva order all differ, with gaps and mixed flags."""
    slots, gfn = [], 0x100
    for i in range(count):
        npages = 1 + (i % 5) * 8  # 1, 9, 17, 25, 33 pages
        flags = KVM_MEM_LOG_DIRTY_PAGES if i % 3 == 0 else KVM_MEM_READONLY if i % 7 == 0 else 0
        slot_id = (i * 17) % count  # a permutation of 0..count-1
        slots.append(Slot(slot_id, gfn, npages, hva_base + (count - i) * 0x1000000, flags))
        gfn += npages + i % 2
    return slots


def tree_set(slots: list[Slot], index: int, generation: int, last_used: int | None = None) -> TreeSet:
    id_hash: list[list[int]] = [[] for _ in range(128)]
    for slot in slots:
        id_hash[inv.hash_32(slot.id, 7)].append(slot.id)
    return TreeSet(
        index=index, node_idx=index, generation=generation,
        gfn_order=sorted(slots, key=lambda s: s.base_gfn),
        hva_nodes=[HvaNode(s.id, s.userspace_addr, s.hva_end - 1)
                   for s in sorted(slots, key=lambda s: s.userspace_addr)],
        id_hash=id_hash, last_used_slot_id=last_used, gfn_tree_depth=len(slots).bit_length(),
    )


def tree_vm(slots: list[Slot] | None = None, lock: bool | None = False) -> VmMemslots:
    """As 0 (40 slots, active set 1) and as 1 (3 slots, active set 0), both settled after updates."""
    slots = make_slots() if slots is None else slots
    smm = make_slots(3, hva_base=0x7E0000000000)
    spaces = [
        AddressSpace(0, "tree", 1, [tree_set(slots, 0, 40), tree_set(slots, 1, 42, last_used=slots[3].id)]),
        AddressSpace(1, "tree", 0, [tree_set(smm, 0, 7, last_used=smm[0].id), tree_set(smm, 1, 5)]),
    ]
    return VmMemslots(VM_ADDRESS, PID, spaces, [slots[3].id, None], slots_lock_held=lock)


def array_set(in_order: list[Slot], generation: int, lru_slot: int = 5) -> ArraySet:
    id_to_index = [-1] * 512
    for index, slot in enumerate(in_order):
        id_to_index[slot.id] = index
    return ArraySet(generation, len(in_order), in_order, id_to_index, lru_slot)


def descending(slots: list[Slot]) -> list[Slot]:
    return sorted(slots, key=lambda s: s.base_gfn, reverse=True)


def array_vm(slots: list[Slot] | None = None, lock: bool | None = False) -> VmMemslots:
    slots = make_slots() if slots is None else slots
    spaces = [
        AddressSpace(0, "array", 0, [array_set(descending(slots), 84)]),
        AddressSpace(1, "array", 0, [array_set(descending(make_slots(3)), 9, lru_slot=2)]),
    ]
    return VmMemslots(VM_ADDRESS, PID, spaces, [None, None], slots_lock_held=lock)


def put_set(vm: VmMemslots, as_id: int, position: int, new: TreeSet | ArraySet) -> VmMemslots:
    space = vm.address_spaces[as_id]
    sets = [new if i == position else s for i, s in enumerate(space.sets)]
    spaces = [replace(space, sets=sets) if s is space else s for s in vm.address_spaces]
    return replace(vm, address_spaces=spaces)


def with_set(vm: VmMemslots, as_id: int, position: int, **changes) -> VmMemslots:
    return put_set(vm, as_id, position, replace(vm.address_spaces[as_id].sets[position], **changes))


def kinds(violations: list[inv.Violation]) -> Counter:
    return Counter(v.kind for v in violations)


def only(vm: VmMemslots, kind: str) -> inv.Violation:
    """The single violation of ``vm``, which must be of ``kind``."""
    found = inv.check_vm(vm)
    assert kinds(found) == {kind: 1}, inv.render(found)
    return found[0]


# --- clean layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("lock", [False, None])
def test_clean_tree_layout(lock):
    assert inv.check_vm(tree_vm(lock=lock)) == []


@pytest.mark.parametrize("lock", [False, None])
def test_clean_array_layout(lock):
    assert inv.check_vm(array_vm(lock=lock)) == []


def test_fresh_vm_before_any_update():
    """kvm_create_vm: both sets empty at generation as_id; the array layout likewise, lru_slot 0."""
    tree = VmMemslots(VM_ADDRESS, PID, [
        AddressSpace(a, "tree", 0, [tree_set([], 0, a), tree_set([], 1, a)]) for a in (0, 1)], [])
    array = VmMemslots(VM_ADDRESS, PID, [
        AddressSpace(a, "array", 0, [array_set([], a, lru_slot=0)]) for a in (0, 1)], [])
    assert inv.check_vm(tree) == [] and inv.check_vm(array) == []


def test_hash_32_matches_the_kernel():
    """(id * 0x61C88647 mod 2^32) >> 25, worked by hand for a few ids."""
    assert [inv.hash_32(i, 7) for i in (0, 1, 2, 3, 32763)] == [0, 48, 97, 18, 45]


# --- updates in flight are not corruption -----------------------------------------------------


def test_inactive_set_mid_edit_under_slots_lock_is_not_reported():
    """kvm_replace_memslot between hash_del and hash_add: id missing from the inactive hash, sets differ."""
    vm = tree_vm(lock=True)
    inactive = vm.address_spaces[0].sets[0]
    victim = inactive.gfn_order[7].id
    id_hash = [[i for i in bucket if i != victim] for bucket in inactive.id_hash]
    assert inv.check_vm(with_set(vm, 0, 0, id_hash=id_hash, gfn_order=inactive.gfn_order[:7])) == []


def test_swap_in_progress_without_lock_state_is_not_reported():
    """kvm_swap_active_memslots: the new set flagged while waiting for invalidations, then published."""
    vm = tree_vm(make_slots(), lock=None)
    waiting = put_set(vm, 0, 0, tree_set(make_slots()[1:], 0, 42 | BIT))  # slot deleted in the new set
    assert inv.check_vm(waiting) == []
    published = with_set(vm, 0, 1, generation=40 | BIT)  # active, waiting for SRCU readers
    assert inv.check_vm(published) == []


# --- tree corruptions -------------------------------------------------------------------------


def test_tree_swapped_pair_in_gfn_order():
    vm = tree_vm()
    walk = list(vm.address_spaces[0].sets[1].gfn_order)
    walk[10], walk[11] = walk[11], walk[10]
    v = only(with_set(vm, 0, 1, gfn_order=walk), "gfn_order")
    assert v.slot_ids == (walk[10].id, walk[11].id) and (v.as_id, v.set_index) == (0, 1)
    assert f"{WHERE} as 0 set 1 (active)" in v.message and f"gfn [{walk[11].base_gfn:#x}" in v.message


def test_tree_overlap():
    slots = make_slots()
    prev, moved = slots[2], slots[3]  # 17 pages, then 25
    slots[3] = replace(moved, base_gfn=prev.base_gfn + 1)
    found = inv.check_vm(tree_vm(slots))
    assert kinds(found) == {"gfn_overlap": 2}  # the slot is in both sets
    assert {v.set_index for v in found} == {0, 1} and found[0].slot_ids == (prev.id, moved.id)


def test_tree_slot_missing_from_hva_tree():
    vm = tree_vm()
    nodes = vm.address_spaces[0].sets[1].hva_nodes
    v = only(with_set(vm, 0, 1, hva_nodes=nodes[:5] + nodes[6:]), "missing_from_hva_tree")
    assert v.slot_ids == (nodes[5].slot_id,)
    assert "in the gfn_tree and id_hash but missing from the hva_tree" in v.message


def test_tree_slot_missing_from_id_hash():
    vm = tree_vm()
    id_hash = [list(bucket) for bucket in vm.address_spaces[0].sets[1].id_hash]
    bucket = next(b for b in id_hash if b)
    victim = bucket.pop()
    v = only(with_set(vm, 0, 1, id_hash=id_hash), "missing_from_id_hash")
    assert v.slot_ids == (victim,)


def test_tree_stale_hva_interval():
    """The slot's userspace_addr changed in both sets, the active set's hva node kept the old range."""
    old = make_slots()
    slots = list(old)
    slots[8] = replace(old[8], userspace_addr=old[8].userspace_addr + 0x200000)
    vm = tree_vm(slots)
    stale = tree_set(old, 1, 42).hva_nodes
    v = only(with_set(vm, 0, 1, hva_nodes=stale), "hva_span")
    assert v.slot_ids == (old[8].id,)
    assert f"[{old[8].userspace_addr:#x}, {old[8].hva_end - 1:#x}]" in v.message
    assert f"[{slots[8].userspace_addr:#x}, {slots[8].hva_end - 1:#x}]" in v.message


def test_tree_sets_out_of_sync_when_idle():
    slots = make_slots()
    stale = [replace(s, flags=s.flags ^ KVM_MEM_LOG_DIRTY_PAGES) if s is slots[4] else s for s in slots]
    vm = put_set(tree_vm(slots), 0, 0, tree_set(stale[:20] + stale[21:], 0, 40))
    v = only(vm, "sets_out_of_sync")
    assert set(v.slot_ids) == {slots[4].id, slots[20].id} and v.set_index is None
    assert "slots_lock is free" in v.message and "only in active set 1" in v.message


def test_tree_sets_with_the_same_node_idx():
    v = only(with_set(tree_vm(), 0, 0, node_idx=1), "node_idx")
    assert "set 0 node_idx 1, set 1 node_idx 1" in v.message


def test_tree_in_progress_bit_on_the_idle_active_set():
    """A swap that published the new set but never stored the final generation, slots_lock released."""
    v = only(with_set(tree_vm(), 0, 1, generation=40 | BIT), "in_progress_while_idle")
    assert (v.as_id, v.set_index) == (0, 1) and "set 1 (active)" in v.message


def test_tree_id_in_the_wrong_hash_bucket():
    vm = tree_vm()
    id_hash = [list(bucket) for bucket in vm.address_spaces[0].sets[1].id_hash]
    source = next(i for i, b in enumerate(id_hash) if b)
    victim = id_hash[source].pop()
    id_hash[(source + 1) % 128].append(victim)
    assert only(with_set(vm, 0, 1, id_hash=id_hash), "id_hash_bucket").slot_ids == (victim,)


def test_tree_last_used_slot_outside_its_set():
    assert only(with_set(tree_vm(), 0, 1, last_used_slot_id=999), "last_used_slot").slot_ids == (999,)


def test_tree_depth_of_a_degenerate_tree():
    v = only(with_set(tree_vm(), 0, 1, gfn_tree_depth=12), "gfn_tree_depth")
    assert "40 slots is 12 deep" in v.message


def test_tree_generation_pair_too_far_apart():
    only(with_set(tree_vm(), 0, 1, generation=44), "generation_pair")


def test_tree_slot_hashed_twice():
    vm = tree_vm()
    id_hash = [list(bucket) for bucket in vm.address_spaces[1].sets[0].id_hash]
    bucket = next(b for b in id_hash if b)
    bucket.append(bucket[0])
    v = only(with_set(vm, 1, 0, id_hash=id_hash), "duplicate_slot")
    assert v.slot_ids == (bucket[0],) and "id_hash holds slot ids" in v.message


# --- array corruptions ------------------------------------------------------------------------


def test_array_swapped_pair():
    in_order = descending(make_slots())
    in_order[4], in_order[5] = in_order[5], in_order[4]
    vm = put_set(array_vm(), 0, 0, array_set(in_order, 84))  # id_to_index follows the swap
    v = only(vm, "array_order")
    assert v.slot_ids == (in_order[4].id, in_order[5].id) and "memslots[4]" in v.message


def test_array_id_to_index_not_inverse():
    vm = array_vm()
    array = vm.address_spaces[0].sets[0]
    id_to_index = list(array.id_to_index)
    first, unused = array.memslots[0].id, 500
    id_to_index[first], id_to_index[unused] = 3, 7
    v = only(with_set(vm, 0, 0, id_to_index=id_to_index), "id_to_index")
    assert v.slot_ids == (first, unused)
    assert f"id {first} -> 3 (expected 0)" in v.message and "id 500 -> 7 (expected -1)" in v.message


@pytest.mark.parametrize("used, lru", [(40, 40), (40, -1), (0, 1)])
def test_array_lru_slot_out_of_range(used, lru):
    vm = array_vm() if used else put_set(array_vm(), 0, 0, array_set([], 84))
    assert f"lru_slot {lru} outside [0, {used})" in only(with_set(vm, 0, 0, lru_slot=lru), "lru_slot").message


def test_array_overlap():
    slots = make_slots()
    slots[3] = replace(slots[3], base_gfn=slots[2].base_gfn + 1)
    assert only(array_vm(slots), "gfn_overlap").slot_ids == (slots[2].id, slots[3].id)


def test_array_generation_of_the_wrong_address_space():
    only(with_set(array_vm(), 1, 0, generation=10), "generation_as_id")


def test_array_in_progress_bit_while_idle():
    vm = with_set(array_vm(), 0, 0, generation=84 | BIT)
    only(vm, "in_progress_while_idle")
    assert inv.check_vm(replace(vm, slots_lock_held=True)) == []  # install_new_memslots at work


# --- several at once, output ------------------------------------------------------------------


def test_each_corruption_is_its_own_violation():
    vm = tree_vm()
    active = vm.address_spaces[0].sets[1]
    walk = list(active.gfn_order)
    walk[0], walk[1] = walk[1], walk[0]
    vm = with_set(vm, 0, 1, gfn_order=walk, hva_nodes=active.hva_nodes[1:], last_used_slot_id=77)
    vm = with_set(vm, 1, 1, node_idx=0)
    found = inv.check_vm(vm)
    assert kinds(found) == {"gfn_order": 1, "missing_from_hva_tree": 1, "last_used_slot": 1, "node_idx": 1}
    assert len(inv.render(found).splitlines()) == 4


def test_render_and_json():
    found = inv.check_vm(with_set(array_vm(), 0, 0, lru_slot=99))
    assert inv.render(found) == f"lru_slot: {found[0].message}"
    record = json.loads(json.dumps(inv.to_json(found)))[0]
    assert record["kind"] == "lru_slot" and record["vm"] == WHERE and record["slot_ids"] == []


def gmem_slots(*, flag_on_bound: bool) -> list[Slot]:
    """The 7.x layout: every slot has gmem.file; two are guest_memfd slots, one of them
    with its file already released (kvm_gmem_release clears it before the slot goes)."""
    slots = [replace(slot, gmem_file=0) for slot in make_slots()]
    bound = 0xFFFF888012345600
    slots[4] = replace(slots[4], flags=KVM_MEM_GUEST_MEMFD if flag_on_bound else 0, gmem_file=bound)
    slots[9] = replace(slots[9], flags=KVM_MEM_GUEST_MEMFD, gmem_file=0)
    return slots


def test_7x_guest_memfd_slots_bound_and_released_are_clean():
    assert inv.check_vm(tree_vm(gmem_slots(flag_on_bound=True))) == []


def test_7x_guest_memfd_file_on_a_slot_without_the_flag():
    vm = tree_vm(gmem_slots(flag_on_bound=False))
    found = inv.check_vm(vm)
    assert kinds(found) == Counter({"gmem_without_flag": 2})  # in each of as 0's two sets
    slot = vm.address_spaces[0].sets[0].gfn_order[4]
    assert {v.slot_ids for v in found} == {(slot.id,)}
    assert "guest_memfd file 0xffff888012345600 but no KVM_MEM_GUEST_MEMFD flag" in found[0].message


def test_7x_layout_json_round_trip_keeps_gmem():
    vm = tree_vm(gmem_slots(flag_on_bound=True))
    again = VmMemslots.from_json(json.loads(json.dumps(vm.to_json())))
    assert again == vm and again.address_spaces[0].sets[0].gfn_order[4].gmem_file == 0xFFFF888012345600
    old = Slot(**{k: v for k, v in dataclasses_asdict(make_slots(1)[0]).items() if k != "gmem_file"})
    assert old.gmem_file is None  # a snapshot from before 7.x reads as "no gmem field"


@pytest.mark.parametrize("make", [tree_vm, array_vm])
def test_model_json_round_trip(make):
    vm = make()
    assert VmMemslots.from_json(json.loads(json.dumps(vm.to_json()))) == vm


def test_slot_properties():
    slot = Slot(3, 0x100, 16, 0x7F0000000000, KVM_MEM_LOG_DIRTY_PAGES)
    assert slot.dirty_logging and not slot.readonly
    assert (slot.gfn_end, slot.hva_end) == (0x110, 0x7F0000010000)


def test_imports_without_drgn():
    code = ("import sys; sys.modules['drgn'] = None; "
            "import drgn_scripts.memslot_invariants, drgn_scripts.memslot_model")
    subprocess.run([sys.executable, "-c", code], check=True)
