"""What travels into the guest runs there: the guest packages, copied as the layer copies
them, import on a bare Python with no site-packages (as in the guest image), and the
init sits where the kernel's ``rdinit=`` looks for it."""

import subprocess
import sys
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab.vm import layer


def guest_tree(tmp_path: Path) -> Path:
    code = tmp_path / protocol.GUEST_CODE.lstrip("/")
    for package in layer.GUEST_PACKAGES:
        layer._copy_package(package, code)
    return code


def test_every_guest_module_imports_with_the_standard_library_alone(tmp_path):
    code = guest_tree(tmp_path)
    modules = sorted(".".join(path.relative_to(code).with_suffix("").parts).removesuffix(".__init__")
                     for path in code.rglob("*.py"))
    assert "kvmlab_guest.protocol" in modules and "kselftest_py.memslot_perf" in modules
    assert "traces.guest.capture" in modules and "traces.tracedat" not in modules
    script = (f"import sys; sys.path.insert(0, {str(code)!r}); import importlib\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "leaked = [m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names\n"
              "          and m.split('.')[0] not in ('__main__', 'kvmlab_guest', 'kselftest_py', 'traces')]\n"
              "assert not leaked, leaked\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_the_init_is_where_rdinit_points(tmp_path):
    guest_tree(tmp_path)
    init = tmp_path / protocol.INIT.lstrip("/")
    assert init.read_text().startswith("#!/usr/bin/python3\n")
