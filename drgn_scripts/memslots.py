"""Read every VM's memslots out of a running kernel with drgn.

Run as a drgn script::

    drgn --qemu QMP_SOCKET --no-default-symbols -s vmlinux -s kvm.ko \
        drgn_scripts/memslots.py [--pid P] [--json]
    drgn -k drgn_scripts/memslots.py          # inside a guest
    drgn -c vmcore drgn_scripts/memslots.py

or import it: :func:`read_vms` takes a ``drgn.Program`` and returns
:class:`~drgn_scripts.memslot_model.VmMemslots` records, which
``memslot_invariants`` checks and :func:`render` prints.

The layout is told from the types the kernel has, never from its version: a
``struct kvm_memslots`` with ``gfn_tree`` is the tree layout of Linux >= 5.17, one with
``id_to_index`` the array of Linux <= 5.16.
"""

from __future__ import annotations

import argparse
import json
import sys

from drgn import Object, Program, container_of
from drgn.helpers.linux.list import hlist_for_each_entry, list_for_each_entry

try:
    from drgn_scripts.memslot_model import AddressSpace, ArraySet, HvaNode, Slot, TreeSet, VmMemslots
except ImportError:  # run as a script by drgn: the package may not be importable
    sys.path.insert(0, __file__.rsplit("/", 2)[0])
    from drgn_scripts.memslot_model import AddressSpace, ArraySet, HvaNode, Slot, TreeSet, VmMemslots

__all__ = ["layout", "read_vm", "read_vms", "render"]


def layout(prog: Program) -> str:
    """``"tree"`` or ``"array"``, from the members of ``struct kvm_memslots``."""
    memslots = prog.type("struct kvm_memslots")
    if memslots.has_member("gfn_tree"):
        return "tree"
    if memslots.has_member("id_to_index"):
        return "array"
    raise LookupError("struct kvm_memslots has neither gfn_tree nor id_to_index")


def read_vms(prog: Program, pid: int | None = None) -> list[VmMemslots]:
    """Every VM on ``vm_list`` (or only those of ``pid``), in list order."""
    kind = layout(prog)
    vms = []
    for kvm in list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"):
        if pid is None or _pid(kvm) == pid:
            vms.append(read_vm(kvm, kind))
    return vms


def read_vm(kvm: Object, kind: str) -> VmMemslots:
    """The memslots of one ``struct kvm *``."""
    read_space = _tree_space if kind == "tree" else _array_space
    count = len(kvm.memslots)
    owner = kvm.slots_lock.owner.counter.value_()
    return VmMemslots(
        address=kvm.value_(),
        pid=_pid(kvm),
        address_spaces=[read_space(kvm, as_id) for as_id in range(count)],
        vcpu_last_used_slot_ids=_vcpu_last_used(kvm),
        slots_lock_held=owner != 0,
    )


def _pid(kvm: Object) -> int:
    if kvm.type_.type.has_member("userspace_pid"):
        return kvm.userspace_pid.value_()
    return -1


def _slot(slot: Object) -> Slot:
    return Slot(
        id=slot.id.value_(), base_gfn=slot.base_gfn.value_(), npages=slot.npages.value_(),
        userspace_addr=slot.userspace_addr.value_(), flags=slot.flags.value_(),
    )


# -- the tree layout (Linux >= 5.17) ------------------------------------------------
def _tree_space(kvm: Object, as_id: int) -> AddressSpace:
    active = kvm.memslots[as_id].value_()
    sets = [kvm.__memslots[as_id][index] for index in range(2)]
    active_index = next(i for i, s in enumerate(sets) if s.address_of_().value_() == active)
    return AddressSpace(as_id=as_id, layout="tree", active=active_index,
                        sets=[_tree_set(s, i) for i, s in enumerate(sets)])


def _tree_set(memslots: Object, index: int) -> TreeSet:
    idx = memslots.node_idx.value_()
    gfn_order, depth = _gfn_walk(memslots.gfn_tree.rb_node, idx)
    last_used = memslots.last_used_slot.counter.value_()
    return TreeSet(
        index=index,
        node_idx=idx,
        generation=memslots.generation.value_(),
        gfn_order=gfn_order,
        hva_nodes=_hva_nodes(memslots.hva_tree.rb_root.rb_node, idx),
        id_hash=[[_slot(s).id for s in hlist_for_each_entry("struct kvm_memory_slot", bucket.address_of_(),
                                                              f"id_node[{idx}]")]
                 for bucket in memslots.id_hash],
        last_used_slot_id=_slot_at(memslots.prog_, last_used),
        gfn_tree_depth=depth,
    )


def _gfn_walk(node: Object, idx: int) -> tuple[list[Slot], int]:
    """In-order slots of the gfn rbtree under ``node``, and the tree's depth.

    Written out instead of drgn's rbtree iterator because the depth comes from the
    same walk.
    """
    if not node.value_():
        return [], 0
    left, left_depth = _gfn_walk(node.rb_left, idx)
    right, right_depth = _gfn_walk(node.rb_right, idx)
    slot = container_of(node, "struct kvm_memory_slot", f"gfn_node[{idx}]")
    return left + [_slot(slot)] + right, 1 + max(left_depth, right_depth)


def _hva_nodes(node: Object, idx: int) -> list[HvaNode]:
    if not node.value_():
        return []
    interval = container_of(node, "struct interval_tree_node", "rb")
    slot = container_of(interval, "struct kvm_memory_slot", f"hva_node[{idx}]")
    here = HvaNode(slot_id=slot.id.value_(), start=interval.start.value_(), last=interval.last.value_())
    return _hva_nodes(node.rb_left, idx) + [here] + _hva_nodes(node.rb_right, idx)


def _slot_at(prog: Program, address: int) -> int | None:
    if not address:
        return None
    return Object(prog, "struct kvm_memory_slot *", address).id.value_()


def _vcpu_last_used(kvm: Object) -> list[int | None]:
    """Each vCPU's ``last_used_slot`` id (tree layout only; the array has no such field)."""
    vcpu_type = kvm.prog_.type("struct kvm_vcpu")
    if not vcpu_type.has_member("last_used_slot"):
        return []
    ids = []
    for number in range(kvm.online_vcpus.counter.value_()):
        vcpu = _vcpu(kvm, number)
        ids.append(_slot_at(kvm.prog_, vcpu.last_used_slot.value_()) if vcpu else None)
    return ids


def _vcpu(kvm: Object, number: int) -> Object | None:
    if kvm.type_.type.has_member("vcpu_array"):
        from drgn.helpers.linux.xarray import xa_load

        entry = xa_load(kvm.vcpu_array.address_of_(), number)
        return Object(kvm.prog_, "struct kvm_vcpu *", entry.value_()) if entry.value_() else None
    pointer = kvm.vcpus[number]
    return pointer if pointer.value_() else None


# -- the array layout (Linux <= 5.16) ------------------------------------------------
def _array_space(kvm: Object, as_id: int) -> AddressSpace:
    slots = kvm.memslots[as_id]
    used = slots.used_slots.value_()
    return AddressSpace(as_id=as_id, layout="array", active=0, sets=[ArraySet(
        generation=slots.generation.value_(),
        used_slots=used,
        memslots=[_slot(slots.memslots[i]) for i in range(used)],
        id_to_index=[int(v) for v in slots.id_to_index.read_()],
        lru_slot=slots.lru_slot.counter.value_(),
    )])


# -- output ----------------------------------------------------------------------------
def render(vms: list[VmMemslots]) -> str:
    """A table per VM and address space: slots in gfn order, and the layout's own facts."""
    lines = []
    for vm in vms:
        lines.append(f"VM {vm.address:#x} pid {vm.pid}")
        for space in vm.address_spaces:
            lines += _render_space(space)
    return "\n".join(lines) if lines else "no VMs on vm_list"


def _render_space(space: AddressSpace) -> list[str]:
    if space.layout == "tree":
        active = space.sets[space.active]
        hashed = sum(1 for bucket in active.id_hash if bucket)
        facts = (f"tree layout, active set {space.active} (node_idx {active.node_idx}), "
                 f"generation {active.generation}, gfn tree depth {active.gfn_tree_depth}, "
                 f"id hash {hashed}/{len(active.id_hash)} buckets used, "
                 f"last used slot {active.last_used_slot_id}")
        slots = active.gfn_order
    else:
        array = space.sets[0]
        facts = (f"array layout, generation {array.generation}, used_slots {array.used_slots}, "
                 f"lru_slot {array.lru_slot}")
        slots = sorted(array.memslots, key=lambda s: s.base_gfn)
    lines = [f"  address space {space.as_id}: {len(slots)} slots; {facts}"]
    if slots:
        header = f"{'id':>6} {'base_gfn':>12} {'npages':>10} {'userspace_addr':>18} {'flags':>6} dirty-log"
        lines.append(f"    {header}")
    for slot in slots:
        lines.append(f"    {slot.id:>6} {slot.base_gfn:>#12x} {slot.npages:>10} {slot.userspace_addr:>#18x} "
                     f"{slot.flags:>#6x} {'on' if slot.dirty_logging else 'off'}")
    return lines


def main(prog: Program, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="memslots.py", description="dump every VM's KVM memslots")
    parser.add_argument("--pid", type=int, help="only the VMs of this process")
    parser.add_argument("--json", action="store_true", help="JSON records instead of tables")
    args = parser.parse_args(argv)
    vms = read_vms(prog, args.pid)
    if args.json:
        print(json.dumps([vm.to_json() for vm in vms]))
    else:
        print(render(vms))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog, sys.argv[1:]))  # noqa: F821 - drgn defines prog for scripts
