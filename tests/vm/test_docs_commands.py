"""The README's example that brings result files back, pasted into a real shell as it stands.

tests/unit/test_docs_commands.py checks every documented command without booting; this
boots one, since only a guest can show that ``$KVMLAB_RESULTS`` is expanded where the
file is written and that the file reaches ``--out`` on the host.
"""

import json
import os
import re
import subprocess
import warnings

import pytest
from conftest import REPO, hung
from unit.test_docs_commands import parsed_by_main, results_example, shell_words

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaked_qemu")]

VENV_BIN = REPO / ".venv" / "bin"
RESULT_FILE = re.compile(r"\$\{?KVMLAB_RESULTS\}?/([\w./-]+)")


def pasted(line: str, cwd, attempts: int = 3) -> subprocess.CompletedProcess:
    """``line`` run by sh as a reader pastes it, the venv's kvmlab first on PATH; run again
    while nested TCG hangs the guest (docs/known-problems.md), as conftest's retries do."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for attempt in range(1, attempts + 1):
        done = subprocess.run(["sh", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        if not hung(done) or attempt == attempts:
            return done
        warnings.warn(f"nested TCG hung the guest (attempt {attempt}), retrying: {line}", stacklevel=2)
    raise AssertionError("unreachable")


def test_readme_results_example_as_pasted(tmp_path):
    assert (VENV_BIN / "kvmlab").exists(), f"no kvmlab in {VENV_BIN}: run make setup"
    example = results_example()
    out = parsed_by_main(shell_words(example.text, pasted=True)[1:]).out
    name = RESULT_FILE.search(example.text).group(1)

    done = pasted(example.text, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    result = tmp_path / out / name
    assert result.is_file(), f"{result} did not come back; stderr:\n{done.stderr}"
    assert json.loads(result.read_text()), f"{result} is empty"
