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
from kvmlab import files
from kvmlab.errors import KvmlabError, shown
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
#: What a qualify.json and one record can reach (a reference table and long messages
#: included) many times over; past it, the file is not one kvmlab wrote.
CONFIG_LIMIT = 4 * files.MiB
RECORD_LIMIT = 1 * files.MiB
#: The largest time a record may hold, in ns: 11.6 days, beyond any run's budget.
MAX_TIME_NS = 1e15

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
    """A number the analysis can take: a 400-digit integer is not one (no float holds it)."""
    if _is_int(value):
        return abs(value) < 2**63
    return isinstance(value, float) and math.isfinite(value)


def _is_time(value) -> bool:
    """A measured time: positive and below ``MAX_TIME_NS``, or null for a run that
    finished no iteration."""
    return value is None or (_is_number(value) and 0 < value <= MAX_TIME_NS)


def _is_inside(value) -> bool:
    """A path relative to the store that stays inside it (no "..", not absolute)."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    path = Path(value)
    return not path.is_absolute() and ".." not in path.parts


#: What a field may hold, by the words an error message uses for it.
_TYPES = {
    "a time in ns or null": _is_time,
    "a path inside the store or null": lambda value: value is None or _is_inside(value),
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
#: Per kind, fields a record may lack, checked when it has them.
_OPTIONAL_FIELDS = {kind: record.OPTIONAL for kind, record in KINDS.items()}
#: The store locks this process holds, open for as long as it lives.
_HELD: dict[Path, IO] = {}


def record_problem(record, workload: Workload | None = None) -> str | None:
    """What is wrong with one store record of a qualification of ``workload`` (default:
    memslot-perf), or None if it is one kvmlab wrote."""
    workload = workload or workloads.get(workloads.DEFAULT)
    if not isinstance(record, dict):
        return f"a record is a JSON object, found {type(record).__name__}"
    kind = record.get("kind")
    if not isinstance(kind, str) or kind not in _KIND_FIELDS:
        if "kind" not in record:
            return "a record without 'kind'"
        return f"unknown record kind {shown(kind)} (known: {', '.join(_KIND_FIELDS)})"
    if not isinstance(record.get("side"), str) or record["side"] not in SIDES:
        return f"{kind} record: 'side' is {shown(record.get('side'))}, not base or patched"
    axis = workload.axis.name
    fields = {"test": "a string or null", axis: "an integer or null", "run": "an integer or null"}
    fields |= {axis if name == POINT else name: wanted for name, wanted in _KIND_FIELDS[kind].items()}
    if kind == RUN:
        fields |= {metric.key: "a time in ns or null" for metric in workload.metrics}
    for name, wanted in fields.items():
        if name not in record:
            return f"{kind} record without {name!r}"
        if not _TYPES[wanted](record[name]):
            return f"{kind} record: {name!r} wants {wanted}, found {shown(record[name])}"
    for name, wanted in _OPTIONAL_FIELDS[kind].items():
        if name in record and not _TYPES[wanted](record[name]):
            return f"{kind} record: {name!r} wants {wanted}, found {shown(record[name])}"
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
        store.runs_path.touch()  # first: a store with a qualify.json always has its runs.jsonl
        store.config_path.write_text(json.dumps(config.to_json(), indent=2) + "\n")
        return store

    @classmethod
    def read(cls, directory: Path, purpose: str = "to resume") -> Store:
        """The store in ``directory``, as it is: for checks that must change nothing.
        ``purpose`` finishes the refusal when there is none ("to merge", "to report")."""
        store = cls(directory)
        if not os.path.lexists(store.config_path):
            what = "is not a directory" if os.path.lexists(directory) and not directory.is_dir() else \
                f"holds no qualification {purpose} ({CONFIG} missing)"
            raise KvmlabError(f"{directory} {what}")
        return store

    @classmethod
    def open(cls, directory: Path) -> Store:
        """The store in ``directory``, ready to append to (a torn last line dropped)."""
        store = cls.read(directory)
        store.claim()
        store._mend_tail()
        return store

    def writer(self) -> str | None:
        """The pid of a live process writing this store (it holds ``DIR/.lock``), else None.
        Asked without taking the lock: a read-only store can be asked too."""
        try:
            fd = os.open(self.directory / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None  # no lock file: no writer ever held it, or it was made elsewhere
        with os.fdopen(fd, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read(20).decode(errors="replace").strip() or "?"
            except OSError:
                return None
            return None

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
        text = files.read_text(self.config_path, CONFIG_LIMIT, CONFIG)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise KvmlabError(f"{self.config_path} is damaged: {_json_reason(err)}") from None
        try:
            return Config.from_json(data)
        except KvmlabError as err:
            raise KvmlabError(f"{self.config_path} is damaged: {err}") from None

    @property
    def workload(self) -> Workload:
        return self.config.workload

    def records(self) -> list[dict]:
        """Every record, checked: a damaged, foreign or doubled one is named by its line.

        A store always has its runs.jsonl (``create`` makes it): one that is missing, or
        that is not a plain file (``/dev/null`` reads as no runs at all), is damaged."""
        if not os.path.lexists(self.runs_path):
            raise KvmlabError(f"{self.runs_path} is missing: the store is damaged "
                              "(every qualification has one, empty or not)")
        workload = self.workload
        records, final_at = [], {}
        for number, line in enumerate(files.lines(self.runs_path, RECORD_LIMIT, RUNS), 1):
            if not line.endswith(b"\n") and not _whole(line):
                break  # cut short by a kill mid-write: never a record (open() drops it)
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, too deep, or a number too long
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
        """One record, on disk before this returns: a run is never measured twice."""
        self.append_all([record])

    def append_all(self, records: list[dict]) -> None:
        """Many records in one write and one fsync (merge writes a whole store at once)."""
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        with open(self.runs_path, "a") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def _mend_tail(self) -> None:
        """A last line without its newline: a whole record gets its newline, a torn one goes."""
        with open(self.runs_path, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - RECORD_LIMIT - 1)
            handle.seek(start)
            tail = handle.read()
            if not tail or tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n") + 1
            if _whole(tail[cut:]):
                handle.write(b"\n")
            else:
                handle.truncate(start + cut)
            handle.flush()
            os.fsync(handle.fileno())


def _describe(key: RunKey | Share) -> str:
    where = f"{key.side} {key.test} @{key.point}"
    return f"{where} run {key.run}" if isinstance(key, RunKey) else f"{where} (n/a)"


def _whole(line: str | bytes) -> bool:
    """Whether a last line that lacks its newline is a whole record all the same."""
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _json_reason(err: Exception) -> str:
    return "nested too deeply" if isinstance(err, RecursionError) else shown(str(err), 120)[1:-1]


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)
