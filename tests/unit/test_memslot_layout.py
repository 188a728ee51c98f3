import pytest

from kselftest_py.memslot_layout import PAGE_SIZE, SlotLayout, TooManySlots

BASE = 0x10000000


def test_split_like_upstream():
    layout = SlotLayout(BASE, npages=131073, nslots=32763)
    assert layout.pages_per_slot == 4
    assert layout.slot_pages(32762) == 4 + 21  # the last slot takes the remainder
    assert sum(layout.slot_pages(i) for i in range(32763)) == 131073
    assert layout.slot_gpa(1) == BASE + 4 * PAGE_SIZE
    assert layout.slot_id(0) == 1


def test_too_many_slots_names_the_maximum():
    with pytest.raises(TooManySlots) as caught:
        SlotLayout(BASE, npages=8193, nslots=32763)
    assert caught.value.maximum == 8194
    assert "max is 8194" in str(caught.value)


def test_locate_and_translate_across_thousands_of_slots():
    layout = SlotLayout(BASE, npages=131073, nslots=32763)
    hvas = [0x7F0000000000 + i * 0x100000 for i in reversed(range(32763))]  # deliberately unsorted
    layout.set_hvas(hvas)
    for index in (0, 1, 4095, 32761, 32762):
        gpa = layout.slot_gpa(index) + 3 * PAGE_SIZE + 8
        assert layout.locate(gpa) == (index, 3 * PAGE_SIZE + 8)
        hva = layout.gpa_to_hva(gpa)
        assert hva == hvas[index] + 3 * PAGE_SIZE + 8
        assert layout.hva_to_gpa(hva) == gpa
    last_page = BASE + (131073 - 1) * PAGE_SIZE
    assert layout.locate(last_page)[0] == 32762
    assert layout.pages_left_in_slot(layout.slot_gpa(32762)) == 25
    assert layout.pages_left_in_slot(layout.slot_gpa(5) + PAGE_SIZE) == 3


def test_addresses_outside_the_area_are_refused():
    layout = SlotLayout(BASE, npages=100, nslots=10)
    layout.set_hvas([0x1000000 * (i + 1) for i in range(10)])
    with pytest.raises(ValueError):
        layout.locate(BASE - 1)
    with pytest.raises(ValueError):
        layout.locate(BASE + 100 * PAGE_SIZE)
    with pytest.raises(ValueError):
        layout.hva_to_gpa(0x1000000 + 10 * PAGE_SIZE)  # just past slot 0's 10 pages
    with pytest.raises(ValueError):
        layout.pages_left_in_slot(BASE + 8)
