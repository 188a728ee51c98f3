"""The qualification's raw results: one JSON line per finished run, appended as it ends.

``DIR/qualify.json`` holds what was asked (kernels, matrix, options) and is written
once. ``DIR/runs.jsonl`` only ever grows: each record is written whole and fsynced
before the next run starts, so killing qualify at any moment loses at most the run in
progress, and ``--resume`` reads back which runs are done. A line cut short by a kill
during the write is the one exception: it was never a record, and reopening the store
drops it. A last record that is whole but lacks only its newline is kept.

Record kinds: ``run`` (a measured run), ``skip`` (the kernel or the test cannot take
this cell: n/a, with the reason; covers every run of that kernel in the cell),
``fail`` (the test failed), ``crash`` (the guest hung, crashed or vanished during the
run: outcome and console excerpt; the run is tried again in a fresh boot), ``splat`` (a
kernel report on the console of a guest that went on), ``invariant`` (a memslot
invariant violation or checks that could not run), ``checks`` (a guest's invariant-check
summary when it shut down), ``conditions`` (what a guest's KVM ran with, once per boot:
``qualify.conditions``).

Reading validates every record, so a damaged or foreign line is named instead of
crashing the analysis, and refuses a second ``run`` or ``fail`` for one run: only two
writers could make one, and ``DIR/.lock`` lets one qualify process at a time write.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import IO, NamedTuple

from kvmlab.errors import KvmlabError

CONFIG = "qualify.json"
RUNS = "runs.jsonl"
LOCK = ".lock"
SIDES = ("base", "patched")

#: Record kinds (above); ``checks`` is a guest's invariant-check summary when it shut down.
RUN, SKIP, FAIL, CRASH = "run", "skip", "fail", "crash"
SPLAT, INVARIANT, CHECKS, CONDITIONS = "splat", "invariant", "checks", "conditions"


class Cell(NamedTuple):
    """One kernel's share of one cell of the matrix."""

    side: str
    test: str | None
    slots: int | None


class RunKey(NamedTuple):
    """Which run a record is about: a cell and a run number (None: about a guest, not a run)."""

    side: str
    test: str | None
    slots: int | None
    run: int | None

    @property
    def cell(self) -> Cell:
        return Cell(self.side, self.test, self.slots)


def record_key(record: dict) -> RunKey:
    return RunKey(record["side"], record["test"], record["slots"], record.get("run"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_time(value) -> bool:
    """A measured time: positive, or null for a run that finished no iteration."""
    return value is None or (_is_number(value) and value > 0)


#: What a field may hold, by the words an error message uses for it.
_TYPES = {
    "a number": _is_number,
    "a time in ns or null": _is_time,
    "a positive number": lambda value: _is_number(value) and value > 0,
    "a fraction in [0, 1)": lambda value: _is_number(value) and 0 <= value < 1,
    "an integer": _is_int,
    "an integer of at least 0": lambda value: _is_int(value) and value >= 0,
    "an integer of at least 1": lambda value: _is_int(value) and value >= 1,
    "an integer of at least 2": lambda value: _is_int(value) and value >= 2,
    "a string or null": lambda value: value is None or isinstance(value, str),
    "an object or null": lambda value: value is None or isinstance(value, dict),
    "true or false": lambda value: isinstance(value, bool),
    "icount or wall": lambda value: value in ("icount", "wall"),
    "a string": lambda value: isinstance(value, str),
    "an integer or null": lambda value: value is None or _is_int(value),
    "a list of test names": lambda value: isinstance(value, list) and bool(value)
    and all(isinstance(v, str) for v in value),
    "an object of strings": lambda value: isinstance(value, dict)
    and all(isinstance(v, str) for v in value.values()),
    "published figures": lambda value: value is None or (
        isinstance(value, dict) and isinstance(value.get("rows"), list)
        and all(isinstance(row, dict) and isinstance(row.get("test"), str) and _is_int(row.get("slots"))
                and _is_number(row.get("before")) and _is_number(row.get("after")) and row["before"] > 0
                and isinstance(row.get("source"), str) for row in value["rows"])),
    "a list of slot counts": lambda value: isinstance(value, list) and bool(value)
    and all(_is_int(v) and v >= 2 for v in value),
}
_KEY_FIELDS = {"test": "a string or null", "slots": "an integer or null", "run": "an integer or null"}
#: Per kind, the fields beyond side/test/slots/run that readers of the store rely on.
_KIND_FIELDS = {
    RUN: {"test": "a string", "slots": "an integer", "run": "an integer of at least 0",
          "iteration_ns": "a time in ns or null", "iterations": "an integer of at least 0",
          "slot_setup_ns": "a time in ns or null", "release": "a string"},
    SKIP: {"test": "a string", "slots": "an integer", "reason": "a string"},
    FAIL: {"test": "a string", "slots": "an integer", "run": "an integer of at least 0",
           "reason": "a string"},
    CRASH: {"outcome": "a string", "message": "a string or null"},
    SPLAT: {"summary": "a string"},
    INVARIANT: {"summary": "a string"},
    CHECKS: {"checks": "an integer of at least 0", "max_slots": "an integer of at least 0",
             "violations": "an integer of at least 0"},
    CONDITIONS: {"conditions": "an object of strings", "boot": "a string"},
}
_CONFIG_FIELDS = {"tests": "a list of test names", "slots": "a list of slot counts",
                  "runs": "an integer of at least 2", "seconds": "a positive number",
                  "threshold": "a fraction in [0, 1)"}
#: Fields an older kvmlab did not write; checked when there.
_OPTIONAL_CONFIG_FIELDS = {"cpus": "an integer of at least 1", "clock": "icount or wall",
                           "emulator": "an object or null", "check_invariants": "true or false",
                           "append": "a string", "trace": "an object or null", "accel": "a string or null",
                           "reference": "published figures", "setup_budget": "a positive number"}
#: The store locks this process holds, open for as long as it lives.
_HELD: dict[Path, IO] = {}


def record_problem(record) -> str | None:
    """What is wrong with one store record, or None if it is one kvmlab wrote."""
    if not isinstance(record, dict):
        return f"a record is a JSON object, found {type(record).__name__}"
    kind = record.get("kind")
    if kind not in _KIND_FIELDS:
        if "kind" not in record:
            return "a record without 'kind'"
        return f"unknown record kind {kind!r} (known: {', '.join(_KIND_FIELDS)})"
    if record.get("side") not in SIDES:
        return f"{kind} record: 'side' is {record.get('side')!r}, not base or patched"
    for name, wanted in {**_KEY_FIELDS, **_KIND_FIELDS[kind]}.items():
        if name not in record:
            return f"{kind} record without {name!r}"
        if not _TYPES[wanted](record[name]):
            return f"{kind} record: {name!r} wants {wanted}, found {record[name]!r}"
    return None


def config_problem(config) -> str | None:
    """What is wrong with a qualify.json, or None when the fields resume and analysis read are there."""
    if not isinstance(config, dict):
        return f"a JSON object is expected, found {type(config).__name__}"
    for side in SIDES:
        kernel = config.get(side)
        if not isinstance(kernel, dict) or not all(isinstance(kernel.get(k), str) for k in ("spec", "exact")):
            return f"{side!r} wants the kernel's spec and exact spec, found {kernel!r}"
    for name, wanted in _CONFIG_FIELDS.items():
        if name not in config:
            return f"no {name!r}"
        if not _TYPES[wanted](config[name]):
            return f"{name!r} wants {wanted}, found {config[name]!r}"
    for name, wanted in _OPTIONAL_CONFIG_FIELDS.items():
        if name in config and not _TYPES[wanted](config[name]):
            return f"{name!r} wants {wanted}, found {config[name]!r}"
    return None


class Store:
    def __init__(self, directory: Path):
        self.directory = directory
        self.config_path = directory / CONFIG
        self.runs_path = directory / RUNS

    @classmethod
    def refuse_existing(cls, directory: Path) -> None:
        """A directory that already holds a qualification is never started over."""
        if cls(directory).config_path.exists():
            raise KvmlabError(
                f"{directory} already holds a qualification: add --resume to finish it, or give another -o"
            )

    @classmethod
    def create(cls, directory: Path, config: dict) -> Store:
        cls.refuse_existing(directory)
        store = cls(directory)
        directory.mkdir(parents=True, exist_ok=True)
        store.claim()
        cls.refuse_existing(directory)  # another process may have made it meanwhile
        store.config_path.write_text(json.dumps(config, indent=2) + "\n")
        store.runs_path.touch()
        return store

    @classmethod
    def read(cls, directory: Path) -> Store:
        """The store in ``directory``, as it is: for checks that must change nothing."""
        store = cls(directory)
        if not store.config_path.exists():
            raise KvmlabError(f"{directory} holds no qualification to resume ({CONFIG} missing)")
        return store

    @classmethod
    def open(cls, directory: Path) -> Store:
        """The store in ``directory``, ready to append to (a torn last line dropped)."""
        store = cls.read(directory)
        store.claim()
        store._mend_tail()
        return store

    def claim(self) -> None:
        """Be the directory's one writer while this process lives: two processes appending
        to one store would measure the same runs twice. The lock goes with the process."""
        path = Path(os.path.abspath(self.directory / LOCK))
        if path in _HELD:  # this process writes here already
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise KvmlabError(f"{path}: cannot lock it: {_reason(err)}") from None
        handle = os.fdopen(fd, "r+", errors="replace")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip()[:20]
            handle.close()
            raise KvmlabError(
                f"{self.directory} is being written by another kvmlab qualify"
                f"{f' (pid {holder})' if holder else ''}: wait for it to end, or give another -o"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD[path] = handle

    def release(self) -> None:
        """Stop being the directory's writer (the end of the process does the same)."""
        handle = _HELD.pop(Path(os.path.abspath(self.directory / LOCK)), None)
        if handle is not None:
            handle.close()

    @property
    def config(self) -> dict:
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise KvmlabError(f"{self.config_path}: cannot read it: {_reason(err)}") from None
        except ValueError as err:
            raise KvmlabError(f"{self.config_path} is damaged: {err}") from None
        problem = config_problem(config)
        if problem:
            raise KvmlabError(f"{self.config_path} is damaged: {problem}")
        return config

    def records(self) -> list[dict]:
        """Every record, checked: a damaged, foreign or doubled one is named by its line."""
        if not self.runs_path.exists():
            return []
        try:
            text = self.runs_path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise KvmlabError(f"{self.runs_path}: cannot read it: {_reason(err)}") from None
        lines = text.splitlines()
        if lines and not text.endswith("\n") and not _whole(lines[-1]):
            lines.pop()  # cut short by a kill mid-write: never a record (open() drops it)
        records, final_at = [], {}
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, or a number too long for Python to read
                raise KvmlabError(f"{self.runs_path}:{number}: not a JSON record") from None
            problem = record_problem(record)
            if problem is None and record["kind"] in (RUN, FAIL, SKIP):
                key = record_key(record)
                key = key.cell if record["kind"] == SKIP else key
                if key in final_at:
                    problem = (f"a second result for {_describe(key)} (the first is line {final_at[key]}): "
                               "were two processes writing this store?")
                final_at[key] = number
            if problem:
                raise KvmlabError(f"{self.runs_path}:{number}: {problem}")
            records.append(record)
        return records

    def append(self, record: dict) -> None:
        with open(self.runs_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _mend_tail(self) -> None:
        """A last line without its newline: a whole record gets its newline, a torn one goes."""
        if not self.runs_path.exists():
            return
        data = self.runs_path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        whole = _whole(data[start:])
        with open(self.runs_path, "r+b") as handle:
            if whole:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())


def _describe(key: RunKey | Cell) -> str:
    where = f"{key.side} {key.test} @{key.slots}"
    return f"{where} run {key.run}" if isinstance(key, RunKey) else f"{where} (n/a)"


def _whole(line: str | bytes) -> bool:
    """Whether a last line that lacks its newline is a whole record all the same."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)
