"""kvmlab kernel build: the lab's configuration on a real Linux tree (Debian's
linux-source-6.1). The compile itself takes many minutes on 2 cores, too long for CI:
it is measured and documented in docs/guide.md; here the configuration step runs for real.
What a failed build leaves of the tree is tested on a small stand-in tree that builds in
a moment, with real git, make and gcc."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, kvmlab

from kvmlab import apt
from kvmlab.errors import KvmlabError
from kvmlab.kernels import build as kernel_build


@pytest.fixture(scope="module")
def linux_tree(tmp_path_factory) -> Path:
    """Debian bookworm's linux-source-6.1, unpacked whole."""
    work = tmp_path_factory.mktemp("linux")
    root = apt.AptRoot("bookworm")
    package = root.package("linux-source-6.1")
    deb = root.download(package, work / "deb")
    tree = work / "tree"
    tree.mkdir()
    tarball = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    source = subprocess.run(["tar", "-xO", "./usr/src/linux-source-6.1.tar.xz"], input=tarball,
                            capture_output=True, check=True).stdout
    subprocess.run(["tar", "-xJ", "-C", str(tree), "--strip-components=1"], input=source, check=True)
    return tree


def test_the_lab_configuration_keeps_everything_it_asks_for(linux_tree, tmp_path):
    ours = kernel_build.FRAGMENTS
    fragments = [linux_tree / "kernel/configs/kvm_guest.config", ours / "kvm-testing.config",
                 ours / "lockdep.config"]
    assert kernel_build.configure(linux_tree, tmp_path, fragments, None) == []
    config = (tmp_path / ".config").read_text().splitlines()
    for wanted in ("CONFIG_KVM_AMD=y", "CONFIG_KVM_INTEL=y", "CONFIG_VIRTIO_CONSOLE=y",
                   "CONFIG_FW_CFG_SYSFS=y", "CONFIG_FUNCTION_GRAPH_TRACER=y", "CONFIG_HIST_TRIGGERS=y",
                   "CONFIG_DEBUG_INFO=y", "CONFIG_PROVE_LOCKING=y"):
        assert wanted in config
    assert "CONFIG_KASAN=y" not in config


def test_a_setting_kconfig_refuses_is_named(linux_tree, tmp_path):
    fragment = tmp_path / "mine.config"
    fragment.write_text("CONFIG_KVM=y\nCONFIG_S390_GUEST=y\n")
    (tmp_path / "out").mkdir()
    refused = kernel_build.configure(linux_tree, tmp_path / "out", [fragment], None)
    assert refused == ["CONFIG_S390_GUEST=y (got n; from mine.config)"]


def test_not_a_source_tree(tmp_path):
    assert_one_line_error(kvmlab("kernel", "build", str(tmp_path)), "is not a Linux source tree")


def test_a_bad_config_on_linux_source_leaves_it_unpatched(linux_tree):
    """The reported bug, on the real tree: the patch applied, then --config refused."""
    hello = REPO / "tests" / "data" / "kvm-hello.patch"
    message, _ = _refused(linux_tree, [hello], fragments=[Path("/none.config")])
    assert "config fragment /none.config does not exist" in message
    check = subprocess.run(["git", "apply", "--check", str(hello)], cwd=linux_tree, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    assert not (linux_tree / "kvmlab-build").exists()


# -- failed builds put the tree back: on a small stand-in tree, built for real ------------------
# Its Makefile has the targets kvmlab calls, writes only under O= and compiles one C file;
# its "Kconfig" lists the options olddefconfig keeps. Two of them steer the build:
# SLOW_BUILD makes it wait, to be interrupted, in a grandchild of make as a compiler is in
# kbuild (its pid goes to OUT/make-started);
# BUSY_GIT makes it take the tree's git index lock, as a git run elsewhere would, and fail.
STAND_IN = {
    "Makefile": """\
x86_64_defconfig:
\tcp arch/x86/configs/x86_64_defconfig $(O)/.config

olddefconfig:
\tsed -n 's/^config \\(.*\\)/CONFIG_\\1=/p' Kconfig > $(O)/.known
\tgrep -F -f $(O)/.known $(O)/.config > $(O)/.config.new || true
\tmv $(O)/.config.new $(O)/.config

bzImage:
\tmkdir -p $(O)/include/config $(O)/arch/x86/boot
\tif grep -q '^CONFIG_SLOW_BUILD=y' $(O)/.config; then \\
\t  sh -c 'echo $$$$ > $(O)/make-started; exec sleep 120'; fi; true
\tif grep -q '^CONFIG_BUSY_GIT=y' $(O)/.config; then touch .git/index.lock; exit 1; fi
\t$(CC) -c init/main.c -o $(O)/main.o
\tcp $(O)/main.o $(O)/arch/x86/boot/bzImage
\techo 6.1.0-stand-in > $(O)/include/config/kernel.release
""",
    "Kconfig": "config KVM\nconfig SLOW_BUILD\nconfig BUSY_GIT\n",
    "arch/x86/configs/x86_64_defconfig": "CONFIG_KVM=m\n",
    "kernel/configs/kvm_guest.config": "CONFIG_KVM=y\n",
    "scripts/kconfig/merge_config.sh": """\
#!/bin/sh
# merge_config.sh -m -O OUT CONFIG FRAGMENT...: one line per option, the last setting wins
out=$3
shift 3
cat "$@" | awk -F= '/^CONFIG_/ { if (!($1 in v)) order[++n] = $1; v[$1] = $0 }
                    END { for (i = 1; i <= n; i++) print v[order[i]] }' > "$out/.config.merged"
mv "$out/.config.merged" "$out/.config"
""",
    "init/main.c": "int lab_answer(void)\n{\n\treturn 42;\n}\n",
}
# `kvmlab kernel build` in a child process, for Ctrl-C: the CLI's own handling, in short.
INTERRUPTIBLE_BUILD = """
import signal
import sys
from pathlib import Path
from kvmlab.kernels import build

def terminate(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, terminate)
tree, out, patch, fragment = map(Path, sys.argv[1:])
try:
    build.build(build.BuildOptions(tree=tree, out=out, patches=[patch], fragments=[fragment], jobs=1))
except KeyboardInterrupt:
    print("kvmlab: interrupted", file=sys.stderr)
    sys.exit(130)
"""


def _write_stand_in(tree: Path) -> Path:
    for name, text in STAND_IN.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    (tree / "scripts/kconfig/merge_config.sh").chmod(0o755)
    return tree


def _git_stand_in(tree: Path) -> Path:
    _write_stand_in(tree)
    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "-m", "stand-in")
    return tree


def _git(tree: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    return subprocess.run(["git", *identity, *args], cwd=tree, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, Path]:
    """Patches for the stand-in tree, written by git: a mail patch (changes main.c, adds a
    file in a new directory), the same as a bare diff and, on top of it, bare diffs that
    apply, break the compile or do not apply."""
    work = tmp_path_factory.mktemp("series")
    author = _git_stand_in(work / "author")
    main = author / "init/main.c"
    main.write_text(main.read_text().replace("42", "43"))
    (author / "virt/kvm").mkdir(parents=True)
    (author / "virt/kvm/hello.c").write_text("int hello;\n")
    _git(author, "add", "-A")
    patches = {"answer.diff": _git(author, "diff", "--cached")}
    _git(author, "commit", "-q", "-m", "answer 43")
    patches["0001-answer.patch"] = _git(author, "format-patch", "--stdout", "-1")
    for name, old, new in (("0002-comment.diff", "{\n", "{\n\t/* the answer */\n"),
                           ("0002-break.diff", "return 43;", "return 43 +;")):
        main.write_text(main.read_text().replace(old, new))
        patches[name] = _git(author, "diff")
        _git(author, "checkout", "-q", "--", ".")
    patches["0002-stale.diff"] = patches["0002-comment.diff"].replace(" {\n", " {{\n")
    paths = {}
    for name, text in patches.items():
        paths[name] = work / name
        paths[name].write_text(text)
    return paths


@pytest.fixture(params=["unpacked", "git"])
def stand_in(request, tmp_path) -> Path:
    """The stand-in tree as an unpacked source, or as a git checkout with a change of its
    own not yet committed (which must survive)."""
    if request.param == "unpacked":
        return _write_stand_in(tmp_path / "tree")
    tree = _git_stand_in(tmp_path / "tree")
    (tree / "Kconfig").write_text(STAND_IN["Kconfig"] + "config MINE\n")
    return tree


def _fragment(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.config"
    path.write_text(text)
    return path


def _state(tree: Path) -> dict[str, object]:
    """What "the tree as it was" means: every path with its bytes and mode, and on a git
    tree its HEAD, index and status."""
    state: dict[str, object] = {}
    for path in sorted(tree.rglob("*")):
        name = str(path.relative_to(tree))
        if name == ".git" or name.startswith(".git/"):
            continue
        state[name] = (path.stat().st_mode, path.read_bytes() if path.is_file() else None)
    if (tree / ".git").exists():
        for what in (["rev-parse", "HEAD"], ["ls-files", "-s"], ["status", "--porcelain"]):
            state[" ".join(what)] = _git(tree, *what)
    return state


def _build(tree: Path, patches: list[Path], **options) -> str:
    """Build as ``kvmlab kernel build`` does; returns what it printed on the way."""
    log = io.StringIO()
    kernel_build.build(kernel_build.BuildOptions(tree=tree, patches=patches, jobs=1, **options), log=log)
    return log.getvalue()


def _refused(tree: Path, patches: list[Path], **options) -> tuple[str, str]:
    """The one-line error of a build that must fail (``kvmlab: error: ...`` on the command
    line), and what it printed before."""
    log = io.StringIO()
    with pytest.raises(KvmlabError) as refusal:
        kernel_build.build(kernel_build.BuildOptions(tree=tree, patches=patches, jobs=1, **options), log=log)
    message = str(refusal.value)
    assert "\n" not in message, message
    return message, log.getvalue()


@pytest.mark.parametrize("bad", [{"fragments": [Path("/none.config")]}, {"base_config": Path("/none")}],
                         ids=["config", "base-config"])
def test_a_bad_config_leaves_the_tree_as_it_was_and_the_next_build_patches_it(stand_in, series, bad):
    before = _state(stand_in)
    patches = [series["0001-answer.patch"], series["0002-comment.diff"]]
    message, _ = _refused(stand_in, patches, **bad)
    assert "/none" in message and "does not exist" in message
    assert _state(stand_in) == before
    _build(stand_in, patches)
    assert "return 43;" in (stand_in / "init/main.c").read_text()
    assert (stand_in / "kvmlab-build/arch/x86/boot/bzImage").is_file()


def test_a_failing_make_leaves_the_tree_as_it_was(stand_in, series, tmp_path):
    before = _state(stand_in)
    out = tmp_path / "out"
    message, log = _refused(stand_in, [series["0001-answer.patch"], series["0002-break.diff"]], out=out)
    assert "the kernel build failed: init/main.c:3" in message and " error: " in message
    assert "put back as it was" in log
    assert _state(stand_in) == before
    _build(stand_in, [series["0001-answer.patch"], series["0002-comment.diff"]], out=out)


def test_a_patch_failing_halfway_through_the_series_undoes_the_ones_before(stand_in, series, tmp_path):
    before = _state(stand_in)
    message, log = _refused(stand_in, [series["0001-answer.patch"], series["0002-stale.diff"]],
                            out=tmp_path / "out")
    assert message.startswith("patch 0002-stale.diff does not apply: patch failed: init/main.c")
    assert "applied 0001-answer.patch" in log
    assert _state(stand_in) == before


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_a_bad_job_count_is_refused_before_any_patch(stand_in, series, jobs):
    before = _state(stand_in)
    done = kvmlab("kernel", "build", str(stand_in), "--patch", str(series["0001-answer.patch"]), "-j", jobs)
    assert_one_line_error(done, f"-j wants a positive number of jobs, got {jobs}")
    assert _state(stand_in) == before


def test_a_refused_build_leaves_no_build_directory_in_the_tree(stand_in, series):
    """The default OUT, TREE/kvmlab-build, appears only once every check has passed."""
    before = _state(stand_in)
    message, _ = _refused(stand_in, [series["0002-stale.diff"]])
    assert message.startswith("patch 0002-stale.diff does not apply")
    assert _state(stand_in) == before


def test_a_build_directory_that_is_a_file_is_refused_first(stand_in, series, tmp_path):
    before, taken = _state(stand_in), tmp_path / "taken"
    taken.write_text("mine\n")
    message, log = _refused(stand_in, [series["0001-answer.patch"]], out=taken)
    assert message == f"build directory {taken} exists and is not a directory"
    assert log == "" and _state(stand_in) == before and taken.read_text() == "mine\n"


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("interrupt", ["ctrl-c", "sigterm"])
def test_an_interrupted_make_leaves_the_tree_as_it_was(stand_in, series, tmp_path, interrupt):
    """Ctrl-C goes to the whole foreground process group, as from a terminal; SIGTERM (a
    timeout, a CI runner) to the build alone. Either way nothing of make outlives it."""
    before = _state(stand_in)
    out, slow = tmp_path / "out", _fragment(tmp_path, "CONFIG_SLOW_BUILD=y\n")
    argv = [sys.executable, "-c", INTERRUPTIBLE_BUILD, str(stand_in), str(out),
            str(series["0001-answer.patch"]), str(slow)]
    process = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True, process_group=0)
    try:
        deadline = time.monotonic() + 120
        while not (out / "make-started").exists():
            assert process.poll() is None and time.monotonic() < deadline, "make never started"
            time.sleep(0.1)
        if interrupt == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.terminate()
        stderr = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "put back as it was" in stderr
    assert _state(stand_in) == before
    assert not _running(int((out / "make-started").read_text()))


def test_ctrl_c_while_a_patch_is_applied_waits_for_it_then_puts_the_tree_back(series, tmp_path, monkeypatch):
    """Ctrl-C lands in the middle of ``git am`` (sent by its post-applypatch hook, after the
    commit): the patch is finished, not cut off, and then undone."""
    tree = _git_stand_in(tmp_path / "tree")
    hook = tree / ".git/hooks/post-applypatch"
    hook.write_text('#!/bin/sh\nkill -INT "$STAND_IN_INTERRUPT"\nsleep 0.5\n')
    hook.chmod(0o755)
    monkeypatch.setenv("STAND_IN_INTERRUPT", str(os.getpid()))
    before = _state(tree)
    with pytest.raises(KeyboardInterrupt):
        _build(tree, [series["0001-answer.patch"], series["0002-comment.diff"]], out=tmp_path / "out")
    assert _state(tree) == before
    assert not (tree / ".git/rebase-apply").exists()


def test_a_tree_that_cannot_be_put_back_says_how_to_reset_it(series, tmp_path):
    """Another git holds the index when the build fails: the one-line error gives the command."""
    tree = _git_stand_in(tmp_path / "tree")
    before = _state(tree)
    busy = _fragment(tmp_path, "CONFIG_BUSY_GIT=y\n")
    message, _ = _refused(tree, [series["0001-answer.patch"]], fragments=[busy], out=tmp_path / "out")
    assert message.startswith("the kernel build failed")
    assert "index.lock" in message and "reset it with: git -C" in message
    (tree / ".git/index.lock").unlink()
    subprocess.run(message.split("reset it with: ", 1)[1], shell=True, check=True, capture_output=True)
    assert _state(tree) == before


def test_a_git_tree_with_staged_changes_is_refused_untouched(series, tmp_path):
    """A bare diff's commit would take staged changes along, and putting the tree back drop them."""
    tree = _git_stand_in(tmp_path / "tree")
    (tree / "Kconfig").write_text(STAND_IN["Kconfig"] + "config MINE\n")
    _git(tree, "add", "Kconfig")
    before = _state(tree)
    message, _ = _refused(tree, [series["answer.diff"]], out=tmp_path / "out")
    assert "has staged changes" in message
    assert _state(tree) == before


def test_the_command_line_build_with_patches_and_a_bad_config(stand_in, series, tmp_path):
    """``kvmlab kernel build --patch … --config BAD`` as typed: one line, the tree untouched."""
    before = _state(stand_in)
    done = kvmlab("kernel", "build", str(stand_in), "--patch", str(series["0001-answer.patch"]),
                  "--config", str(tmp_path / "absent.config"))
    assert_one_line_error(done, "absent.config", "does not exist")
    assert _state(stand_in) == before
