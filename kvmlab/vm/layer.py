"""The per-run initramfs layer: the job, the guest's Python packages and the user's files.

Small and rebuilt for every run, so editing kselftest_py or the init never
rebuilds the cached image. The guest's code travels as whole packages, found where
Python imports them from (a checkout or an installed wheel alike).
"""

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab.vm import initramfs

#: Guest-side packages (standard library only), copied under protocol.GUEST_CODE.
GUEST_PACKAGES = ("kvmlab_guest", "kselftest_py", "traces.guest")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def build(run_dir: Path, job: protocol.Job, added: list[Path] = (),
          files: dict[str, str] | None = None) -> Path:
    """Write ``run_dir/layer.cpio``: ``protocol.JOB``, the guest packages, the added files.

    ``files`` are extra small files for ``protocol.GUEST_ROOT`` (name → text), e.g. a
    resolved probe set. ``added`` files or directories land in ``protocol.ADDED`` under
    their own names (e.g. a test binary built on the host).
    """
    tree = run_dir / "layer"
    guest_root = tree / protocol.GUEST_ROOT.lstrip("/")
    guest_root.mkdir(parents=True)
    (tree / protocol.JOB.lstrip("/")).write_text(json.dumps(job.to_json(), indent=2))
    for name, text in (files or {}).items():
        (guest_root / name).write_text(text)
    for package in GUEST_PACKAGES:
        _copy_package(package, tree / protocol.GUEST_CODE.lstrip("/"))
    (tree / protocol.INIT.lstrip("/")).chmod(0o755)
    for path in added:
        target = tree / protocol.ADDED.lstrip("/") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
    out = run_dir / "layer.cpio"
    initramfs.from_tree(tree, out)
    shutil.rmtree(tree)
    return out


def _copy_package(name: str, code_root: Path) -> None:
    """Copy package ``name`` whole, with the ``__init__.py`` of each parent package."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        init = Path(importlib.util.find_spec(parent).origin)
        target = code_root.joinpath(*parts[:depth], "__init__.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(init, target)
    source = Path(importlib.util.find_spec(name).submodule_search_locations[0])
    shutil.copytree(source, code_root.joinpath(*parts), ignore=_SKIP)


def code_digest() -> str:
    """A hash of the guest packages as ``build`` copies them: a template holds them in its
    memory, so changing one file of them must make a new template."""
    digest = hashlib.sha256()
    for package in GUEST_PACKAGES:
        source = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in sorted(source.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(f"{package}/{path.relative_to(source)}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
