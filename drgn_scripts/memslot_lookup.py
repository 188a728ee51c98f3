"""Find the memslot of a guest frame number the way KVM does, in a live kernel.

The tree layout (Linux >= 5.17) descends the active set's ``gfn_tree``, an rbtree of
slots keyed by ``base_gfn``; the array layout (Linux <= 5.16) tries ``lru_slot`` first,
then binary-searches ``memslots[]``, which KVM keeps sorted by ``base_gfn`` from the
highest down. Both read the kernel's own structures, not a snapshot, and say which
slots they visited: a lookup that goes wrong shows where.

    drgn -c vmcore drgn_scripts/memslot_lookup.py GFN [--pid P] [--as-id N]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from drgn import Object, Program

try:
    from drgn_scripts import memslots as reading
    from drgn_scripts.memslot_model import PAGE_SIZE, Slot
except ImportError:  # run as a script by drgn: the package may not be importable
    sys.path.insert(0, __file__.rsplit("/", 2)[0])
    from drgn_scripts import memslots as reading
    from drgn_scripts.memslot_model import PAGE_SIZE, Slot

__all__ = ["Lookup", "gfn_tree", "lookup"]


@dataclass
class Lookup:
    """Where ``gfn`` led: the slot holding it (None: no slot does) and the way there."""

    gfn: int
    layout: str
    slot: Slot | None = None
    visited: list[Slot] = field(default_factory=list)
    """Tree: the nodes on the path from the root. Array: the lru slot, then each probe."""
    lru_hit: bool = False

    def render(self) -> str:
        steps = " -> ".join(f"{s.id}[{s.base_gfn:#x}+{s.npages}]" for s in self.visited) or "(empty)"
        where = (f"slot {self.slot.id} (base_gfn {self.slot.base_gfn:#x}, {self.slot.npages} pages, "
                 f"hva {self.slot.userspace_addr + (self.gfn - self.slot.base_gfn) * PAGE_SIZE:#x})"
                 if self.slot else "no slot")
        how = "lru_slot hit" if self.lru_hit else f"{len(self.visited)} slots visited"
        return f"gfn {self.gfn:#x}: {where}; {self.layout} layout, {how}: {steps}"


def lookup(kvm: Object, gfn: int, as_id: int = 0) -> Lookup:
    """The slot of ``gfn`` in ``struct kvm *kvm``'s active memslots of ``as_id``."""
    reader = reading.SlotReader(kvm.prog_)
    memslots = kvm.memslots[as_id]
    if reader.tree:
        return _tree_lookup(reader, memslots, gfn)
    return _array_lookup(reader, memslots, gfn)


def _tree_lookup(reader, memslots: Object, gfn: int) -> Lookup:
    result = Lookup(gfn, "tree")
    offset = reader.gfn_node[memslots.node_idx.value_()]
    node = memslots.gfn_tree.rb_node.value_()
    while node and len(result.visited) < 64:  # an rbtree of 32767 slots is < 32 deep
        data = reader.raw(node - offset)
        slot = reader.slot(data)
        result.visited.append(slot)
        left, right = reader.children(data, offset)
        if gfn < slot.base_gfn:
            node = left
        elif gfn >= slot.gfn_end:
            node = right
        else:
            result.slot = slot
            break
    return result


def _array_lookup(reader, memslots: Object, gfn: int) -> Lookup:
    result = Lookup(gfn, "array")
    used = memslots.used_slots.value_()
    if not used:
        return result
    first = memslots.memslots[0].address_of_().value_()

    def at(index: int) -> Slot:
        return reader.slot_at(first + index * reader.size)

    lru = memslots.lru_slot.counter.value_()
    if 0 <= lru < used:
        slot = at(lru)
        result.visited.append(slot)
        if slot.base_gfn <= gfn < slot.gfn_end:
            result.slot, result.lru_hit = slot, True
            return result
    low, high = 0, used  # sorted by base_gfn, highest first: find the first slot at or below gfn
    while low < high:
        middle = (low + high) // 2
        slot = at(middle)
        result.visited.append(slot)
        if gfn >= slot.base_gfn:
            high = middle
        else:
            low = middle + 1
    if low < used:
        slot = at(low)
        if slot.base_gfn <= gfn < slot.gfn_end:
            result.slot = slot
    return result


def gfn_tree(kvm: Object, as_id: int = 0) -> list[tuple[int, Slot]]:
    """The active set's slots as KVM orders them for lookups, each with its depth.

    Tree: the gfn rbtree in pre-order (root first, depth 0). Array: ``memslots[]`` in
    array order, each at depth 0."""
    reader = reading.SlotReader(kvm.prog_)
    memslots = kvm.memslots[as_id]
    if not reader.tree:
        used = memslots.used_slots.value_()
        first = memslots.memslots[0].address_of_().value_()
        return [(0, reader.slot_at(first + i * reader.size)) for i in range(used)]
    offset = reader.gfn_node[memslots.node_idx.value_()]
    nodes, pending = [], [(memslots.gfn_tree.rb_node.value_(), 0)]
    while pending:
        node, depth = pending.pop()
        if not node or depth > 64:
            continue
        data = reader.raw(node - offset)
        nodes.append((depth, reader.slot(data)))
        left, right = reader.children(data, offset)
        pending += [(right, depth + 1), (left, depth + 1)]
    return nodes


def main(prog: Program, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="memslot_lookup.py", description="find the memslot of a gfn")
    parser.add_argument("gfn", type=lambda text: int(text, 0), help="guest frame number (0x... or decimal)")
    parser.add_argument("--pid", type=int, help="only the VMs of this process")
    parser.add_argument("--as-id", type=int, default=0, help="address space (x86: 0 normal, 1 SMM)")
    args = parser.parse_args(argv)
    for kvm in reading.kvms(prog, args.pid):
        found = lookup(kvm, args.gfn, args.as_id)
        print(f"VM {kvm.value_():#x} pid {reading.userspace_pid(kvm)}: {found.render()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog, sys.argv[1:]))  # noqa: F821 - drgn defines prog for scripts
