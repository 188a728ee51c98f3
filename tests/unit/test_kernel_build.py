"""kvmlab kernel build: the lab's configuration on a real Linux tree (Debian's
linux-source-6.1). The compile itself takes many minutes on 2 cores, too long for CI:
it is measured and documented in docs/guide.md; here the configuration step runs for real."""

import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab import apt
from kvmlab.kernels import build as kernel_build


@pytest.fixture(scope="module")
def linux_tree(tmp_path_factory) -> Path:
    """Debian bookworm's linux-source-6.1, unpacked whole."""
    work = tmp_path_factory.mktemp("linux")
    root = apt.AptRoot("bookworm")
    package = root.package("linux-source-6.1")
    deb = root.download(package, work / "deb")
    tree = work / "tree"
    tree.mkdir()
    tarball = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    source = subprocess.run(["tar", "-xO", "./usr/src/linux-source-6.1.tar.xz"], input=tarball,
                            capture_output=True, check=True).stdout
    subprocess.run(["tar", "-xJ", "-C", str(tree), "--strip-components=1"], input=source, check=True)
    return tree


def test_the_lab_configuration_keeps_everything_it_asks_for(linux_tree, tmp_path):
    ours = kernel_build.FRAGMENTS
    fragments = [linux_tree / "kernel/configs/kvm_guest.config", ours / "kvm-testing.config",
                 ours / "lockdep.config"]
    assert kernel_build.configure(linux_tree, tmp_path, fragments, None) == []
    config = (tmp_path / ".config").read_text().splitlines()
    for wanted in ("CONFIG_KVM_AMD=y", "CONFIG_KVM_INTEL=y", "CONFIG_VIRTIO_CONSOLE=y",
                   "CONFIG_FW_CFG_SYSFS=y", "CONFIG_FUNCTION_GRAPH_TRACER=y", "CONFIG_HIST_TRIGGERS=y",
                   "CONFIG_DEBUG_INFO=y", "CONFIG_PROVE_LOCKING=y"):
        assert wanted in config
    assert "CONFIG_KASAN=y" not in config


def test_a_setting_kconfig_refuses_is_named(linux_tree, tmp_path):
    fragment = tmp_path / "mine.config"
    fragment.write_text("CONFIG_KVM=y\nCONFIG_S390_GUEST=y\n")
    (tmp_path / "out").mkdir()
    refused = kernel_build.configure(linux_tree, tmp_path / "out", [fragment], None)
    assert refused == ["CONFIG_S390_GUEST=y (got n; from mine.config)"]


def test_not_a_source_tree(tmp_path):
    assert_one_line_error(kvmlab("kernel", "build", str(tmp_path)), "is not a Linux source tree")
