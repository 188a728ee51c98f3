"""kvm-modules: specs: Debian's KVM modules rebuilt from Debian's source, with a patch or
without, booted in the lab, read by drgn, refused clearly when they cannot be built."""


import pytest
from conftest import REPO, assert_one_line_error, kvmlab

from kvmlab import kernels
from kvmlab.errors import KvmlabError
from kvmlab.kernels import kvm_modules
from kvmlab.kernels.model import Kernel

DATA = REPO / "tests" / "data"
HELLO = f"kvm-modules:debian:bookworm+{DATA / 'kvm-hello.patch'}"


def test_a_patch_that_does_not_apply_names_its_first_failing_hunk():
    done = kvmlab("kernel", "fetch", f"kvm-modules:debian:bookworm+{DATA / 'kvm-stale.patch'}")
    assert_one_line_error(done, "patch kvm-stale.patch does not apply", "virt/kvm/kvm_main.c:5915")


def test_a_patch_outside_the_kvm_directories_is_refused_by_name():
    done = kvmlab("kernel", "fetch", f"kvm-modules:debian:bookworm+{DATA / 'kvm-outside.patch'}")
    assert_one_line_error(done, "kvm-outside.patch changes include/linux/mm.h", "whole kernel")


@pytest.mark.parametrize("name, content, complaint", [
    ("garbage.patch", b"this is not a patch\n", "is not a patch git can read"),
    ("module.patch", bytes(range(256)) * 64, "is not a patch git can read"),
    ("outside.patch", (DATA / "kvm-outside.patch").read_bytes(),
     "outside virt/kvm, arch/x86/kvm and KVM's headers"),
])
def test_an_unbuildable_patch_is_refused_before_any_download(tmp_path, name, content, complaint):
    """An empty cache stays empty: the patch is read before the Debian packages are fetched."""
    patch = tmp_path / name
    patch.write_bytes(content)
    cache = tmp_path / "cache"
    done = kvmlab("kernel", "fetch", f"kvm-modules:debian:bookworm+{patch}", env={"KVMLAB_CACHE": str(cache)})
    assert_one_line_error(done, name, complaint)
    assert not (cache / "kernels").exists() and not (cache / "apt").exists()


def test_bad_kvm_modules_specs():
    assert_one_line_error(kvmlab("kernel", "fetch", "kvm-modules:local:/tmp+x.patch"), "debian: kernel")
    assert_one_line_error(kvmlab("kernel", "fetch", "kvm-modules:debian:bookworm+/nonexistent.patch"),
                          "/nonexistent.patch does not exist")


def test_a_module_for_another_kernel_is_caught_before_boot(tmp_path):
    bookworm, bullseye = kernels.fetch("debian:bookworm"), kernels.fetch("debian:bullseye")
    foreign = bullseye.modules_root / "lib" / "modules" / bullseye.release / kvm_modules.MODULE_DIR
    with pytest.raises(KvmlabError, match=r"vermagic '5\.10\.0-\d+-cloud-amd64 SMP mod_unload"):
        kvm_modules._check_vermagic(foreign, bookworm)


def test_a_failing_install_step_is_one_line_naming_the_command(tmp_path):
    """strip refuses a kvm.ko that is not ELF: one error naming the command and what strip said."""
    release = "6.1.0-test-amd64"
    shipped = tmp_path / "base" / "lib" / "modules" / release / kvm_modules.MODULE_DIR
    shipped.mkdir(parents=True)
    built = tmp_path / "built"
    built.mkdir()
    for name in kvm_modules.MODULES:
        (shipped / name).write_text("shipped\n")
        (built / name).write_text("not an ELF object\n")
    base = Kernel(spec="debian:test", pinned="debian:test", release=release, vmlinuz=tmp_path / "vmlinuz",
                  config=None, system_map=None, modules_root=tmp_path / "base")
    (tmp_path / "scratch").mkdir()
    with pytest.raises(KvmlabError) as refusal:
        kvm_modules._install(built, base, tmp_path / "scratch")
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith("strip --strip-debug ") and "kvm.ko failed (exit 1): " in message
    assert "file format not recognized" in message


def test_the_32k_patch_changes_5_10s_memslot_limit_and_nothing_else():
    """The 32k table's base must be 5.10's array code as Debian ships it, with only its
    user memslot limit raised."""
    text = (REPO / "patches" / "kvm-5.10-memslots-32764.patch").read_text()
    changed = [line for line in text.split("\n---\n", 1)[1].splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-#define KVM_USER_MEM_SLOTS 509", "+#define KVM_USER_MEM_SLOTS 32764"]
    assert text.count("diff --git") == 1 and "a/arch/x86/include/asm/kvm_host.h" in text
