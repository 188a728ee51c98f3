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
