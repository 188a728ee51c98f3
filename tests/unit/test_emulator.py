"""kvmlab's pinned QEMU on a host newer than the one it was built for (Debian 13)."""

import json
import os

import pytest

from kvmlab.vm import emulator
from kvmlab.vm.emulator import Emulator


@pytest.mark.parametrize("soname, package", [
    ("libcapstone.so.4", "libcapstone4"),       # trixie has libcapstone5
    ("libfuse3.so.3", "libfuse3-3"),            # a name ending in a digit takes a hyphen
    ("libaio.so.1", "libaio1"),                 # trixie has libaio1t64 (libaio.so.1t64)
    ("libpixman-1.so.0", "libpixman-1-0"),
    ("libxenctrl.so.4.17", "libxenctrl4.17"),
    ("libstdc++.so.6", "libstdc++6"),
    ("ld-linux-x86-64.so.2", None),             # not a library by the rule: left missing
    ("libfoo.so", None),
])
def test_a_missing_library_is_named_by_its_package(soname, package):
    assert emulator.library_package(soname) == package


def test_a_qemu_with_libraries_of_its_own_starts_through_env():
    plain = Emulator("/q/usr/bin/qemu-system-x86_64", "10.0.2")
    assert plain.command() == ["/q/usr/bin/qemu-system-x86_64"]
    bundled = Emulator("/q/usr/bin/qemu-system-x86_64", "10.0.2", library_path="/q/libs/usr/lib:/q/libs/lib")
    assert bundled.command() == ["env", "LD_LIBRARY_PATH=/q/libs/usr/lib:/q/libs/lib",
                                 "/q/usr/bin/qemu-system-x86_64"]


def test_a_record_with_a_library_path_loads_and_one_not_text_is_refused(tmp_path):
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\n")
    os.chmod(binary, 0o755)
    record = {"binary": str(binary), "version": "10.0.2", "library_path": str(tmp_path / "libs")}
    (tmp_path / emulator.RECORD).write_text(json.dumps(record))
    assert emulator.load(tmp_path).library_path == str(tmp_path / "libs")
    (tmp_path / emulator.RECORD).write_text(json.dumps(record | {"library_path": 3}))
    with pytest.raises(emulator.KvmlabError, match="library_path 3 is not text"):
        emulator.load(tmp_path)
