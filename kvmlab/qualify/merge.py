"""Putting a sharded qualification back together: ``kvmlab qualify merge DIR... -o OUT``.

Every shard directory is read and checked before anything is written: each must be a
shard of one plan (the same id and shard count), every shard must be there exactly
once, and each may only hold runs of its own cells. OUT then becomes an ordinary
qualification directory: qualify.json is the plan's, with ``merged`` naming the plan
and the shards; runs.jsonl holds every shard's records; the traces are copied. The
reports, the exit code and ``--resume`` work on it as on a run made in one piece.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kvmlab.errors import KvmlabError
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store


def read_shards(directories: list[Path]) -> tuple[Config, list[tuple[Path, list[dict]]]]:
    """The plan's config and each shard's records, or a one-line refusal naming the first problem."""
    if not directories:
        raise KvmlabError("qualify merge needs the shard directories to merge")
    shards: dict[int, tuple[Path, Config, list[dict]]] = {}
    first: Config | None = None
    for directory in directories:
        store = Store.read(directory)
        config = store.config
        plan = config.plan
        if not isinstance(plan, dict) or not {"id", "shard", "shards"} <= plan.keys() or config.cells is None:
            raise KvmlabError(f"{directory} is not a shard of a plan (made without --shard K/N PLAN)")
        if first is None:
            first = config
        elif plan["id"] != first.plan["id"] or plan["shards"] != first.plan["shards"]:
            raise KvmlabError(f"{directory} is shard {plan['shard']}/{plan['shards']} of plan {plan['id']}, "
                              f"not of plan {first.plan['id']}: shards of two plans do not merge")
        if plan["shard"] in shards:
            raise KvmlabError(f"{directory} and {shards[plan['shard']][0]} are both shard "
                              f"{plan['shard']}/{plan['shards']}")
        shards[plan["shard"]] = (directory, config, _own_records(store, config))
    total = first.plan["shards"]
    missing = sorted(set(range(1, total + 1)) - shards.keys())
    if missing:
        raise KvmlabError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {total} "
                          f"missing: merge needs every shard of plan {first.plan['id']}")
    config = first.common().with_(merged={"plan": first.plan["id"],
                                          "shards": [str(shards[k][0]) for k in sorted(shards)]})
    return config, [(shards[k][0], shards[k][2]) for k in sorted(shards)]


def _own_records(store: Store, config: Config) -> list[dict]:
    cells = set(config.cells)
    axis = store.workload.axis.name
    records = store.records()
    for record in records:
        if record["test"] is not None and (record["test"], record[axis]) not in cells:
            raise KvmlabError(f"{store.runs_path}: a {record['kind']} record of {record['test']} "
                              f"@{record[axis]}, outside shard {config.plan['shard']}'s cells")
    return records


def merge(directories: list[Path], out: Path) -> Store:
    """Merge the shards into ``out``; nothing is written unless every shard is sound."""
    if out.exists() and not out.is_dir():
        raise KvmlabError(f"-o {out}: not a directory")
    Store.refuse_existing(out)
    config, shards = read_shards(directories)
    merged = Store.create(out, config)
    for directory, records in shards:
        for record in records:
            if record.get("trace_dir"):
                source = directory / record["trace_dir"]
                if source.is_dir():
                    shutil.copytree(source, out / record["trace_dir"], dirs_exist_ok=True)
            merged.append(record)
    return merged
