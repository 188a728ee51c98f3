"""How a test area is split across memslots, and gpa ↔ hva translation over it.

Plain arithmetic, no KVM: the area of ``npages`` pages at ``base_gpa`` is cut into
``nslots`` slots of ``npages // nslots`` pages each, the last slot also taking the
remainder — the split upstream's memslot_perf_test uses, so slot counts and sizes
mean the same in both. Test slot ``index`` 0.. is KVM memslot ``index + 1``: slot 0
is the guest's system slot.

Translation from gpa is a division (O(1) at any slot count); from hva it is a binary
search over the slots' host addresses, sorted once.
"""

from __future__ import annotations

import bisect

PAGE_SIZE = 4096


class TooManySlots(ValueError):
    """The area has fewer pages than slots: ``maximum`` is the most it supports."""

    def __init__(self, nslots: int, maximum: int):
        self.nslots, self.maximum = nslots, maximum
        super().__init__(f"Memslot count too high for this test, decrease the cap (max is {maximum})")


class SlotLayout:
    """The slots of a test area; ``hvas`` is filled in once their memory exists."""

    def __init__(self, base_gpa: int, npages: int, nslots: int):
        if nslots < 1 or npages < 1:
            raise ValueError(f"need at least one slot and one page, got {nslots} slots, {npages} pages")
        self.base_gpa, self.npages, self.nslots = base_gpa, npages, nslots
        self.pages_per_slot = npages // nslots
        if self.pages_per_slot == 0:
            # +1: upstream counts the system slot in the cap it reports
            raise TooManySlots(nslots, npages + 1)
        self.hvas: list[int] = []
        self._hva_order: list[tuple[int, int]] = []

    def slot_id(self, index: int) -> int:
        return index + 1

    def slot_pages(self, index: int) -> int:
        if index == self.nslots - 1:
            return self.npages - index * self.pages_per_slot
        return self.pages_per_slot

    def slot_gpa(self, index: int) -> int:
        if not 0 <= index < self.nslots:
            raise IndexError(f"slot index {index} outside 0..{self.nslots - 1}")
        return self.base_gpa + index * self.pages_per_slot * PAGE_SIZE

    def locate(self, gpa: int) -> tuple[int, int]:
        """(slot index, byte offset in that slot) of ``gpa``."""
        page = (gpa - self.base_gpa) // PAGE_SIZE
        if not 0 <= page < self.npages:
            raise ValueError(f"gpa {gpa:#x} outside the test area")
        index = min(page // self.pages_per_slot, self.nslots - 1)
        return index, gpa - self.slot_gpa(index)

    def pages_left_in_slot(self, gpa: int) -> int:
        """Pages from page-aligned ``gpa`` to the end of its slot."""
        index, offset = self.locate(gpa)
        if offset % PAGE_SIZE:
            raise ValueError(f"gpa {gpa:#x} is not page aligned")
        return self.slot_pages(index) - offset // PAGE_SIZE

    def set_hvas(self, hvas: list[int]) -> None:
        if len(hvas) != self.nslots:
            raise ValueError(f"{len(hvas)} host addresses for {self.nslots} slots")
        self.hvas = list(hvas)
        self._hva_order = sorted((hva, index) for index, hva in enumerate(hvas))

    def gpa_to_hva(self, gpa: int) -> int:
        index, offset = self.locate(gpa)
        return self.hvas[index] + offset

    def hva_to_gpa(self, hva: int) -> int:
        position = bisect.bisect_right(self._hva_order, (hva, self.nslots)) - 1
        if position >= 0:
            start, index = self._hva_order[position]
            if hva < start + self.slot_pages(index) * PAGE_SIZE:
                return self.slot_gpa(index) + hva - start
        raise ValueError(f"hva {hva:#x} is not in any slot of the test area")
