"""The qualification's raw results: one JSON line per finished run, appended as it ends.

``DIR/qualify.json`` holds what was asked (kernels, matrix, options) and is written
once. ``DIR/runs.jsonl`` only ever grows: each record is written whole and fsynced
before the next run starts, so killing qualify at any moment loses at most the run in
progress, and ``--resume`` reads back which runs are done. A line cut short by a kill
during the write is the one exception: it was never a record, and reopening the store
drops it. A last record that is whole but lacks only its newline is kept.

Records name their cell by test and point, the point under the name of the workload's
axis (``slots``: ``kselftest_py.workload``), and a run record holds each of the
workload's metrics under its key. Their kinds and what each holds are ``records``.

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

from kselftest_py.workload import Workload
from kvmlab.errors import KvmlabError
from kvmlab.qualify import workloads
from kvmlab.qualify.config import SIDES, Config
from kvmlab.qualify.records import (
    FAIL,
    KINDS,
    POINT,
    RUN,
    SKIP,
)

CONFIG = "qualify.json"
RUNS = "runs.jsonl"
LOCK = ".lock"



class Share(NamedTuple):
    """One kernel's share of one cell of the matrix: what an n/a record covers."""

    side: str
    test: str | None
    point: int | None


class RunKey(NamedTuple):
    """Which run a record is about: a cell and a run number (None: about a guest, not a run)."""

    side: str
    test: str | None
    point: int | None
    run: int | None

    @property
    def share(self) -> Share:
        return Share(self.side, self.test, self.point)


def record_key(record: dict, axis: str = "slots") -> RunKey:
    """The run a record is about; ``axis``: the name its workload's points go by."""
    return RunKey(record["side"], record["test"], record[axis], record.get("run"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_time(value) -> bool:
    """A measured time: positive, or null for a run that finished no iteration."""
    return value is None or (_is_number(value) and value > 0)


#: What a field may hold, by the words an error message uses for it.
_TYPES = {
    "a time in ns or null": _is_time,
    "an integer": _is_int,
    "an integer of at least 0": lambda value: _is_int(value) and value >= 0,
    "a string or null": lambda value: value is None or isinstance(value, str),
    "a string": lambda value: isinstance(value, str),
    "an integer or null": lambda value: value is None or _is_int(value),
    "an object of strings": lambda value: isinstance(value, dict)
    and all(isinstance(v, str) for v in value.values()),
}
#: Per kind, the fields beyond side/test/point/run that readers of the store rely on.
_KIND_FIELDS = {kind: record.REQUIRED for kind, record in KINDS.items()}
#: The store locks this process holds, open for as long as it lives.
_HELD: dict[Path, IO] = {}


def record_problem(record, workload: Workload | None = None) -> str | None:
    """What is wrong with one store record of a qualification of ``workload`` (default:
    memslot-perf), or None if it is one kvmlab wrote."""
    workload = workload or workloads.get(workloads.DEFAULT)
    if not isinstance(record, dict):
        return f"a record is a JSON object, found {type(record).__name__}"
    kind = record.get("kind")
    if kind not in _KIND_FIELDS:
        if "kind" not in record:
            return "a record without 'kind'"
        return f"unknown record kind {kind!r} (known: {', '.join(_KIND_FIELDS)})"
    if record.get("side") not in SIDES:
        return f"{kind} record: 'side' is {record.get('side')!r}, not base or patched"
    axis = workload.axis.name
    fields = {"test": "a string or null", axis: "an integer or null", "run": "an integer or null"}
    fields |= {axis if name == POINT else name: wanted for name, wanted in _KIND_FIELDS[kind].items()}
    if kind == RUN:
        fields |= {metric.key: "a time in ns or null" for metric in workload.metrics}
    for name, wanted in fields.items():
        if name not in record:
            return f"{kind} record without {name!r}"
        if not _TYPES[wanted](record[name]):
            return f"{kind} record: {name!r} wants {wanted}, found {record[name]!r}"
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
    def create(cls, directory: Path, config: Config) -> Store:
        cls.refuse_existing(directory)
        store = cls(directory)
        directory.mkdir(parents=True, exist_ok=True)
        store.claim()
        cls.refuse_existing(directory)  # another process may have made it meanwhile
        store.config_path.write_text(json.dumps(config.to_json(), indent=2) + "\n")
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
    def config(self) -> Config:
        try:
            data = json.loads(self.config_path.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise KvmlabError(f"{self.config_path}: cannot read it: {_reason(err)}") from None
        except ValueError as err:
            raise KvmlabError(f"{self.config_path} is damaged: {err}") from None
        try:
            return Config.from_json(data)
        except KvmlabError as err:
            raise KvmlabError(f"{self.config_path} is damaged: {err}") from None

    @property
    def workload(self) -> Workload:
        return self.config.workload

    def records(self) -> list[dict]:
        """Every record, checked: a damaged, foreign or doubled one is named by its line."""
        if not self.runs_path.exists():
            return []
        workload = self.workload
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
            problem = record_problem(record, workload)
            if problem is None and record["kind"] in (RUN, FAIL, SKIP):
                key = record_key(record, workload.axis.name)
                key = key.share if record["kind"] == SKIP else key
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


def _describe(key: RunKey | Share) -> str:
    where = f"{key.side} {key.test} @{key.point}"
    return f"{where} run {key.run}" if isinstance(key, RunKey) else f"{where} (n/a)"


def _whole(line: str | bytes) -> bool:
    """Whether a last line that lacks its newline is a whole record all the same."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)
