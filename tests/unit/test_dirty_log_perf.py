"""dirty_log_perf's plain-data parts, without KVM: options, slots, bitmaps, output lines."""

import io
import shutil
import struct
import subprocess
import tempfile

import pytest

from kselftest_py import dirty_log_perf as dlp
from kselftest_py import ioctls
from kselftest_py.ktap import KtapWriter
from kselftest_py.kvm import DirtyBitmap
from kselftest_py.memslot_layout import PAGE_SIZE
from kselftest_py.x86_guest import CODE_GPA

MIB = 1 << 20


# --- the ioctls it adds --------------------------------------------------------------
def test_dirty_log_ioctls_match_kernel_headers():
    # the values <linux/kvm.h> gives on x86-64
    assert ioctls.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert ioctls.KVM_ENABLE_CAP == 0x4068AEA3
    assert ioctls.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert ioctls.IOCTL_NAMES[0xC018AEC0] == "KVM_CLEAR_DIRTY_LOG"
    assert ioctls.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 == 168
    assert (ioctls.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, ioctls.KVM_DIRTY_LOG_INITIALLY_SET) == (1, 2)
    assert ioctls.KVM_MEM_LOG_DIRTY_PAGES == 1


@pytest.mark.parametrize("struct_type,size", [(ioctls.KvmDirtyLog, 16), (ioctls.KvmClearDirtyLog, 24),
                                              (ioctls.KvmEnableCap, 104)])
def test_dirty_log_struct_sizes(struct_type, size):
    import ctypes

    assert ctypes.sizeof(struct_type) == size


# --- options ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,size", [("4096", 4096), ("64M", 64 * MIB), ("1G", 1 << 30), ("10k", 10 << 10),
                                       ("0x2000", 0x2000), ("2gb", 2 << 30), ("3T", 3 << 40)])
def test_parse_size_reads_upstream_sizes(text, size):
    assert dlp.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1Q", "-1M", "1.5G"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="not a size"):
        dlp.parse_size(text)


def test_defaults_are_upstream_s_except_the_memory_size():
    options = dlp.parse_args([])
    assert (options.iterations, options.vcpus, options.slots) == (2, 1, 1)
    assert options.bytes_per_vcpu == 64 * MIB and dlp.UPSTREAM_BYTES_PER_VCPU == 1 << 30
    assert not options.no_manual_protect and not options.overlap and not options.run_while_disabling
    assert options.gpa == 0x10000000 and options.cpus is None


def test_options():
    options = dlp.parse_args(["-i", "5", "-b", "16M", "-v", "2", "-x", "64", "-g", "-e", "-o",
                              "-p", "0x20000000", "-c", "0,1,0", "--json", "/tmp/x.json"])
    assert (options.iterations, options.bytes_per_vcpu, options.vcpus, options.slots) == (5, 16 * MIB, 2, 64)
    assert options.no_manual_protect and options.run_while_disabling and options.overlap
    assert options.gpa == 0x20000000 and options.cpus == [0, 1, 0] and options.json == "/tmp/x.json"


@pytest.mark.parametrize("args,message", [
    (["-i", "1"], "at least two iterations"),
    (["-b", "1000"], "multiple of the page size"),
    (["-b", "16M", "-x", "3"], "cannot be evenly divided into 3 slots"),
    (["-b", "2G", "-v", "2"], "does not fit below the 4 GiB"),
    (["-p", "0x1000"], "above the system slot"),
    (["-v", "2", "-c", "0"], "give 2 CPUs"),
    (["-v", "0"], "positive"),
    (["-b", "lots"], "not a size"),
])
def test_bad_options_are_refused_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dlp.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --- slots and regions -------------------------------------------------------------------
def test_one_slot_holds_all_memory():
    assert dlp.split_slots(0x10000000, 16384, 1) == [dlp.Slot(1, 0x10000000, 16384)]


def test_memory_split_evenly_over_64_slots_from_slot_1():
    slots = dlp.split_slots(0x10000000, 2 * 16384, 64)
    assert [s.slot for s in slots] == list(range(1, 65))
    assert {s.pages for s in slots} == {512}
    assert all(b.gpa == a.gpa + a.pages * PAGE_SIZE for a, b in zip(slots, slots[1:], strict=False))
    assert slots[-1].gpa + slots[-1].pages * PAGE_SIZE == 0x10000000 + 2 * 64 * MIB


def test_uneven_split_is_refused_as_upstream_does():
    with pytest.raises(ValueError, match="evenly divided"):
        dlp.split_slots(0, 100, 3)
    with pytest.raises(ValueError, match="at least one"):
        dlp.split_slots(0, 100, 0)


def test_vcpu_regions_partition_or_overlap():
    assert dlp.vcpu_regions(0x1000000, 2, MIB, False) == [(0x1000000, 0x1100000), (0x1100000, 0x1200000)]
    assert dlp.vcpu_regions(0x1000000, 2, MIB, True) == [(0x1000000, 0x1200000)] * 2


def test_a_region_crossing_slots_is_cut_at_their_edges():
    slots = dlp.split_slots(0, 8, 4)  # 2 pages each
    assert dlp.spans_in_slots(slots, PAGE_SIZE, 6 * PAGE_SIZE) == [(0, 1, 1), (1, 0, 2), (2, 0, 2)]
    assert dlp.spans_in_slots(slots, 0, 8 * PAGE_SIZE) == [(i, 0, 2) for i in range(4)]


# --- bitmaps ---------------------------------------------------------------------------
def test_bitmap_is_whole_longs_in_little_endian_bit_order():
    bitmap = DirtyBitmap(65)
    assert bitmap.nbytes == 16
    bitmap.fill(b"\x01\x02")
    assert bitmap.is_set(0) and bitmap.is_set(9)
    assert not bitmap.is_set(1) and not bitmap.is_set(8)
    assert bitmap.count() == 2


def test_bitmap_missing_names_the_clear_pages_in_a_range():
    bitmap = DirtyBitmap(128)
    bitmap.fill(b"\xff" * 16)
    assert bitmap.missing(0, 128) == (0, [])
    bitmap.fill(b"\xff" * 5 + b"\xfe" + b"\xff" * 9 + b"\x7f")  # pages 40 and 127 clear
    assert bitmap.missing(0, 128) == (2, [40, 127])
    assert bitmap.missing(41, 86) == (0, [])
    assert bitmap.missing(0, 128, limit=1) == (2, [40])
    with pytest.raises(ValueError):
        bitmap.missing(100, 29)


def _full(slots):
    bitmaps = [DirtyBitmap(s.pages) for s in slots]
    for bitmap in bitmaps:
        bitmap.fill(b"\xff" * bitmap.nbytes)
    return bitmaps


def test_check_passes_when_every_written_page_is_dirty():
    slots = dlp.split_slots(0x10000000, 1024, 4)
    regions = dlp.vcpu_regions(0x10000000, 2, 512 * PAGE_SIZE, False)
    assert dlp.check_bitmaps(slots, _full(slots), regions, 1) == 1024


def test_check_catches_a_missing_page():
    slots = dlp.split_slots(0x10000000, 1024, 4)
    regions = dlp.vcpu_regions(0x10000000, 2, 512 * PAGE_SIZE, False)
    bitmaps = _full(slots)
    bitmaps[2].fill(b"\xff" * 4 + b"\xef" + b"\xff" * 27)  # slot 3, page 36
    with pytest.raises(dlp.DirtyPagesMissing) as err:
        dlp.check_bitmaps(slots, bitmaps, regions, 2)
    gpa = 0x10000000 + (2 * 256 + 36) * PAGE_SIZE
    assert str(err.value) == (f"Iteration 2: 1 page(s) the guest wrote are not in the dirty log: "
                              f"slot 3 page 36 (gpa {gpa:#x})")


def test_check_ignores_pages_no_vcpu_wrote():
    slots = dlp.split_slots(0x10000000, 1024, 1)
    bitmaps = [DirtyBitmap(1024)]
    bitmaps[0].fill(b"\xff" * 64)  # only the first 512 pages
    assert dlp.check_bitmaps(slots, bitmaps, [(0x10000000, 0x10000000 + 512 * PAGE_SIZE)], 1) == 512
    with pytest.raises(dlp.DirtyPagesMissing, match="512 page"):
        dlp.check_bitmaps(slots, bitmaps, [(0x10000000, 0x10000000 + 1024 * PAGE_SIZE)], 1)


# --- output lines: ours and upstream's, read by one parser ------------------------------
UPSTREAM_OUTPUT = """\
Test iterations: 2
Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages
guest physical test memory: [0x7fbffff000, 0x7fffdff000)
Populate memory time: 0.466825580s
Enabling dirty logging time: 0.007328110s

Iteration 1 dirty memory time: 0.002966450s
Iteration 1 get dirty log time: 0.000426250s
Iteration 1 clear dirty log time: 0.003681130s
Iteration 2 dirty memory time: 1.269781340s
Iteration 2 get dirty log time: 0.000378940s
Iteration 2 clear dirty log time: 0.002574320s
Disabling dirty logging time: 0.002145410s
Get dirty log over 2 iterations took 0.000805190s. (Avg 0.000402595s/iteration)
Clear dirty log over 2 iterations took 0.006255450s. (Avg 0.003127725s/iteration)
"""

EXPECTED = {
    "populate_ns": 466825580, "enable_dirty_logging_ns": 7328110,
    "dirty_memory_ns": [2966450, 1269781340], "get_dirty_log_ns": [426250, 378940],
    "clear_dirty_log_ns": [3681130, 2574320], "disable_dirty_logging_ns": 2145410,
    "get_dirty_log_total_ns": 805190, "clear_dirty_log_total_ns": 6255450, "iterations": 2,
}


def test_parser_reads_upstream_output():
    assert dlp.parse_figures(UPSTREAM_OUTPUT) == EXPECTED


def test_parser_reads_the_same_lines_as_ktap_diagnostics():
    out = io.StringIO()
    writer = KtapWriter(out)
    for line in UPSTREAM_OUTPUT.splitlines():
        writer.diag(line)
    assert out.getvalue().startswith("# Test iterations: 2\n")
    assert dlp.parse_figures(out.getvalue()) == EXPECTED


def test_lines_we_print_are_upstream_s_format():
    assert dlp.seconds(1_269_781_340) == "1.269781340s"
    assert dlp.seconds(5) == "0.000000005s"
    assert dlp.total_line("Get", [426250, 378940]) == (
        "Get dirty log over 2 iterations took 0.000805190s. (Avg 0.000402595s/iteration)")
    assert dlp.total_line("Clear", [3, 4]) == (
        "Clear dirty log over 2 iterations took 0.000000007s. (Avg 0.000000003s/iteration)")


def test_parser_keeps_the_last_run_and_without_manual_protect_has_no_clear():
    text = UPSTREAM_OUTPUT + "\n".join(line for line in UPSTREAM_OUTPUT.splitlines() if "lear" not in line)
    figures = dlp.parse_figures(text.replace("1.269781340s", "2.000000000s"))
    assert figures["dirty_memory_ns"] == [2966450, 2_000_000_000]
    assert len(figures["get_dirty_log_ns"]) == 2


# --- the guest program -------------------------------------------------------------------
def test_guest_writes_upstream_s_value_and_syncs():
    code = dlp.guest_code()
    assert struct.pack("<Q", dlp.GUEST_VALUE) in code
    assert b"\xef" in code  # out dx, eax: the ucall


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_guest_program_disassembles_to_the_page_loop():
    with tempfile.NamedTemporaryFile(suffix=".bin") as handle:
        handle.write(dlp.guest_code())
        handle.flush()
        text = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64",
                               f"--adjust-vma={CODE_GPA:#x}", handle.name],
                              capture_output=True, text=True, check=True).stdout
    assert "(bad)" not in text
    assert "mov    %rdx,(%rax)" in text and "add    $0x1000,%rax" in text and "cmp    %rsi,%rax" in text
    assert "out    %eax,(%dx)" in text


# --- the iteration handshake, with threads standing in for vCPUs ------------------------
@pytest.mark.parametrize("busy_wait", [False, True])
def test_vcpus_run_each_iteration_once_and_quit(busy_wait):
    import threading

    iterations = dlp.Iterations(2, busy_wait)
    ran: list[list[int]] = [[], []]

    def vcpu(index: int) -> None:
        while (iteration := iterations.next_for(index)) is not None:
            ran[index].append(iteration)
            iterations.done(index, iteration)

    threads = [threading.Thread(target=vcpu, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    iterations.wait_all(0, 5)
    for iteration in (1, 2, 3):
        iterations.start(iteration)
        iterations.wait_all(iteration, 5)
    iterations.stop()
    for thread in threads:
        thread.join(5)
    assert ran == [[0, 1, 2, 3]] * 2


def test_a_vcpu_that_does_not_finish_is_reported_after_the_timeout():
    iterations = dlp.Iterations(2)
    iterations.done(0, 0)
    with pytest.raises(dlp.GuestFailure, match=r"vCPU\(s\) \[1\] did not finish iteration 0 within 0.05 s"):
        iterations.wait_all(0, 0.05)


def test_a_vcpu_failure_reaches_the_waiting_host():
    iterations = dlp.Iterations(1, busy_wait=True)
    iterations.fail(dlp.GuestFailure("vCPU 0: invalid guest sync status"))
    with pytest.raises(dlp.GuestFailure, match="invalid guest sync"):
        iterations.wait_all(1, 5)
