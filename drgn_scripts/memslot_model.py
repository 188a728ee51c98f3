"""Plain-data copies of a VM's KVM memslots, as a drgn reader finds them in a running kernel.

KVM has two memslot layouts:

- Linux <= 5.16, ``"array"``: one ``struct kvm_memslots`` per address space holding an
  array of ``struct kvm_memory_slot`` sorted by descending ``base_gfn``, an
  ``id_to_index[]`` map and an ``lru_slot`` cache. An update builds a new copy and swaps
  the ``kvm->memslots[as_id]`` pointer.
- Linux >= 5.17, ``"tree"``: two ``struct kvm_memslots`` per address space
  (``kvm->__memslots[as_id][0..1]``), ``kvm->memslots[as_id]`` pointing at the active
  one. Each set indexes the same slots three ways — an rbtree by gfn, an interval tree by
  hva and a hash by id — through the slot's node pair entry ``[set.node_idx]``.

Nothing here imports drgn: the reader fills these records, ``memslot_invariants`` checks
them, and tests build them by hand, broken on purpose. ``to_json``/``from_json`` carry a
snapshot between the two steps (and into pandas) unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ID_HASH_BITS",
    "KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "PAGE_SIZE",
    "AddressSpace",
    "ArraySet",
    "HvaNode",
    "Slot",
    "TreeSet",
    "VmMemslots",
]

PAGE_SIZE = 4096
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63
ID_HASH_BITS = 7
"""``DECLARE_HASHTABLE(id_hash, 7)`` in ``struct kvm_memslots``: 128 buckets."""


@dataclass(frozen=True)
class Slot:
    """The fields of a ``struct kvm_memory_slot`` that both layouts share.

    :param id: ``short id``; user slots first, then the arch's private slots.
    :param flags: ``u32 flags``: ``KVM_MEM_*`` from userspace, plus KVM's internal
        ``KVM_MEMSLOT_INVALID`` (bit 16) while a slot is being deleted or moved.
    :param gmem_file: ``gmem.file``, the guest_memfd file backing the slot's private
        memory (0: none), in kernels built with guest_memfd (Debian's from 7.x; the field
        ends the struct there); None where the struct has no ``gmem``.
    """

    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    gmem_file: int | None = None

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def gfn_end(self) -> int:
        """First gfn past the slot."""
        return self.base_gfn + self.npages

    @property
    def hva_end(self) -> int:
        """First host address past the slot; the hva tree stores ``hva_end - 1`` as ``last``."""
        return self.userspace_addr + self.npages * PAGE_SIZE


@dataclass(frozen=True)
class HvaNode:
    """One ``struct interval_tree_node`` of a set's ``hva_tree``: ``slot->hva_node[node_idx]``.

    :param start: ``unsigned long start``, inclusive.
    :param last: ``unsigned long last``, inclusive.
    """

    slot_id: int
    start: int
    last: int


@dataclass(frozen=True)
class TreeSet:
    """One ``struct kvm_memslots`` of the tree layout: ``&kvm->__memslots[as_id][index]``.

    :param index: which of the address space's two sets this is (0 or 1).
    :param node_idx: ``int node_idx``: which entry of each slot's ``gfn_node[2]``,
        ``hva_node[2]`` and ``id_node[2]`` this set links.
    :param generation: ``u64 generation``.
    :param gfn_order: the slots in an in-order walk of ``struct rb_root gfn_tree``.
    :param hva_nodes: every node of ``struct rb_root_cached hva_tree``, any order.
    :param id_hash: slot ids per bucket of ``struct hlist_head id_hash[128]``, bucket order.
    :param last_used_slot_id: id of the slot ``atomic_long_t last_used_slot`` points at,
        None for NULL.
    :param gfn_tree_depth: nodes on the longest root-to-leaf path of ``gfn_tree``.
    """

    index: int
    node_idx: int
    generation: int
    gfn_order: list[Slot]
    hva_nodes: list[HvaNode]
    id_hash: list[list[int]]
    last_used_slot_id: int | None
    gfn_tree_depth: int


@dataclass(frozen=True)
class ArraySet:
    """The ``struct kvm_memslots`` of the array layout: ``kvm->memslots[as_id]``.

    :param used_slots: ``int used_slots``.
    :param memslots: ``struct kvm_memory_slot memslots[]``, the first ``used_slots``
        entries, in array order.
    :param id_to_index: ``short id_to_index[KVM_MEM_SLOTS_NUM]``, all of it.
    :param lru_slot: ``atomic_t lru_slot``, an index into ``memslots``.
    """

    generation: int
    used_slots: int
    memslots: list[Slot]
    id_to_index: list[int]
    lru_slot: int


@dataclass(frozen=True)
class AddressSpace:
    """The memslots of one address space (x86: 0 normal, 1 SMM).

    :param active: tree: the index of the set ``kvm->memslots[as_id]`` points at;
        array: always 0.
    :param sets: tree: ``kvm->__memslots[as_id][0]`` and ``[1]``, in that order;
        array: the single ``kvm->memslots[as_id]``.
    """

    as_id: int
    layout: Literal["tree", "array"]
    active: int
    sets: list[TreeSet] | list[ArraySet]

    @property
    def slots(self) -> list[Slot]:
        """The slots guest accesses see now (the active set), in gfn order."""
        active = self.sets[self.active]
        if isinstance(active, TreeSet):
            return active.gfn_order
        return sorted(active.memslots, key=lambda slot: slot.base_gfn)


@dataclass(frozen=True)
class VmMemslots:
    """The memslots of one ``struct kvm``.

    :param address: address of the ``struct kvm``.
    :param pid: ``kvm->userspace_pid`` (the VMM's pid).
    :param address_spaces: all ``KVM_ADDRESS_SPACE_NUM`` address spaces in ``as_id``
        order: the generation checks need their count.
    :param vcpu_last_used_slot_ids: per vCPU, the id of ``vcpu->last_used_slot`` (None for
        NULL or where the kernel has no such field). Informative only: the pointer may be
        legitimately stale until the vCPU's next lookup compares ``last_used_slot_gen``.
    :param slots_lock_held: whether ``kvm->slots_lock`` had an owner when read, None if
        not read. Every memslot update runs under this mutex, so False proves no update is
        in flight; the generation alone cannot (see ``memslot_invariants``).
    """

    address: int
    pid: int
    address_spaces: list[AddressSpace]
    vcpu_last_used_slot_ids: list[int | None]
    slots_lock_held: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """Nested dicts and lists of ints/strs, for ``json.dumps`` or pandas."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmMemslots:
        """Inverse of ``to_json``."""
        spaces = []
        for space in data["address_spaces"]:
            if space["layout"] == "tree":
                sets: list[Any] = [
                    TreeSet(**{
                        **s,
                        "gfn_order": [Slot(**slot) for slot in s["gfn_order"]],
                        "hva_nodes": [HvaNode(**node) for node in s["hva_nodes"]],
                    })
                    for s in space["sets"]
                ]
            else:
                sets = [ArraySet(**{**s, "memslots": [Slot(**slot) for slot in s["memslots"]]})
                        for s in space["sets"]]
            spaces.append(AddressSpace(**{**space, "sets": sets}))
        return cls(**{**data, "address_spaces": spaces})
