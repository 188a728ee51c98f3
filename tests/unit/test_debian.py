from pathlib import Path

from kvmlab.apt import Package, _control_fields, depends_names, source_uris

DEB822 = """Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
"""
ONE_LINE = "deb [arch=amd64] https://mirror.example/debian bullseye main\n# deb http://old/debian x main\n"


def test_source_uris_both_styles():
    assert source_uris(DEB822, deb822=True) == ["http://mirror.example/debian"]
    assert source_uris(ONE_LINE, deb822=False) == ["https://mirror.example/debian"]


def test_control_fields_first_stanza_only():
    text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\n"
    assert _control_fields(text) == {"Package": "a", "Version": "1", "Description": "x"}


def test_depends_names():
    depends = "linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1), a | b, c"
    assert depends_names(depends) == ["linux-image-6.1.0-50-cloud-amd64", "a", "c"]


def test_package_key_names_content():
    package = Package("linux-image-x", "1.0", "ab" * 32, 10, "bookworm")
    assert package.key == "linux-image-x_1.0_abababababab"


def test_merged_usr_modules_move_to_lib_modules(tmp_path):
    """trixie's packages put modules under usr/lib/modules; depmod and modprobe look in lib/."""
    from kvmlab.kernels.debian import _unmerge_usr

    merged = tmp_path / "usr" / "lib" / "modules" / "6.12.1-cloud-amd64" / "kernel"
    merged.mkdir(parents=True)
    (merged / "kvm.ko.xz").write_bytes(b"module")
    (tmp_path / "usr" / "lib" / "firmware").mkdir()
    _unmerge_usr(tmp_path, Path("lib", "modules"))
    moved = tmp_path / "lib" / "modules" / "6.12.1-cloud-amd64" / "kernel" / "kvm.ko.xz"
    assert moved.read_bytes() == b"module"
    assert not (tmp_path / "usr" / "lib" / "modules").exists()
    assert (tmp_path / "usr" / "lib" / "firmware").is_dir()


def test_classic_lib_modules_stay_put(tmp_path):
    from kvmlab.kernels.debian import _unmerge_usr

    (tmp_path / "lib" / "modules" / "6.1.0").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "modules" / "other").mkdir(parents=True)
    _unmerge_usr(tmp_path, Path("lib", "modules"))
    assert (tmp_path / "lib" / "modules" / "6.1.0").is_dir()
    assert (tmp_path / "usr" / "lib" / "modules" / "other").is_dir()


SID_IMAGE_DEPENDS = ("dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
                     "linux-base-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), "
                     "linux-binary-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), "
                     "linux-modules-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), kmod")


def test_pinned_depends_are_the_parts_of_one_build():
    """sid's linux-image-7.2.13 (its real Depends): the three parts pinned to its version,
    not the initramfs tools it names as alternatives, nor a dependency at another version."""
    from kvmlab.apt import pinned_depends

    assert pinned_depends(SID_IMAGE_DEPENDS, "7.2.13-1") == [
        "linux-base-7.2.13+deb14-cloud-amd64", "linux-binary-7.2.13+deb14-cloud-amd64",
        "linux-modules-7.2.13+deb14-cloud-amd64"]
    assert pinned_depends(SID_IMAGE_DEPENDS, "7.2.14-1") == []
    trixie = "kmod, initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"
    assert pinned_depends(trixie, "6.12.117-1") == []


def _split_7x_root(root: Path, release: str) -> None:
    """The files of linux-binary, linux-base and linux-modules 7.x, as dpkg-deb -x leaves them."""
    modules = root / "usr" / "lib" / "modules" / release
    (modules / "kernel" / "arch" / "x86" / "kvm").mkdir(parents=True)
    for name in ("vmlinuz", "config", "System.map", "modules.order"):
        (modules / name).write_text(name)


def test_split_7x_layout_release_and_files(tmp_path):
    from kvmlab.kernels.debian import _kernel_file_places, _release

    _split_7x_root(tmp_path, "7.2.13+deb14-cloud-amd64")
    assert _release(tmp_path, []) == "7.2.13+deb14-cloud-amd64"
    places = _kernel_file_places(tmp_path, "config", "7.2.13+deb14-cloud-amd64")
    assert [p for p in places if p.exists()] == [
        tmp_path / "usr/lib/modules/7.2.13+deb14-cloud-amd64/config"]


def test_classic_boot_layout_release(tmp_path):
    from kvmlab.kernels.debian import _release

    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.12.117+deb13-cloud-amd64").write_text("k")
    (tmp_path / "usr/lib/modules/6.12.117+deb13-cloud-amd64").mkdir(parents=True)
    assert _release(tmp_path, []) == "6.12.117+deb13-cloud-amd64"


def test_no_kernel_in_the_parts_is_one_line_naming_them(tmp_path):
    """The next repackaging: the parts are named, and the places looked in."""
    import pytest

    from kvmlab.errors import KvmlabError
    from kvmlab.kernels.debian import _release

    (tmp_path / "usr/lib/modules/7.9.0-cloud-amd64").mkdir(parents=True)
    parts = [Package("linux-image-7.9.0-cloud-amd64", "7.9.0-1", "00" * 32, 1, "sid"),
             Package("linux-kernel-7.9.0-cloud-amd64", "7.9.0-1", "11" * 32, 1, "sid")]
    with pytest.raises(KvmlabError) as err:
        _release(tmp_path, parts)
    assert "linux-image-7.9.0-cloud-amd64, linux-kernel-7.9.0-cloud-amd64 hold no vmlinuz" in str(err.value)
    assert "\n" not in str(err.value)


def test_debug_vmlinux_follows_7x_symlink(tmp_path):
    """7.x's -dbg has boot/vmlinux-<release> as a relative symlink into lib/modules/<release>/."""
    from kvmlab.kernels.debian import _debug_vmlinux

    release = "7.3.4+deb13-cloud-amd64"
    real = tmp_path / "lib" / "modules" / release / "vmlinux"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"ELF")
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / f"vmlinux-{release}").symlink_to(f"../lib/modules/{release}/vmlinux")
    assert _debug_vmlinux(tmp_path, release) == real.resolve()
    (tmp_path / "boot" / "vmlinux-other").symlink_to("/etc/passwd")
    assert _debug_vmlinux(tmp_path, "other") is None


def test_a_pinned_package_gone_from_debian_is_found_in_the_cache(tmp_path, monkeypatch):
    """sid drops a kernel's packages within weeks; a store or run naming one still reads it."""
    from kvmlab.kernels.debian import _cached_entry

    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path))
    name = "linux-image-7.2.13+deb14-cloud-amd64"
    entry = tmp_path / "kernels" / f"{name}_7.2.13-1_100ec8efc7e1"
    entry.mkdir(parents=True)
    assert _cached_entry(name, debuginfo=False) is None  # not unpacked whole: no kernel.json
    (entry / "kernel.json").write_text("{}")
    (tmp_path / "kernels" / "linux-image-7.2.13+deb14-cloud-amd64-dbg_1").mkdir()
    assert _cached_entry(name, debuginfo=False) == entry
    assert _cached_entry(name, debuginfo=True) is None
    (entry / "debug").mkdir()
    assert _cached_entry(name, debuginfo=True) == entry
    assert _cached_entry("linux-image-7.2.12+deb14-cloud-amd64", debuginfo=False) is None


def test_debug_info_keeps_only_the_kvm_modules(tmp_path):
    """drgn reads vmlinux and kvm.ko; the rest of a -dbg package's module DWARF (1.1 GB)
    is left behind, and the KVM directory keeps all its modules."""
    from kvmlab.kernels.debian import _keep_kvm_modules
    modules = tmp_path / "unpacked" / "lib" / "modules" / "6.1.0-50-cloud-amd64"
    for name in ("kernel/arch/x86/kvm/kvm.ko", "kernel/arch/x86/kvm/kvm-amd.ko",
                 "kernel/fs/btrfs/btrfs.ko", "vdso/vdso64.so"):
        (modules / name).parent.mkdir(parents=True, exist_ok=True)
        (modules / name).write_text(name)
    kept = tmp_path / "modules"
    _keep_kvm_modules(modules, kept)
    assert sorted(str(path.relative_to(kept)) for path in kept.rglob("*") if path.is_file()) == [
        "kernel/arch/x86/kvm/kvm-amd.ko", "kernel/arch/x86/kvm/kvm.ko"]
    assert (kept / "kernel/arch/x86/kvm/kvm.ko").read_text() == "kernel/arch/x86/kvm/kvm.ko"


def test_debug_info_without_kvm_modules_keeps_nothing(tmp_path):
    from kvmlab.kernels.debian import _keep_kvm_modules
    (tmp_path / "unpacked" / "kernel" / "fs").mkdir(parents=True)
    _keep_kvm_modules(tmp_path / "unpacked", tmp_path / "modules")
    assert not (tmp_path / "modules").exists()
