"""A built wheel is the whole of kvmlab: installed (not editable) in a fresh venv, away
from the checkout, it boots a kernel and runs a command in the guest."""

import subprocess
import sys

from conftest import REPO


def run(*argv, cwd, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, argv)), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_the_wheel_runs_a_guest_from_a_fresh_venv(tmp_path, no_leaked_qemu):
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", REPO,
                cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("kvmlab-*.whl"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    installed = run(venv / "bin/pip", "install", "-q", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]

    where = run(venv / "bin/python", "-c", "import kvmlab, kvmlab_guest; print(kvmlab.__file__, "
                "kvmlab_guest.__file__)", cwd=tmp_path)
    assert str(venv) in where.stdout and str(REPO) not in where.stdout, where.stdout

    done = run(venv / "bin/kvmlab", "run", "debian:bookworm", "--", "true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kvmlab: ok, exit 0" in done.stderr
