"""Putting a sharded qualification back together: ``kvmlab qualify merge DIR... -o OUT``.

A CI pipeline trusts this step to publish a verdict, so every shard is read and checked
before anything is written, and a shard that would make the verdict say less than it
seems to is refused, naming the shard and what is wrong:

- each is a shard of one plan (the same id and shard count), there exactly once, whose
  qualify.json still hashes to that id and agrees with every other shard's;
- none is still being written (a live ``kvmlab qualify`` holds its lock);
- each holds only runs of its own cells, and every one of them is done (measured,
  failed, n/a or given up: ``completion``), unless ``partial`` asks on purpose for a
  merge with runs missing, which the verdict then says (``analysis.Analysis.missing``);
- each record's trace directory lies inside its shard.

OUT is then built whole in a scratch directory beside it (the store, the traces, the
reports) and renamed into place: a kill or a full disk leaves no OUT, never half of one.
OUT is an ordinary qualification directory: qualify.json is the plan's, with ``merged``
naming the plan and the shards; the reports, the exit code and ``--resume`` work on it
as on a run made in one piece.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kvmlab.errors import KvmlabError, WriteFailed
from kvmlab.qualify import completion, plan
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store

T = TypeVar("T")
SCRATCH = ".merge-"


@dataclass(frozen=True)
class Shard:
    directory: Path
    config: Config
    records: list[dict]
    missing: int
    """Runs of its cells not done (only with ``partial``)."""

    @property
    def name(self) -> str:
        return _name(self.config, self.directory)


@dataclass(frozen=True)
class Shards:
    config: Config
    """The merged qualification's: the plan's, with ``merged`` naming plan and shards."""
    shards: list[Shard]

    @property
    def missing(self) -> int:
        return sum(shard.missing for shard in self.shards)


def read_shards(directories: list[Path], partial: bool = False) -> Shards:
    """Every shard, checked, or a one-line refusal naming the first problem and its shard."""
    if not directories:
        raise KvmlabError("qualify merge needs the shard directories to merge")
    stores = dict(_shard_store(directory) for directory in directories)
    configs = {store.directory: config for store, config in stores.items()}
    for directory in configs:
        _refuse_edited(directory, configs)
    read = [_read_shard(store, config, partial) for store, config in stores.items()]
    shards: dict[int, Shard] = {}
    first = read[0]
    for shard in read:
        _refuse_other_plan(shard, first)
        number = shard.config.plan["shard"]
        if number in shards:
            raise KvmlabError(f"{shard.directory} and {shards[number].directory} are both shard "
                              f"{number}/{shard.config.plan['shards']}")
        shards[number] = shard
    total, plan_id = first.config.plan["shards"], first.config.plan["id"]
    missing = sorted(set(range(1, total + 1)) - shards.keys())
    if missing:
        raise KvmlabError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {total} "
                          f"missing: merge needs every shard of plan {plan_id} ({total} shards)")
    ordered = [shards[k] for k in sorted(shards)]
    merged = {"plan": plan_id, "shards": [str(shard.directory) for shard in ordered]}
    return Shards(first.config.common().with_(merged=merged), ordered)


def _shard_store(directory: Path) -> tuple[Store, Config]:
    """A shard's store and config: no live process writes it, and its config is a shard's."""
    store = Store.read(directory, "to merge")
    writer = store.writer()
    if writer is not None:
        raise KvmlabError(f"{directory} is still being written by kvmlab qualify (pid {writer}): "
                          "merge it once that has finished")
    config = store.config
    if config.plan is None or config.cells is None:
        raise KvmlabError(f"{directory} is not a shard of a plan (made without --shard K/N PLAN)")
    return store, config


def _read_shard(store: Store, config: Config, partial: bool) -> Shard:
    """A shard's records, every one of its runs done unless ``partial``."""
    directory = store.directory
    records = _own_records(store, config)
    left = completion.missing(config, records)
    shard = Shard(directory, config, records, len(left))
    if left and not partial:
        raise KvmlabError(f"{shard.name} is unfinished: {completion.describe(config, left)}; finish it "
                          f"with kvmlab qualify --resume -o {directory}, or merge with --partial")
    for record in records:
        _trace_source(directory, record)  # refused now, before OUT is made
    return shard


def _refuse_edited(directory: Path, configs: dict[Path, Config]) -> None:
    """A shard's qualify.json must still hash to its plan's id: one edited afterwards
    (``runs: 9``, another kernel) does not describe the runs it holds. The difference
    from a sound shard of the same plan is named when there is one."""
    config = configs[directory]
    plan_id = config.plan["id"]
    if plan.plan_id(config) == plan_id:
        return
    sound = [(where, other) for where, other in configs.items()
             if other.plan["id"] == plan_id and plan.plan_id(other) == plan_id]
    differ = ""
    if sound:
        where, other = sound[0]
        differ = f" ({', '.join(_differences(config, other))} differ from {_name(other, where)})"
    raise KvmlabError(f"{_name(config, directory)}: its qualify.json no longer matches plan {plan_id}"
                      f"{differ}: edited after the shard was made, so its runs are not that plan's")


def _name(config: Config, directory: Path) -> str:
    return f"shard {config.plan['shard']}/{config.plan['shards']} ({directory})"


def _refuse_other_plan(shard: Shard, first: Shard) -> None:
    ours, theirs = shard.config.plan, first.config.plan
    if ours["id"] != theirs["id"] or ours["shards"] != theirs["shards"]:
        raise KvmlabError(f"{shard.directory} is shard {ours['shard']}/{ours['shards']} of plan "
                          f"{ours['id']} ({ours['shards']} shards), not of plan {theirs['id']} "
                          f"({theirs['shards']} shards) as {first.directory} is: "
                          "shards of two plans do not merge")


def _differences(one: Config, other: Config) -> list[str]:
    """The keys of two shards' configs that differ beyond what each shard has of its own."""
    mine, theirs = one.common().to_json(), other.common().to_json()
    return sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))


def _own_records(store: Store, config: Config) -> list[dict]:
    cells = set(config.cells)
    axis = store.workload.axis.name
    records = store.records()
    for record in records:
        if record["test"] is not None and (record["test"], record[axis]) not in cells:
            raise KvmlabError(f"{store.runs_path}: a {record['kind']} record of {record['test']} "
                              f"@{record[axis]}, outside shard {config.plan['shard']}'s cells")
    return records


def _trace_source(directory: Path, record: dict) -> Path | None:
    """The trace directory a record names, which must lie inside its shard (links
    followed): a store's paths never reach outside it."""
    name = record.get("trace_dir")
    if not name:
        return None
    source = directory / name
    if not source.resolve().is_relative_to(directory.resolve()):
        raise KvmlabError(f"{directory}: a record's trace_dir {name!r} leads outside the shard: damaged")
    return source if source.is_dir() else None


def merge(shards: Shards, out: Path, finish: Callable[[Store, list[dict]], T]) -> T:
    """Write the merged store into ``out``, call ``finish`` on it and its records (the
    reports), then rename it into place; nothing is left at ``out`` if any of it fails."""
    _refuse_out(out)
    _remove_stale_scratch(out)
    scratch = out.parent / f".{out.name}{SCRATCH}{os.getpid()}"
    try:
        store = Store.create(scratch, shards.config)
        records = []
        for shard in shards.shards:
            for record in shard.records:
                source = _trace_source(shard.directory, record)
                if source is not None:
                    shutil.copytree(source, scratch / record["trace_dir"], symlinks=True, dirs_exist_ok=True)
                records.append(record)
        store.append_all(records)
        result = finish(store, records)
        store.release()
        _sync_directory(scratch)
        _refuse_out(out)
        if out.is_dir():
            out.rmdir()  # an empty directory made for us; a rename cannot replace it otherwise
        os.rename(scratch, out)
        _sync_directory(out.parent)
    except OSError as err:
        raise KvmlabError(f"-o {out}: the merge could not be written ({_where(err.filename, scratch, out)}"
                          f"{err.strerror or err}); nothing was left there") from None
    except WriteFailed as err:
        raise KvmlabError(f"-o {out}: the merge could not be written ({_where(err.path, scratch, out)}"
                          f"{err.reason}); nothing was left there") from None
    finally:
        Store(scratch).release()
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _refuse_out(out: Path) -> None:
    if os.path.lexists(out) and (not out.is_dir() or out.is_symlink()):
        raise KvmlabError(f"-o {out}: not a directory")
    Store.refuse_existing(out)
    if out.is_dir() and any(out.iterdir()):
        raise KvmlabError(f"-o {out}: not empty; merge writes a new qualification directory")


def _remove_stale_scratch(out: Path) -> None:
    """Scratch directories of merges into ``out`` that a kill ended (their process is gone)."""
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}{SCRATCH}"
    for path in out.parent.iterdir():
        pid = path.name[len(prefix):]
        if path.name.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _where(filename, scratch: Path, out: Path) -> str:
    """The file that failed, named as it would be in OUT."""
    if not filename:
        return ""
    return f"{str(filename).replace(str(scratch), str(out), 1)}: "
