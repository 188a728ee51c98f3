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
invariant violation or checks that could not run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from kvmlab.errors import KvmlabError

CONFIG = "qualify.json"
RUNS = "runs.jsonl"

#: Record kinds (above); ``checks`` is a guest's invariant-check summary when it shut down.
RUN, SKIP, FAIL, CRASH = "run", "skip", "fail", "crash"
SPLAT, INVARIANT, CHECKS = "splat", "invariant", "checks"


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
        store._mend_tail()
        return store

    @property
    def config(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as err:
            raise KvmlabError(f"{self.config_path} is damaged: {err}") from None

    def records(self) -> list[dict]:
        if not self.runs_path.exists():
            return []
        records = []
        for number, line in enumerate(self.runs_path.read_text().splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise KvmlabError(f"{self.runs_path}:{number}: not a JSON record") from None
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
        try:
            whole = isinstance(json.loads(data[start:]), dict)
        except ValueError:
            whole = False
        with open(self.runs_path, "r+b") as handle:
            if whole:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())
