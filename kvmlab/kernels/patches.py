"""Applying a patch series to a source tree the way kernel developers do: ``git am``.

Mail-formatted patches (``git format-patch`` output, an mbox) go through ``git am``;
a bare diff through ``git apply --index`` and a commit named after its file. A patch
that does not apply is one clear error naming it and git's first failing hunk.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvmlab.errors import KvmlabError, MissingTool

SUFFIXES = (".patch", ".diff", ".mbox", ".eml")
IDENTITY = {"GIT_AUTHOR_NAME": "kvmlab", "GIT_AUTHOR_EMAIL": "kvmlab@localhost",
            "GIT_COMMITTER_NAME": "kvmlab", "GIT_COMMITTER_EMAIL": "kvmlab@localhost"}


def series(path: Path) -> list[Path]:
    """The patch files ``path`` names: itself, or a directory's patches in name order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise KvmlabError(f"{path}: no patches ({', '.join(SUFFIXES)} files) in this directory")
        return found
    raise KvmlabError(f"patch {path} does not exist")


def files_touched(tree: Path, patch: Path) -> list[str]:
    """The paths ``patch`` changes, as git reads them."""
    listed = git(tree, "apply", "--numstat", str(patch.resolve()), check=False)
    if listed.returncode != 0:
        raise KvmlabError(f"patch {patch.name} is not a patch git can read: {first_failure(listed.stderr)}")
    return [line.split("\t")[-1] for line in listed.stdout.splitlines() if line.strip()]


def apply(tree: Path, patch: Path) -> None:
    """Apply and commit one patch on the git tree ``tree``."""
    text = patch.read_text(errors="replace")
    mail = text.startswith("From ") or "\nSubject:" in text[:2000]
    argv = ["am", "-q", str(patch.resolve())] if mail else ["apply", "--index", str(patch.resolve())]
    done = git(tree, *argv, check=False)
    if done.returncode != 0:
        if mail:
            git(tree, "am", "--abort", check=False)
        raise KvmlabError(f"patch {patch.name} does not apply: {first_failure(done.stderr + done.stdout)}")
    if not mail:
        git(tree, "commit", "-q", "-m", patch.name)


def first_failure(output: str) -> str:
    """git's line naming the first hunk that failed (file:line), else its first error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("patch failed:", "error:", "fatal:"):
        found = [line for line in lines if marker in line]
        if found:
            return found[0].removeprefix("error: ")
    return lines[0] if lines else "git gave no reason"


def git(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True,
                              env={**os.environ, **IDENTITY})
    except FileNotFoundError:
        raise MissingTool("git not found: kvmlab applies patches with git (make setup installs it)") from None
    if check and done.returncode != 0:
        raise KvmlabError(f"git {args[0]} failed: {done.stderr.strip()}")
    return done
