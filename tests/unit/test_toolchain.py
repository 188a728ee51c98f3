"""Choosing the compiler a Debian kernel's modules are rebuilt with, from its config:
the host's when it has it, a root of the kernel's suite when not, and one clear line for
a config that names no compiler kvmlab knows."""

import shutil
import subprocess

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab.errors import KvmlabError
from kvmlab.kernels import toolchain
from kvmlab.kernels.model import Kernel


def _kernel(tmp_path, cc_text: str | None, suite: str | None = "bookworm") -> Kernel:
    config = tmp_path / "config"
    config.write_text("CONFIG_KVM=m\n" + (f'CONFIG_CC_VERSION_TEXT="{cc_text}"\n' if cc_text else ""))
    return Kernel(spec="debian:test", pinned="debian:test", release="6.1.0-test",
                  vmlinuz=tmp_path / "vmlinuz", config=config, system_map=None, modules_root=None,
                  suite=suite)


@pytest.mark.parametrize("text", [None, "icc (ICC) 2021.1", "gcc;rm -rf / (Debian 12.2.0-14) 12.2.0"])
def test_a_config_without_a_known_compiler_is_one_line(tmp_path, text):
    with pytest.raises(KvmlabError, match="names no compiler kvmlab knows") as err:
        toolchain.for_kernel(_kernel(tmp_path, text))
    assert "\n" not in str(err.value)


def test_the_hosts_own_compiler_builds_on_the_host(tmp_path):
    host_gcc = next(name for name in ("gcc-12", "gcc-14", "gcc-13", "gcc") if shutil.which(name))
    chosen = toolchain.for_kernel(_kernel(tmp_path, f"{host_gcc} (Debian) 12.2.0"))
    assert chosen.root is None and chosen.compiler == host_gcc
    version = subprocess.run([host_gcc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    assert chosen.version == version and chosen.describe() == f"{version}, on the host"


def test_a_missing_compiler_without_a_suite_is_one_line(tmp_path):
    with pytest.raises(KvmlabError, match="gcc-7 not found, and 6.1.0-test names no Debian suite"):
        toolchain.for_kernel(_kernel(tmp_path, "gcc-7 (Debian 7.4.0-6) 7.4.0", suite=None))


def test_kvm_modules_of_a_local_tree_are_refused_before_any_build(tmp_path):
    done = kvmlab("kernel", "fetch", f"kvm-modules:local:{tmp_path}",
                  env={"KVMLAB_CACHE": str(tmp_path / "c")})
    assert_one_line_error(done, "rebuilds the KVM modules of a debian: kernel")


@pytest.mark.parametrize("name,package", [
    ("gcc-10", "gcc-10"), ("gcc-12", "gcc-12"), ("x86_64-linux-gnu-gcc-14", "gcc-14"),
    ("gcc-16", "gcc-16"), ("clang-19", "clang-19"), ("aarch64-linux-gnu-gcc-14", None), ("gcc;id", None)])
def test_compiler_package_from_the_configs_name(name, package):
    """trixie and later name their compiler by target; its package is the plain gcc-N."""
    assert toolchain.compiler_package(name) == package


def test_a_backports_root_is_its_base_suite_with_the_backports():
    assert toolchain.root_suites("bullseye") == ["bullseye"]
    assert toolchain.root_suites("sid") == ["sid"]
    assert toolchain.root_suites("trixie-backports") == ["trixie", "trixie-backports"]
