"""The upstream kvm selftests build from Debian's source as static binaries a guest can run.

Marked ``vm``: the first run downloads linux-source-6.1 (139 MB) and compiles (~30 s).
"""

import importlib.util
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

BENCH = REPO / "bench" / "upstream_selftests.py"
PT_INTERP = 3


def load_bench():
    """bench/ is scripts, not a package: load the module from its file."""
    spec = importlib.util.spec_from_file_location("upstream_selftests", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def program_header_types(path: Path) -> list[int]:
    """p_type of every program header of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit LE ELF"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


@pytest.mark.vm
def test_build_gives_static_binaries_that_print_usage():
    paths = load_bench().build()
    assert set(paths) == {"memslot_perf_test", "memslot_modification_stress_test"}
    for name, path in paths.items():
        assert path.is_file(), name
        # No PT_INTERP: no dynamic loader, so the guest's libc version does not matter.
        assert PT_INTERP not in program_header_types(path), f"{name} is dynamically linked"
        # -h prints usage and exits before touching /dev/kvm (memslot_perf_test exits 255).
        done = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=30, check=False)
        assert "usage:" in done.stdout + done.stderr, f"{name} -h printed no usage"
