"""``kvmlab kernel build TREE``: a kernel for the lab from a source tree, bootable as ``local:OUT``.

For a patch that reaches beyond the KVM modules (the scalable-memslots series changes
include/linux/kvm_host.h), or a kernel Debian does not package, the whole kernel is
built: TREE (a git checkout, or Debian's linux-source unpacked) gets the patches
(``git am``), the configuration is x86_64_defconfig + the kernel's own
kvm_guest.config + kvmlab's kvm-testing.config (KVM, virtio-serial, fw_cfg, ftrace,
kprobes, hist triggers, DWARF; all built in so the kernel needs no modules), or a
given base config with those merged over it, plus ``--config`` fragments, KASAN or
lockdep on request. The build goes to OUT (``make O=OUT``), so TREE stays clean, and
prints its progress; OUT then holds what a ``local:`` spec reads.

A build that fails (a missing fragment, a patch that does not apply, a failing make,
Ctrl-C) puts TREE back as it found it (``patches.applied``), so the next attempt can
apply the series again; a successful one leaves the series applied.

Options a fragment asks for but Kconfig refuses (an unmet dependency) are listed after
configuring, since a silently missing CONFIG_KVM_AMD would only show as a guest
without /dev/kvm.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab import durations
from kvmlab.errors import KvmlabError, MissingTool
from kvmlab.kernels import patches as patch_series
from kvmlab.kernels import paths

FRAGMENTS = Path(__file__).resolve().parent / "configs"
KERNEL_FRAGMENTS = ("kernel/configs/kvm_guest.config",)
PROGRESS_EVERY_S = 15.0
TOOLS = ("make", "gcc", "flex", "bison", "bc")  # and libelf-dev, libssl-dev (make setup)


@dataclass
class BuildOptions:
    tree: Path
    out: Path | None = None
    patches: list[Path] = field(default_factory=list)
    fragments: list[Path] = field(default_factory=list)
    base_config: Path | None = None
    kasan: bool = False
    lockdep: bool = False
    jobs: int = os.cpu_count() or 1


def build(options: BuildOptions, log=sys.stderr) -> Path:
    """Patch, configure and build; returns OUT (``local:OUT`` boots it).

    Every check (tree, tools, inputs, OUT) comes before the first patch is applied and
    before OUT is created, so a refused build leaves TREE exactly as it was."""
    tree = _source_tree(options.tree)
    _check_tools()
    _check_inputs(options)
    out = _build_dir(options.out or tree / "kvmlab-build")
    with patch_series.applied(tree, options.patches, log):
        out.mkdir(parents=True, exist_ok=True)
        refused = configure(tree, out, _fragments(tree, options), _base_config(options))
        for line in refused:
            print(f"kvmlab: warning: the configuration refused {line}", file=log)
        started = time.monotonic()
        _make(tree, out, options.jobs, log)
        release = (out / "include" / "config" / "kernel.release").read_text().strip()
    took = durations.elapsed(time.monotonic() - started)
    print(f"kvmlab: built {release} in {took}; boot it as local:{out}", file=log)
    return out


def _source_tree(path: Path) -> Path:
    tree = paths.resolved(path, "kernel tree")
    if not (tree / "Makefile").exists() or not (tree / "arch" / "x86").is_dir():
        raise KvmlabError(f"{tree} is not a Linux source tree (no Makefile or arch/x86)")
    return tree


def _build_dir(path: Path) -> Path:
    """OUT, resolved; refused if something other than a directory already has its name."""
    out = paths.resolved(path, "build directory")
    if out.exists() and not out.is_dir():
        raise KvmlabError(f"build directory {out} exists and is not a directory")
    return out


def _check_tools() -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise MissingTool(f"{tool} not found: building a kernel needs {', '.join(TOOLS)} (make setup)")


def _check_inputs(options: BuildOptions) -> None:
    """Refuse a bad job count, or a missing fragment or base config, before a patch touches the tree."""
    if isinstance(options.jobs, bool) or not isinstance(options.jobs, int) or options.jobs < 1:
        raise KvmlabError(f"-j wants a positive number of jobs, got {options.jobs!r}")
    for fragment in options.fragments:
        if not paths.expanded(fragment, "config fragment").is_file():
            raise KvmlabError(f"config fragment {fragment} does not exist")
    if options.base_config is not None and not paths.expanded(options.base_config, "base config").is_file():
        raise KvmlabError(f"base config {options.base_config} does not exist")


def _base_config(options: BuildOptions) -> Path | None:
    return None if options.base_config is None else paths.resolved(options.base_config, "base config")


def _fragments(tree: Path, options: BuildOptions) -> list[Path]:
    """The fragments merged over the base config, later ones winning; absolute, since
    merge_config.sh runs in TREE."""
    fragments = [tree / name for name in KERNEL_FRAGMENTS] + [FRAGMENTS / "kvm-testing.config"]
    fragments += [FRAGMENTS / "kasan.config"] * options.kasan
    fragments += [FRAGMENTS / "lockdep.config"] * options.lockdep
    return fragments + [paths.resolved(fragment, "config fragment") for fragment in options.fragments]


def configure(tree: Path, out: Path, fragments: list[Path], base_config: Path | None) -> list[str]:
    """Write OUT/.config; returns the fragments' settings Kconfig did not keep."""
    for fragment in fragments:
        if not fragment.exists():
            raise KvmlabError(f"config fragment {fragment} does not exist")
    if base_config is not None:
        shutil.copy(base_config, out / ".config")
        run_make(tree, out, ["olddefconfig"], "make olddefconfig")
    else:
        run_make(tree, out, ["x86_64_defconfig"], "make x86_64_defconfig")
    merge = tree / "scripts" / "kconfig" / "merge_config.sh"
    argv = [str(merge), "-m", "-O", str(out), str(out / ".config"), *map(str, fragments)]
    _run(argv, tree, "merge_config.sh")
    run_make(tree, out, ["olddefconfig"], "make olddefconfig")
    ours = [f for f in fragments if f not in [tree / name for name in KERNEL_FRAGMENTS]]  # theirs span arches
    return refused(out / ".config", ours)


def refused(config: Path, fragments: list[Path]) -> list[str]:
    """``CONFIG_X=v (got: ...)`` for each fragment setting the final config lacks."""
    final = _settings(config.read_text().splitlines())
    missing = []
    for fragment in fragments:
        for name, value in _settings(fragment.read_text().splitlines()).items():
            got = final.get(name, "n")
            if got != value:
                missing.append(f"{name}={value} (got {got}; from {fragment.name})")
    return missing


def _settings(lines: list[str]) -> dict[str, str]:
    settings = {}
    for line in lines:
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            settings[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            settings[line[2:].split()[0]] = "n"
    return settings


def _make(tree: Path, out: Path, jobs: int, log) -> None:
    """make bzImage (vmlinux with it), saying every few seconds how far it got."""
    argv = ["make", "-C", str(tree), f"O={out}", f"-j{jobs}", "bzImage"]
    started = last = time.monotonic()
    compiled, tail = 0, []
    with (subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=make_env(), errors="replace", process_group=0) as process,
          open(out / "kvmlab-build.log", "w") as build_log):
        try:
            for line in process.stdout:
                build_log.write(line)
                tail = (tail + [line.rstrip()])[-200:]
                compiled += line.lstrip().startswith("CC ")
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    progress = f"{compiled} files compiled, {durations.elapsed(last - started)}"
                    print(f"kvmlab: building: {progress}", file=log, flush=True)
        except BaseException:
            _stop(process)
            raise
    if process.returncode != 0:
        raise KvmlabError(f"the kernel build failed: {compile_error(tail)} (log: {out / 'kvmlab-build.log'})")


def _stop(make: subprocess.Popen) -> None:
    """End make and every compiler under it (its process group) before the tree is put back.

    A compiler left running could write an object of the patched source, newer than the
    restored file, which the next build would keep. make's own SIGTERM handling ends only
    its direct children, and a Ctrl-C from the terminal reaches kvmlab alone.
    """
    try:
        os.killpg(make.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    make.wait()


def compile_error(lines: list[str]) -> str:
    """The first compiler error, else the first make error, else the last line."""
    lines = [line.strip() for line in lines if line.strip()]
    for marker in (" error: ", "ERROR: ", "*** "):
        found = [line for line in lines if marker in line]
        if found:
            return found[0]
    return lines[-1] if lines else "no output"


def run_make(tree: Path, out: Path, targets: list[str], what: str) -> None:
    _run(["make", "-C", str(tree), f"O={out}", *targets], tree, what)


def _run(argv: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=make_env())
    except OSError as err:
        raise KvmlabError(f"{what} could not run: {err}") from None
    if done.returncode != 0:
        raise KvmlabError(f"{what} failed: {compile_error((done.stdout + done.stderr).splitlines())}")


def make_env() -> dict[str, str]:
    # A parent make (kvmlab's own Makefile) must not leak its jobserver into the kernel's.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return {**env, "LC_ALL": "C"}
