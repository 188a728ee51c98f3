from kvmlab.vm.console import find_splats, worst

BOOT = """[    0.6] Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/srso.html for more.
[    1.2] mtrr: your CPUs had inconsistent fixed MTRR settings
kvmlab-init: userspace reached
"""

PANIC = BOOT + """[    5.1] sysrq: Trigger a crash
[    5.1] Kernel panic - not syncing: sysrq triggered crash
[    5.1] CPU: 0 PID: 82 Comm: sh Not tainted 5.10.0-32-cloud-amd64 #1
"""

WARN = BOOT + """[    7.0] ------------[ cut here ]------------
[    7.0] WARNING: CPU: 1 PID: 300 at arch/x86/kvm/x86.c:10000 kvm_arch_vcpu_ioctl_run+0x1/0x2 [kvm]
[    7.0] Modules linked in: kvm_amd kvm irqbypass
"""

OOPS_THEN_PANIC = BOOT + """[    6.0] BUG: kernel NULL pointer dereference, address: 0000000000000000
[    6.0] Oops: 0002 [#1] PREEMPT SMP NOPTI
[    6.1] Kernel panic - not syncing: Fatal exception
"""

OTHERS = {
    "kasan": "[ 9.0] BUG: KASAN: slab-out-of-bounds in kvm_set_memslot+0x10/0x20 [kvm]",
    "ubsan": "[ 9.0] UBSAN: shift-out-of-bounds in arch/x86/kvm/mmu/mmu.c:1:2",
    "rcu-stall": "[ 9.0] rcu: INFO: rcu_preempt self-detected stall on CPU",
    "hung-task": "[ 9.0] INFO: task kworker/0:1:12 blocked for more than 120 seconds.",
    "bug": "[ 9.0] BUG: soft lockup - CPU#0 stuck for 22s! [python3:90]",
}


def test_clean_boot_has_no_splat():
    # Debian's SRSO notice says "WARNING: See ..." but is not a WARN() splat.
    assert find_splats(BOOT) == []


def test_panic_found_with_excerpt():
    (splat,) = find_splats(PANIC)
    assert splat.kind == "panic"
    assert "sysrq triggered crash" in splat.summary()
    assert "Trigger a crash" in splat.excerpt and "Comm: sh" in splat.excerpt


def test_warning_found():
    (splat,) = find_splats(WARN)
    assert splat.kind == "warning"
    assert "x86.c:10000" in splat.summary()


def test_panic_outranks_the_oops_before_it():
    splats = find_splats(OOPS_THEN_PANIC)
    assert [s.kind for s in splats] == ["bug", "oops", "panic"]
    assert worst(splats).kind == "panic"


def test_each_kind_recognised():
    for kind, line in OTHERS.items():
        (splat,) = find_splats(BOOT + line + "\n")
        assert splat.kind == kind, line
