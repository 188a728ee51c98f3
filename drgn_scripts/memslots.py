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
import struct
import sys

from drgn import Object, Program, offsetof, sizeof
from drgn.helpers.linux.list import list_for_each_entry

try:
    from drgn_scripts.memslot_model import AddressSpace, ArraySet, HvaNode, Slot, TreeSet, VmMemslots
except ImportError:  # run as a script by drgn: the package may not be importable
    sys.path.insert(0, __file__.rsplit("/", 2)[0])
    from drgn_scripts.memslot_model import AddressSpace, ArraySet, HvaNode, Slot, TreeSet, VmMemslots

__all__ = ["SlotReader", "kvms", "layout", "read_vm", "read_vms", "render", "userspace_pid"]


def layout(prog: Program) -> str:
    """``"tree"`` or ``"array"``, from the members of ``struct kvm_memslots``."""
    memslots = prog.type("struct kvm_memslots")
    if memslots.has_member("gfn_tree"):
        return "tree"
    if memslots.has_member("id_to_index"):
        return "array"
    raise LookupError("struct kvm_memslots has neither gfn_tree nor id_to_index")


def kvms(prog: Program, pid: int | None = None) -> list[Object]:
    """The ``struct kvm *`` of every VM on ``vm_list`` (or only those of ``pid``), in list order."""
    return [kvm for kvm in list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list")
            if pid is None or userspace_pid(kvm) == pid]


def read_vms(prog: Program, pid: int | None = None) -> list[VmMemslots]:
    """Every VM on ``vm_list`` (or only those of ``pid``), in list order."""
    kind = layout(prog)
    return [read_vm(kvm, kind) for kvm in kvms(prog, pid)]


def read_vm(kvm: Object, kind: str) -> VmMemslots:
    """The memslots of one ``struct kvm *``."""
    reader = SlotReader(kvm.prog_)
    read_space = _tree_space if kind == "tree" else _array_space
    count = len(kvm.memslots)
    owner = kvm.slots_lock.owner.counter.value_()
    return VmMemslots(
        address=kvm.value_(),
        pid=userspace_pid(kvm),
        address_spaces=[read_space(kvm, as_id, reader) for as_id in range(count)],
        vcpu_last_used_slot_ids=_vcpu_last_used(kvm, reader),
        slots_lock_held=owner != 0,
    )


def userspace_pid(kvm: Object) -> int:
    if kvm.type_.type.has_member("userspace_pid"):
        return kvm.userspace_pid.value_()
    return -1


class SlotReader:
    """Reads ``struct kvm_memory_slot``s as raw bytes, one read per slot, unpacked at
    offsets looked up once in the kernel's DWARF.

    Going through drgn Objects costs microseconds per member access; a VM with 32764
    slots, each in two trees and a hash of two sets, would take tens of seconds that way.
    Slots are cached by address, so both sets of an address space share one read.
    """

    def __init__(self, prog: Program):
        self.prog = prog
        slot_type = prog.type("struct kvm_memory_slot")
        self.size = sizeof(slot_type)
        self.tree = slot_type.has_member("gfn_node")
        fields = ["base_gfn", "npages", "userspace_addr"]
        self._u64 = [offsetof(slot_type, name) for name in fields]
        self._flags = offsetof(slot_type, "flags")
        self._id = offsetof(slot_type, "id")
        self._gmem_file = offsetof(slot_type, "gmem.file") if slot_type.has_member("gmem") else None
        self._cache: dict[int, bytes] = {}
        if self.tree:
            rb = prog.type("struct rb_node")
            self.gfn_node = [offsetof(slot_type, f"gfn_node[{i}]") for i in range(2)]
            self.hva_node = [offsetof(slot_type, f"hva_node[{i}]") for i in range(2)]
            self.id_node = [offsetof(slot_type, f"id_node[{i}]") for i in range(2)]
            self._rb_left, self._rb_right = offsetof(rb, "rb_left"), offsetof(rb, "rb_right")
            interval = prog.type("struct interval_tree_node")
            self._start, self._last = offsetof(interval, "start"), offsetof(interval, "last")

    def raw(self, address: int) -> bytes:
        data = self._cache.get(address)
        if data is None:
            data = self._cache[address] = self.prog.read(address, self.size)
        return data

    def slot(self, data: bytes) -> Slot:
        base_gfn, npages, hva = (_U64.unpack_from(data, offset)[0] for offset in self._u64)
        gmem = None if self._gmem_file is None else _U64.unpack_from(data, self._gmem_file)[0]
        return Slot(id=_I16.unpack_from(data, self._id)[0], base_gfn=base_gfn, npages=npages,
                    userspace_addr=hva, flags=_U32.unpack_from(data, self._flags)[0], gmem_file=gmem)

    def slot_at(self, address: int) -> Slot:
        return self.slot(self.raw(address))

    def children(self, data: bytes, node_offset: int) -> tuple[int, int]:
        """The rb_left and rb_right pointers of the rb_node at ``node_offset`` in ``data``."""
        return (_U64.unpack_from(data, node_offset + self._rb_left)[0],
                _U64.unpack_from(data, node_offset + self._rb_right)[0])

    def interval(self, data: bytes, node_offset: int) -> tuple[int, int]:
        return (_U64.unpack_from(data, node_offset + self._start)[0],
                _U64.unpack_from(data, node_offset + self._last)[0])

    def next_in_hash(self, data: bytes, idx: int) -> int:
        return _U64.unpack_from(data, self.id_node[idx])[0]


_U64, _U32, _I16 = struct.Struct("<Q"), struct.Struct("<I"), struct.Struct("<h")


# -- the tree layout (Linux >= 5.17) ------------------------------------------------
def _tree_space(kvm: Object, as_id: int, reader: SlotReader) -> AddressSpace:
    active = kvm.memslots[as_id].value_()
    sets = [kvm.__memslots[as_id][index] for index in range(2)]
    active_index = next(i for i, s in enumerate(sets) if s.address_of_().value_() == active)
    return AddressSpace(as_id=as_id, layout="tree", active=active_index,
                        sets=[_tree_set(s, i, reader) for i, s in enumerate(sets)])


def _tree_set(memslots: Object, index: int, reader: SlotReader) -> TreeSet:
    idx = memslots.node_idx.value_()
    gfn_order, depth = _gfn_walk(reader, memslots.gfn_tree.rb_node.value_(), idx)
    last_used = memslots.last_used_slot.counter.value_()
    return TreeSet(
        index=index,
        node_idx=idx,
        generation=memslots.generation.value_(),
        gfn_order=gfn_order,
        hva_nodes=_hva_nodes(reader, memslots.hva_tree.rb_root.rb_node.value_(), idx),
        id_hash=_id_hash(reader, memslots, idx),
        last_used_slot_id=reader.slot_at(last_used).id if last_used else None,
        gfn_tree_depth=depth,
    )


def _gfn_walk(reader: SlotReader, root: int, idx: int) -> tuple[list[Slot], int]:
    """In-order slots of the gfn rbtree at ``root``, and the tree's depth.

    Iterative (a corrupted tree must not overflow the stack), and by hand rather than
    drgn's rbtree helpers because the depth comes from the same walk.
    """
    order, depth = [], 0
    stack: list[tuple[int, int]] = []  # (node, its depth)
    node, level = root, 1
    while stack or node:
        while node:
            stack.append((node, level))
            node = reader.children(reader.raw(node - reader.gfn_node[idx]), reader.gfn_node[idx])[0]
            level += 1
        node, level = stack.pop()
        depth = max(depth, level)
        data = reader.raw(node - reader.gfn_node[idx])
        order.append(reader.slot(data))
        node, level = reader.children(data, reader.gfn_node[idx])[1], level + 1
    return order, depth


def _hva_nodes(reader: SlotReader, root: int, idx: int) -> list[HvaNode]:
    nodes, pending = [], [root] if root else []
    offset = reader.hva_node[idx]
    while pending:
        data = reader.raw(pending.pop() - offset)
        start, last = reader.interval(data, offset)
        nodes.append(HvaNode(slot_id=reader.slot(data).id, start=start, last=last))
        pending += [child for child in reader.children(data, offset) if child]
    return nodes


def _id_hash(reader: SlotReader, memslots: Object, idx: int) -> list[list[int]]:
    heads = memslots.id_hash.read_()
    buckets = []
    for head in heads:
        ids, entry = [], head.first.value_()
        while entry:
            data = reader.raw(entry - reader.id_node[idx])
            ids.append(reader.slot(data).id)
            entry = reader.next_in_hash(data, idx)
        buckets.append(ids)
    return buckets


def _vcpu_last_used(kvm: Object, reader: SlotReader) -> list[int | None]:
    """Each vCPU's ``last_used_slot`` id (tree layout only; the array has no such field)."""
    vcpu_type = kvm.prog_.type("struct kvm_vcpu")
    if not vcpu_type.has_member("last_used_slot"):
        return []
    ids = []
    for number in range(kvm.online_vcpus.counter.value_()):
        vcpu = _vcpu(kvm, number)
        address = vcpu.last_used_slot.value_() if vcpu else 0
        ids.append(reader.slot_at(address).id if address else None)
    return ids


def _vcpu(kvm: Object, number: int) -> Object | None:
    if kvm.type_.type.has_member("vcpu_array"):
        from drgn.helpers.linux.xarray import xa_load

        entry = xa_load(kvm.vcpu_array.address_of_(), number)
        return Object(kvm.prog_, "struct kvm_vcpu *", entry.value_()) if entry.value_() else None
    pointer = kvm.vcpus[number]
    return pointer if pointer.value_() else None


# -- the array layout (Linux <= 5.16) ------------------------------------------------
def _array_space(kvm: Object, as_id: int, reader: SlotReader) -> AddressSpace:
    slots = kvm.memslots[as_id]
    used = slots.used_slots.value_()
    first = slots.memslots[0].address_of_().value_()
    block = kvm.prog_.read(first, used * reader.size) if used else b""
    return AddressSpace(as_id=as_id, layout="array", active=0, sets=[ArraySet(
        generation=slots.generation.value_(),
        used_slots=used,
        memslots=[reader.slot(block[i * reader.size:(i + 1) * reader.size]) for i in range(used)],
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
    else:
        array = space.sets[0]
        facts = (f"array layout, generation {array.generation}, used_slots {array.used_slots}, "
                 f"lru_slot {array.lru_slot}")
    slots = space.slots
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
