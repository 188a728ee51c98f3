"""Applying a patch series to a source tree the way kernel developers do: ``git am``.

Mail-formatted patches (``git format-patch`` output, an mbox) go through ``git am``;
a bare diff through ``git apply --index`` and a commit named after its file; a tree
without git gets ``git apply``. A patch that does not apply is one clear error naming it
and git's first failing hunk.

``applied()`` holds a series on a tree for as long as a build needs it. If the build
fails or is interrupted, the tree is put back as it was found, because a half-patched tree
makes the next attempt stop at "does not apply".
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from kvmlab.errors import KvmlabError, MissingTool
from kvmlab.kernels import paths

SUFFIXES = (".patch", ".diff", ".mbox", ".eml")
IDENTITY = {"GIT_AUTHOR_NAME": "kvmlab", "GIT_AUTHOR_EMAIL": "kvmlab@localhost",
            "GIT_COMMITTER_NAME": "kvmlab", "GIT_COMMITTER_EMAIL": "kvmlab@localhost"}
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def series(path: Path) -> list[Path]:
    """The patch files ``path`` names: itself, or a directory's patches in name order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise KvmlabError(f"{path}: no patches ({', '.join(SUFFIXES)} files) in this directory")
        return found
    if path.exists():  # a FIFO or a device: git and hashing would block on it, or read for ever
        raise KvmlabError(f"patch {path}: not a regular file or a directory of patches")
    raise KvmlabError(f"patch {path} does not exist")


def _absolute(patch: Path) -> Path:
    """The patch as git, running in the tree, must be told it."""
    return paths.resolved(patch, "patch")


def files_touched(tree: Path, patch: Path) -> list[str]:
    """The paths ``patch`` changes, as git reads them."""
    listed = git(tree, "apply", "--numstat", str(_absolute(patch)), check=False)
    if listed.returncode != 0:
        raise KvmlabError(f"patch {patch.name} is not a patch git can read: {first_failure(listed.stderr)}")
    return [line.split("\t")[-1] for line in listed.stdout.splitlines() if line.strip()]


def apply(tree: Path, patch: Path) -> None:
    """Apply and commit one patch on the git tree ``tree``."""
    text = patch.read_text(errors="replace")
    mail = text.startswith("From ") or "\nSubject:" in text[:2000]
    argv = ["am", "-q", str(_absolute(patch))] if mail else ["apply", "--index", str(_absolute(patch))]
    done = git(tree, *argv, check=False)
    if done.returncode != 0:
        if mail:
            git(tree, "am", "--abort", check=False)
        raise KvmlabError(f"patch {patch.name} does not apply: {first_failure(done.stderr + done.stdout)}")
    if not mail:
        git(tree, "commit", "-q", "-m", patch.name)


@contextmanager
def applied(tree: Path, patches: list[Path], log: TextIO) -> Iterator[None]:
    """``patches`` applied to ``tree`` for the block; they stay if the block succeeds.

    If a patch does not apply, or the block fails or is interrupted, the tree is put back
    as it was and the error goes on. If that too fails, the error says how to finish
    by hand.
    """
    if not patches:
        yield
        return
    undo = _GitTree(tree) if (tree / ".git").exists() else _PlainTree(tree)
    try:
        for patch in patches:
            with _interrupts_held():
                undo.apply(patch)
            print(f"kvmlab: applied {patch.name}", file=log)
        yield
    except BaseException as failure:
        _put_back(undo, failure, log)
        raise


def _put_back(undo: _GitTree | _PlainTree, failure: BaseException, log: TextIO) -> None:
    """Undo the series; if even that fails, one error naming both failures and the way out.

    Only something outside kvmlab can make it fail: another git holding the tree's
    index.lock, a patched file edited during the build, a full disk. kvmlab cannot
    tell which, so it gives the command that finishes the job once that is dealt with.
    """
    try:
        with _interrupts_held():
            undo.restore()
    except KvmlabError as stuck:
        raise KvmlabError(f"{_described(failure)}; {undo.tree} is left patched ({stuck}): "
                          f"reset it with: {undo.reset_command()}") from failure
    print(f"kvmlab: {undo.tree} put back as it was", file=log)


def _described(failure: BaseException) -> str:
    if isinstance(failure, KvmlabError):
        return str(failure)
    if isinstance(failure, KeyboardInterrupt):
        return "interrupted"
    return f"{type(failure).__name__}: {failure}"


class _GitTree:
    """A git checkout: each patch becomes a commit, and putting the tree back is
    ``git reset --merge`` to the HEAD it started from, which keeps the user's own
    uncommitted changes (git would not have patched a file that had any)."""

    def __init__(self, tree: Path):
        self.tree = tree
        self.head = _starting_head(tree)

    def apply(self, patch: Path) -> None:
        apply(self.tree, patch)

    def restore(self) -> None:
        if _am_under_way(self.tree):
            git(self.tree, "am", "--abort")
        git(self.tree, "reset", "-q", "--merge", self.head)

    def reset_command(self) -> str:
        where = f"git -C {shlex.quote(str(self.tree))}"
        abort = [f"{where} am --abort"] if _am_under_way(self.tree) else []
        return " && ".join([*abort, f"{where} reset --merge {self.head}"])


def _starting_head(tree: Path) -> str:
    """HEAD, once ``tree`` is known fit to be patched and reset: nothing staged (a bare
    diff's commit would take it along, and the reset would drop it), no am or rebase."""
    head = git(tree, "rev-parse", "--verify", "-q", "HEAD", check=False)
    if head.returncode != 0:
        raise KvmlabError(f"{tree} is a git tree without a commit: commit its files first")
    if _am_under_way(tree) or _git_path(tree, "rebase-merge").exists():
        raise KvmlabError(f"{tree}: a git am or rebase is under way; finish or abort it first")
    if git(tree, "diff", "--cached", "--quiet", check=False).returncode != 0:
        raise KvmlabError(f"{tree} has staged changes: commit or unstage them first "
                          f"(the patches become commits on its HEAD)")
    return head.stdout.strip()


def _am_under_way(tree: Path) -> bool:
    return _git_path(tree, "rebase-apply").exists()


def _git_path(tree: Path, name: str) -> Path:
    """Where git keeps ``name`` for this tree (``.git/name``, or a worktree's own)."""
    return tree / git(tree, "rev-parse", "--git-path", name).stdout.strip()


class _PlainTree:
    """A tree without git (Debian's linux-source unpacked): ``git apply`` patches it and
    ``git apply -R`` undoes it, last patch first. git apply writes a patch whole or not
    at all, so every patch it accepted reverses exactly."""

    def __init__(self, tree: Path):
        self.tree = tree
        self.patched: list[Path] = []

    def apply(self, patch: Path) -> None:
        done = git(self.tree, "apply", str(_absolute(patch)), check=False)
        if done.returncode != 0:
            raise KvmlabError(f"patch {patch.name} does not apply: {first_failure(done.stderr)}")
        self.patched.append(patch)

    def restore(self) -> None:
        while self.patched:
            patch = self.patched[-1]
            done = git(self.tree, "apply", "-R", str(_absolute(patch)), check=False)
            if done.returncode != 0:
                raise KvmlabError(f"git apply -R {patch.name} failed: {first_failure(done.stderr)}")
            self.patched.pop()

    def reset_command(self) -> str:
        undo = [f"git apply -R {shlex.quote(str(_absolute(p)))}" for p in reversed(self.patched)]
        return " && ".join([f"cd {shlex.quote(str(self.tree))}", *undo])


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then take effect.

    A patch half written, or a tree half put back, is the one state nothing can undo;
    git needs only a moment for either. (git runs in its own process group, so the
    terminal's Ctrl-C does not reach it either.) Only the main thread receives signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: held.append(signum))
                for number in HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if held:
        signal.raise_signal(held[0])


def first_failure(output: str) -> str:
    """git's line naming the first hunk that failed (file:line), else its first error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("patch failed:", "error:", "fatal:"):
        found = [line for line in lines if marker in line]
        if found:
            return found[0].removeprefix("error: ")
    return lines[0] if lines else "git gave no reason"


def git(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run git in ``tree``; with ``check``, a failure is one line naming the git command.

    git gets a process group of its own and no terminal input, so a Ctrl-C meant for
    kvmlab cannot kill it halfway through writing the tree (see ``_interrupts_held``).
    """
    try:
        done = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, process_group=0, env={**os.environ, **IDENTITY})
    except FileNotFoundError:
        raise MissingTool("git not found: kvmlab applies patches with git (make setup installs it)") from None
    if check and done.returncode != 0:
        raise KvmlabError(f"git {args[0]} failed: {first_failure(done.stderr)}")
    return done
