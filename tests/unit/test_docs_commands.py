"""Every command README.md and docs/*.md show must work when pasted; checked without running it.

What counts as a command, in the fenced code blocks of README.md and docs/*.md (inline
code spans are prose fragments such as `kvmlab run --trace`, and are not checked):

- In a ```sh (or bash, shell) block every line is a command as pasted, split the way a
  POSIX shell would (shlex: quotes, ``#`` comments, ``\\`` continuations, and ``;``, ``&``,
  ``|`` between simple commands); a ``$ `` prompt is dropped.
- In an untagged (or text, console) block, which holds output, synopses or layouts, a
  line is a command when it starts with ``$ ``, ``kvmlab `` or ``make ``, except
  kvmlab's own messages (``kvmlab qualify: ...``: a colon ends the first word after
  ``kvmlab``). Indented lines after it continue it. Such a command may be a synopsis:
  ``[...]`` is dropped, so every optional part is checked together; ``a|b|c`` is checked
  once for each alternative; a trailing ``...`` is dropped.
- Blocks in other languages (python, toml) hold code, not commands.
- Placeholders are substituted in every command: a word in capitals (SPEC, DIR, N) or
  ``<...>`` becomes its sample value in PLACEHOLDERS. A placeholder missing from that
  table fails, so each new one is a deliberate choice.

What is checked, for each simple command (leading ``VAR=value`` words aside):

- ``kvmlab ...``: kvmlab.cli.main itself parses it (its ``--`` split included) with
  kvmlab.cli.parser(), stopped before the verb runs: verbs, options, choices, types.
  ``kvmlab run`` needs a command after ``--``. Every kernel spec (run's KERNEL, kernel
  fetch's SPEC, qualify's --base/--patched, inspect's --kernel) goes through
  kvmlab.kernels.fetch with its sources stubbed, so that its own dispatch and parsing run
  without downloading; a ``--trace`` probe set must load.
- The guest command after ``--`` (also inside ``sh -c '...'``): a ``python3 -m
  kselftest_py.X`` module must exist and its own argument parser accept the arguments.
  The guest runs the command without a shell, so a ``$VAR`` in it outside an ``sh -c``
  script arrives literally (the bug report's ``--json '$KVMLAB_RESULTS/smoke.json'``).
- A pasted command expands no variable on the host (``$X`` outside single quotes): it
  would depend on the reader's environment, and a guest's variable is empty there.
- ``make TARGET``: TARGET is a rule in the Makefile.
- Any word that is a path into one of the repository's own directories (bench/x.py,
  tests/data/x.patch) must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO

from kvmlab import apt, cli, kernels
from kvmlab.errors import KvmlabError
from kvmlab.kernels import debian, local, patches
from traces import probes
from traces.errors import TraceError

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAKEFILE = REPO / "Makefile"
SHELL_BLOCKS = {"sh", "bash", "shell"}
PLAIN_BLOCKS = {"", "text", "console"}
FENCE = re.compile(r"^\s*```\s*([\w-]*)")
COMMAND_START = re.compile(r"^(?:\$ |(?:kvmlab|make) (?!\S*: ))")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|<[^<>]+>")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = {";", "&", "&&", "|", "||"}
PYTHONS = {"python", "python3"}
VARIABLE = re.compile(r"\$\{?(\w+)")
SPEC_FIELDS = ("kernel", "spec", "base", "patched")

#: A sample value for each placeholder the documents use.
PLACEHOLDERS = {
    "SPEC": "debian:bookworm", "KERNEL": "debian:bookworm", "TREE": "~/linux",
    "PATCH": "fix.patch", "DIR": "out", "OUT": "out", "RUN": "20261125-141438-e27407",
    "N": "2", "K": "1", "SET": "memslot-lookup", "PLAN": "plan.json",
    "FILE": "kvmlab/qualify/references/scalable-memslots-v5.csv",
}


@dataclass(frozen=True)
class DocCommand:
    """One command as a document shows it; ``pasted``: from a shell block, so no synopsis."""

    doc: str
    line: int
    text: str
    pasted: bool

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


# -- finding the commands ------------------------------------------------------------------
def code_blocks(text: str) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """Each fenced block's language and its numbered lines."""
    language, lines = None, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence and language is None:
            language, lines = fence.group(1), []
        elif fence:
            yield language, lines
            language = None
        elif language is not None:
            lines.append((number, line))


def shell_block_commands(doc: str, lines: list[tuple[int, str]]) -> Iterator[DocCommand]:
    """Every line of a shell block, backslash continuations joined."""
    start, pending = 0, ""
    for number, line in lines:
        if not pending:
            start, line = number, line.removeprefix("$ ")
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        text, pending = (pending + line).strip(), ""
        if text and not text.startswith("#"):
            yield DocCommand(doc, start, text, pasted=True)


def plain_block_commands(doc: str, lines: list[tuple[int, str]]) -> Iterator[DocCommand]:
    """Lines of an output or synopsis block that are commands, indented continuations joined."""
    current: DocCommand | None = None
    for number, line in lines:
        if current and line[:1].isspace() and line.strip():
            current = DocCommand(doc, current.line, f"{current.text} {line.strip()}", pasted=False)
            continue
        if current:
            yield current
        current = None
        if COMMAND_START.match(line):
            current = DocCommand(doc, number, line.removeprefix("$ ").strip(), pasted=False)
    if current:
        yield current


def doc_commands(text: str, doc: str) -> list[DocCommand]:
    commands = []
    for language, lines in code_blocks(text):
        if language in SHELL_BLOCKS:
            commands += shell_block_commands(doc, lines)
        elif language in PLAIN_BLOCKS:
            commands += plain_block_commands(doc, lines)
    return commands


def all_doc_commands() -> list[DocCommand]:
    return [c for path in DOCS for c in doc_commands(path.read_text(), str(path.relative_to(REPO)))]


def results_example() -> DocCommand:
    """The README's example of bringing result files back (``--out`` and ``$KVMLAB_RESULTS``);
    tests/vm/test_docs_commands.py runs it in a real shell."""
    found = [c for c in all_doc_commands() if c.doc == "README.md" and c.pasted
             and "--out " in c.text and "$KVMLAB_RESULTS/" in c.text]
    assert len(found) == 1, f"README.md shows {len(found)} result examples: {found}"
    return found[0]


# -- splitting as a shell would --------------------------------------------------------------
def shell_words(text: str, pasted: bool) -> list[str]:
    """POSIX shell word splitting; a synopsis keeps ``|`` for its alternatives."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|" if pasted else "")
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(words: list[str]) -> Iterator[list[str]]:
    """The simple commands between ``;``, ``&&``, ``|`` and the like, assignments dropped."""
    current: list[str] = []
    for word in [*words, ";"]:
        if word not in OPERATORS:
            current.append(word)
            continue
        while current and ASSIGNMENT.match(current[0]):
            current.pop(0)
        if current:
            yield current
        current = []


def synopsis_variants(words: list[str]) -> list[list[str]]:
    """A synopsis as commands: optional parts all in, one variant per ``a|b|c`` alternative."""
    plain = [w.lstrip("[").rstrip("]").removesuffix("...") for w in words]
    choices = [w.split("|") for w in plain if w]
    count = max((len(c) for c in choices), default=1)
    return [[c[min(i, len(c) - 1)] for c in choices] for i in range(count)]


def substituted(words: list[str]) -> list[str]:
    """Placeholders replaced by sample values; an unknown one stays and shows up as a problem."""
    return [PLACEHOLDERS.get(w, w) for w in words]


def unknown_placeholders(words: list[str]) -> list[str]:
    return [f"placeholder {w} has no sample value in PLACEHOLDERS" for w in words
            if PLACEHOLDER.fullmatch(w) and w not in PLACEHOLDERS]


# -- the checks --------------------------------------------------------------------------------
def problems(command: DocCommand) -> list[str]:
    """Everything that would make ``command`` fail as pasted; empty when it is fine."""
    if command.pasted:
        found = [f"the host shell expands ${name}" for name in host_expansions(command.text)]
        variants = [shell_words(command.text, pasted=True)]
    else:
        found, variants = [], synopsis_variants(shell_words(command.text, pasted=False))
    for variant in variants:
        found += unknown_placeholders(variant)
        for simple in simple_commands(substituted(variant)):
            found += simple_command_problems(simple)
    return list(dict.fromkeys(found))


def host_expansions(text: str) -> list[str]:
    """The variables a POSIX shell expands in ``text``: ``$NAME`` outside single quotes,
    not escaped, before a comment."""
    found, quote, escaped = [], "", False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif char in "'\"" and quote in ("", char):
            quote = "" if quote else char
        elif char == "#" and not quote and (index == 0 or text[index - 1].isspace()):
            break
        elif char == "$" and quote != "'" and (name := VARIABLE.match(text, index)):
            found.append(name.group(1))
    return found


def simple_command_problems(words: list[str]) -> list[str]:
    program, args = words[0], words[1:]
    found = [p for word in args for p in repo_path_problems(word)]
    if program == "kvmlab":
        found += kvmlab_problems(args)
    elif program == "make":
        found += make_problems(args)
    return found


def repo_path_problems(word: str) -> list[str]:
    """A path into one of the repository's own directories names a file that is there."""
    top, slash, _rest = word.partition("/")
    if top and slash and not top.startswith(".") and (REPO / top).is_dir() and not (REPO / word).exists():
        return [f"{word} does not exist in the repository"]
    return []


def make_problems(args: list[str]) -> list[str]:
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", MAKEFILE.read_text(), re.M))
    named = [a for a in args if not a.startswith("-") and not ASSIGNMENT.match(a)]
    return [f"make: no target {name!r} in the Makefile" for name in named if name not in targets]


def kvmlab_problems(args: list[str]) -> list[str]:
    parsed = parsed_by_main(args)
    if isinstance(parsed, str):
        return [f"kvmlab's parser refuses it: {parsed}"]
    found = []
    if parsed.verb == "run" and not parsed.command:
        found.append("kvmlab run: no command given after --")
    for field in SPEC_FIELDS:
        spec = getattr(parsed, field, None)
        if isinstance(spec, str):
            found += spec_problems(spec)
    if getattr(parsed, "trace", None):
        found += refusals(lambda: probes.load(parsed.trace))
    return found + guest_problems(getattr(parsed, "command", []))


def parsed_by_main(args: list[str]) -> argparse.Namespace | str:
    """``args`` as kvmlab.cli.main parses them (its ``--`` split included), stopped before
    the verb runs; or argparse's error line."""
    seen: list[argparse.Namespace] = []
    real_parser = cli.parser

    def disarmed_parser() -> argparse.ArgumentParser:
        top = real_parser()
        parse = top.parse_args

        def parse_and_disarm(argv):
            namespace = parse(argv)
            check = getattr(namespace, "usage", None)  # a verb's checks that read no file
            namespace.func = lambda args: check(args) and 0 if check else 0
            seen.append(namespace)
            return namespace

        top.parse_args = parse_and_disarm
        return top

    with mock.patch.object(cli, "parser", disarmed_parser), mock.patch.object(cli.signal, "signal"):
        error = argparse_error(lambda: sys.exit(cli.main(args)))
    return error if error is not None else seen[0]


def argparse_error(call: Callable[[], object]) -> str | None:
    """argparse's last stderr line if ``call`` exits with an error, else None."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            call()
    except SystemExit as done:
        if done.code:
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def refusals(call: Callable[[], object]) -> list[str]:
    """What kvmlab or the traces library said when it refused, if it did."""
    try:
        call()
    except (KvmlabError, TraceError) as err:
        return [str(err)]
    return []


class _Resolved(Exception):
    """A kernel spec reached the source that would fetch it: its syntax got that far."""

    def __init__(self, scheme: str, rest: str):
        super().__init__(scheme, rest)
        self.scheme, self.rest = scheme, rest


def spec_problems(spec: str) -> list[str]:
    """Run kvmlab.kernels.fetch's dispatch and kvm-modules' parsing for real, with the
    debian and local sources stubbed so nothing is downloaded or read."""
    named_patches: list[Path] = []

    def reached(scheme: str) -> Callable[..., object]:
        def stop(spec_text: str, rest: str, debuginfo: bool) -> object:
            raise _Resolved(scheme, rest)
        return stop

    def no_patch_files(path: Path) -> list[Path]:
        named_patches.append(path)
        return []

    try:
        with mock.patch.object(debian, "fetch", reached("debian")), \
                mock.patch.object(local, "load", reached("local")), \
                mock.patch.object(patches, "series", no_patch_files):
            kernels.fetch(spec)
    except KvmlabError as err:
        return [f"kernel spec {spec}: {err}"]
    except _Resolved as resolved:
        found = SOURCE_SYNTAX[resolved.scheme](spec, resolved.rest)
        return found + [p for path in named_patches for p in repo_path_problems(str(path))]
    raise AssertionError(f"kernel spec {spec} reached a source this test does not stub")


def debian_syntax(spec: str, what: str) -> list[str]:
    """As debian.fetch tells them apart: an image package, or a suite kvmlab serves."""
    if what.startswith("linux-image-") or what in apt.KNOWN_SUITES:
        return []
    return [f"kernel spec {spec}: {what!r} is neither a linux-image- package nor one of the suites "
            f"kvmlab knows ({', '.join(apt.KNOWN_SUITES)})"]


def local_syntax(spec: str, rest: str) -> list[str]:
    """local:TREE's options, through local's own option parser (private, but the one place
    that syntax lives)."""
    _tree, *options = rest.split(",")
    return [p for option in options for p in refusals(lambda o=option: local._option(spec, o))]


SOURCE_SYNTAX = {"debian": debian_syntax, "local": local_syntax}


def guest_problems(argv: list[str]) -> list[str]:
    """What goes wrong in the guest, which runs ``argv`` without a shell (or its ``sh -c``
    script with one): a literal ``$VAR``, a kselftest_py module missing or refusing."""
    if argv[:2] == ["sh", "-c"] and len(argv) > 2:
        return [p for words in simple_commands(shell_words(argv[2], pasted=True))
                for p in kselftest_problems(words)]
    literal = [f"the guest gets {word!r} literally (no shell expands it there; use sh -c '...')"
               for word in argv if VARIABLE.search(word)]
    return literal + kselftest_problems(argv)


def kselftest_problems(argv: list[str]) -> list[str]:
    """A ``python3 -m kselftest_py.X ARGS`` whose module is missing or whose parser refuses ARGS."""
    if len(argv) < 3 or argv[0] not in PYTHONS or argv[1] != "-m" or not argv[2].startswith("kselftest_py."):
        return []
    name, args = argv[2], argv[3:]
    if not (REPO / (name.replace(".", "/") + ".py")).exists():
        return [f"no guest module {name} in the repository"]
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, parse_argv=None, namespace=None):
        real_parse(self, parse_argv, namespace)
        raise SystemExit(0)  # the test itself would start here

    module = importlib.import_module(name)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        error = argparse_error(lambda: module.main(args))
    return [f"{name} refuses its arguments: {error}"] if error else []


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", all_doc_commands(), ids=str)
def test_doc_command_would_work_as_pasted(command):
    assert problems(command) == [], command.text


BROKEN = [
    ("kvmlab run debian:bookworm --no-such-option -- true", "unrecognized arguments: --no-such-option"),
    ("kvmlab frobnicate", "invalid choice: 'frobnicate'"),
    ("kvmlab run debian:bookworm --clock fast -- true", "invalid choice: 'fast'"),
    ("kvmlab run debian:bookworm --cpus two -- true", "invalid int value: 'two'"),
    ("kvmlab qualify --base debian:bullseye --patched debian:bookworm", "qualify needs -o DIR"),
    ("kvmlab qualify merge shard1 shard2 --threshold 0.5 --base x -o out", "drop --base"),
    ("kvmlab qualify --base a --patched b --shards 3 -o out", "--shards N goes with --plan"),
    ("kvmlab run debian:bookworm", "no command given"),
    ("kvmlab run fedora:40 -- true", "unknown kernel spec 'fedora:40'"),
    ("kvmlab kernel fetch debian:buster", "'buster' is neither"),
    ("kvmlab run local:~/linux,modulez=/tmp/mods -- true", "unknown option 'modulez=/tmp/mods'"),
    ("kvmlab run kvm-modules:local:~/linux -- true", "of a debian: kernel"),
    ("kvmlab qualify --base kvm-modules:debian:bullseye --patched kvm-modules:debian:experimental -o out",
     "'experimental' is neither"),
    ("kvmlab run kvm-modules:debian:bookworm+tests/data/no-such.patch -- true",
     "tests/data/no-such.patch does not exist"),
    ("kvmlab run debian:bookworm --trace no-such-set -- true", "no probe set 'no-such-set'"),
    ("kvmlab run debian:bookworm -- python3 -m kselftest_py.no_such_test", "no guest module"),
    ("kvmlab run debian:bookworm -- sh -c 'python3 -m kselftest_py.smoke --jsn $KVMLAB_RESULTS/x'",
     "unrecognized arguments: --jsn"),
    ("kvmlab run debian:bookworm -- python3 -m kselftest_py.memslot_perf -s", "expected one argument"),
    ("make no-such-target", "no target 'no-such-target'"),
    ("make demo && make no-such-second", "no target 'no-such-second'"),
    ("python bench/no_such_bench.py", "bench/no_such_bench.py does not exist"),
    ("kvmlab stop WHICH", "placeholder WHICH"),
    ("kvmlab run debian:bookworm --out results/ -- python3 -m kselftest_py.smoke "
     "--json '$KVMLAB_RESULTS/smoke.json'", "the guest gets '$KVMLAB_RESULTS/smoke.json' literally"),
    ("kvmlab run debian:bookworm --out results/ -- sh -c "
     "\"python3 -m kselftest_py.smoke --json $KVMLAB_RESULTS/smoke.json\"",
     "host shell expands $KVMLAB_RESULTS"),
]


@pytest.mark.parametrize("line,why", BROKEN, ids=[why for _line, why in BROKEN])
def test_broken_pasted_command_is_caught(line, why):
    found = problems(DocCommand("synthetic.md", 1, line, pasted=True))
    assert any(why in problem for problem in found), found


@pytest.mark.parametrize("line,why", [
    ("kvmlab qualify --base SPEC --patched SPEC [--clock auto|icount|hourly] -o DIR", "'hourly'"),
    ("kvmlab qualify --base SPEC [--accel ...] -o DIR", "--accel: expected one argument"),
    ("kvmlab kernel build TREE [--patch P] [--no-such-flag]", "placeholder P"),
])
def test_broken_synopsis_is_caught(line, why):
    found = problems(DocCommand("synthetic.md", 1, line, pasted=False))
    assert any(why in problem for problem in found), found


SAMPLE_DOC = """\
```sh
# a comment line
make demo    # trailing comment
kvmlab run debian:bookworm \\
  -- uname -r

$ kvmlab stop
```

```
kvmlab: ok, exit 0
kvmlab qualify: debian:bookworm against debian:bullseye
kvmlab/          the orchestrator
kvmlab qualify --base SPEC --patched SPEC
               [--runs 3] -o DIR
$ make lint
```

```python
kvmlab = "kvmlab.cli:main"
```
"""


def test_the_command_rule_on_a_sample_document():
    assert doc_commands(SAMPLE_DOC, "sample.md") == [
        DocCommand("sample.md", 3, "make demo    # trailing comment", pasted=True),
        DocCommand("sample.md", 4, "kvmlab run debian:bookworm   -- uname -r", pasted=True),
        DocCommand("sample.md", 7, "kvmlab stop", pasted=True),
        DocCommand("sample.md", 14, "kvmlab qualify --base SPEC --patched SPEC [--runs 3] -o DIR",
                   pasted=False),
        DocCommand("sample.md", 16, "make lint", pasted=False),
    ]


def test_readme_shows_one_example_that_brings_results_back():
    assert "sh -c" in results_example().text
