"""The guest image: a Debian root filesystem built by mmdebstrap, cached by recipe hash.

The recipe (vm-images/<name>.toml, installed with the ``kvmlab_guest`` package) lists
the suite, packages, what to leave out and the kernel modules the guest needs. The
built image is a newc cpio archive, the first of the initramfs archives every lab
kernel boots with.
"""

import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import kvmlab_guest

from kvmlab import apt, cache
from kvmlab.errors import KvmlabError, MissingTool, UnknownSpec
from kvmlab.vm import initramfs

RECIPES = Path(kvmlab_guest.__file__).parent
DEFAULT_RECIPE = "bookworm"
#: Bump when the way an image is made changes in a way the recipe text does not show.
BUILD_FORMAT = "1"


@dataclass(frozen=True)
class Recipe:
    name: str
    text: str
    suite: str
    variant: str
    packages: list[str]
    exclude: list[str]
    remove: list[str]
    modules: list[str]

    @property
    def key(self) -> str:
        digest = hashlib.sha256(f"{BUILD_FORMAT}\n{self.text}".encode()).hexdigest()
        return f"{self.name}-{digest[:16]}"


def recipe(name: str = DEFAULT_RECIPE) -> Recipe:
    """Load ``vm-images/<name>.toml``."""
    path = RECIPES / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
        raise UnknownSpec(f"unknown image recipe {name!r}. Available: {known}")
    text = path.read_text()
    data = tomllib.loads(text)
    return Recipe(
        name=name, text=text, suite=data["suite"], variant=data.get("variant", "minbase"),
        packages=data["packages"], exclude=data.get("exclude", []),
        remove=data.get("remove", []), modules=data.get("modules", []),
    )


def path_for(rec: Recipe) -> Path:
    return cache.area("images") / f"{rec.key}.cpio"


def build(rec: Recipe, force: bool = False, log=sys.stderr) -> Path:
    """The image for ``rec``, built with mmdebstrap unless already cached."""
    out = path_for(rec)
    if out.exists() and not force:
        return out
    if shutil.which("mmdebstrap") is None:
        raise MissingTool("mmdebstrap not found: install it (make setup does)")
    print(f"kvmlab: building guest image {rec.key} with mmdebstrap (once per recipe)", file=log)
    with cache.locked(out.with_suffix(".lock")):
        if out.exists() and not force:
            return out
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
            tar = Path(scratch) / "rootfs.tar"
            _mmdebstrap(rec, tar)
            if force and out.exists():
                out.unlink()
            cache.publish_file(out, lambda tmp: initramfs.from_tar(tar, tmp))
    return out


def _mmdebstrap(rec: Recipe, tar: Path) -> None:
    removal = " ".join(shlex.quote(p) for p in rec.remove)
    command = [
        "mmdebstrap", "--quiet", f"--variant={rec.variant}", *apt.host_policy_aptopts(),
        f"--include={','.join(rec.packages)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in rec.exclude),
        f'--customize-hook=cd "$1" && rm -rf {removal}',
        rec.suite, str(tar),
        f"deb [signed-by={apt.KEYRING}] {apt.mirror()} {rec.suite} main",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "; ".join(done.stderr.strip().splitlines()[-3:])
        raise KvmlabError(f"mmdebstrap failed for image {rec.name}: {tail}")
