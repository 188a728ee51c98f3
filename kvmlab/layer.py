"""The per-run initramfs layer: the guest init, the job, kselftest_py and the tracing wrapper.

Small and rebuilt for every run, so editing kselftest_py or the init never
rebuilds the cached image.
"""

import json
import shutil
from pathlib import Path

from kvmlab import initramfs

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "vm-images" / "init.py"
#: Guest-side code (standard library only), copied under /opt/kvmlab on PYTHONPATH.
GUEST_CODE = ("kselftest_py", "traces/__init__.py", "traces/guest")


ADDED = "/opt/kvmlab/add"


def build(run_dir: Path, argv: list[str], env: dict[str, str], modules: list[str],
          keep: bool, added: list[Path] = (), files: dict[str, str] | None = None) -> Path:
    """Write ``run_dir/layer.cpio`` holding /kvmlab/init, /kvmlab/job.json, /opt/kvmlab/.

    ``files`` are extra small files for /kvmlab/ (name → text), e.g. a resolved probe set.
    ``added`` files or directories land in /opt/kvmlab/add/ under their own names
    (e.g. a test binary built on the host).
    """
    tree = run_dir / "layer"
    (tree / "kvmlab").mkdir(parents=True)
    shutil.copy(INIT, tree / "kvmlab" / "init")
    (tree / "kvmlab" / "init").chmod(0o755)
    job = {"argv": argv, "env": env, "modules": modules, "keep": keep}
    (tree / "kvmlab" / "job.json").write_text(json.dumps(job, indent=2))
    for name, text in (files or {}).items():
        (tree / "kvmlab" / name).write_text(text)
    for relative in GUEST_CODE:
        source, target = REPO / relative, tree / "opt" / "kvmlab" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, target)
    for path in added:
        target = tree / ADDED.lstrip("/") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
    out = run_dir / "layer.cpio"
    initramfs.from_tree(tree, out)
    shutil.rmtree(tree)
    return out
