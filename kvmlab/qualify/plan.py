"""A qualification planned once and run in shards, on one machine or a CI matrix.

``kvmlab qualify --plan … --shards N -o PLAN`` writes what a qualification would record
in its qualify.json (the exact kernels with their Debian versions and patch hashes, the
matrix, the clock, the QEMU package and CPU model), its id (a hash of all that), and
the matrix's cells dealt into N shards. A shard holds whole cells, so both kernels of
a cell always run on the same machine; whole rows when it can (``deal``).

``kvmlab qualify --shard K/N PLAN -o DIR`` runs shard K's cells into DIR, after checking
that this machine resolves the same kernels and QEMU as the plan; ``merge`` (merge.py)
puts the shards back together. Under the instruction clock the shards' numbers combine
as one run's would; under the wall clock they come from different machines, which the
plan's record says.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kselftest_py.workload import Workload
from kvmlab import files
from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel
from kvmlab.qualify import matrix
from kvmlab.qualify.config import Config

FORMAT = "kvmlab-qualify-plan-1"
#: A plan of the largest matrix is a few hundred KiB; past this, it is not a plan.
LIMIT = 16 * files.MiB
#: What every plan's config records: the choices a shard must not default.
RECORDED = ("workload", "clock", "method", "emulator", "cpus", "boot_per_round")


def plan_id(config: Config) -> str:
    """A hash of what every shard of the plan measures alike (``Config.common``)."""
    fixed = config.common().to_json()
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def deal(workload: Workload, tests: list[str], points: list[int], shards: int) -> list[list[list]]:
    """The cells (``[test, point]``) of each shard, in the plan's order.

    Whole rows (every test at one slot count) while there are at least as many rows as
    shards: a boot runs one kernel's row (``matrix.units``), so a shard's boots then run
    what a one-piece run's boots run, and its figures match that run's, not just its
    verdicts. More shards than rows split rows into cells. Either way the costliest
    piece goes first, each to the shard with the least work so far; a cell's cost is the
    workload's (memslot_perf's grows with the slot count: slot setup)."""
    if shards < 1:
        raise KvmlabError("--shards wants at least 1 shard")
    cells = [[test, point] for point in points for test in tests]
    if shards > len(cells):
        raise KvmlabError(f"--shards {shards}: the matrix has only {len(cells)} cells to share out")
    if shards <= len(points):
        pieces = [[[test, point] for test in tests] for point in points]
    else:
        pieces = [[cell] for cell in cells]
    dealt: list[list[list]] = [[] for _ in range(shards)]
    load = [0.0] * shards
    for piece in sorted(pieces, key=lambda p: -sum(workload.cost(point) for _, point in p)):
        least = load.index(min(load))
        dealt[least] += piece
        load[least] += sum(workload.cost(point) for _, point in piece)
    order = {tuple(cell): n for n, cell in enumerate(cells)}
    return [sorted(shard, key=lambda c: order[tuple(c)]) for shard in dealt]


def write(path: Path, config: Config, shards: int) -> dict:
    if path.exists():
        raise KvmlabError(f"-o {path}: already exists; a plan is written once")
    record = {"format": FORMAT, "id": plan_id(config), "config": config.to_json(), "shards": shards,
              "cells": deal(config.workload, list(config.tests), list(config.points), shards)}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def read(path: Path) -> dict:
    """A plan file, checked, or a one-line KvmlabError."""
    text = files.read_text(path, LIMIT, "plan")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:120]
        raise KvmlabError(f"{path} is not a kvmlab plan: {reason}") from None
    problem = _plan_problem(record)
    if problem:
        raise KvmlabError(f"{path} is not a kvmlab plan: {problem}")
    return record


def _plan_problem(record) -> str | None:
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return f"no \"format\": \"{FORMAT}\""
    shards, cells = record.get("shards"), record.get("cells")
    if not isinstance(record.get("config"), dict):
        return "no config"
    unrecorded = [key for key in RECORDED if key not in record["config"]]
    if unrecorded:  # a config an older kvmlab wrote may lack them; a plan never does
        return f"its config does not record {', '.join(map(repr, unrecorded))}"
    try:
        config = Config.from_json(record.get("config"))
    except KvmlabError as err:
        return f"its config: {err}"
    if not isinstance(shards, int) or not isinstance(cells, list) or len(cells) != shards or shards < 1:
        return "its shards and cells disagree"
    if config.plan is not None or config.cells is not None or config.merged is not None:
        return "its config is a shard's or a merge's, not a plan's"
    if record.get("id") != plan_id(config):
        return "its id does not match its config (edited by hand?)"
    if not all(isinstance(shard, list) and shard and all(map(_is_cell, shard)) for shard in cells):
        return "its cells are not lists of [test, point]"
    wanted = sorted([test, point] for point in config.points for test in config.tests)
    if sorted(cell for shard in cells for cell in shard) != wanted:
        return "its shards do not cover the matrix once"
    return None


def _is_cell(cell) -> bool:
    return (isinstance(cell, list) and len(cell) == 2 and isinstance(cell[0], str)
            and isinstance(cell[1], int) and not isinstance(cell[1], bool))


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` (1-based, as CI matrices count) → (K, N)."""
    number, slash, total = text.partition("/")
    try:
        k, n = int(number), int(total)
    except ValueError:
        raise KvmlabError(f"--shard wants K/N, e.g. 1/4; got {text!r}") from None
    if not slash or not 1 <= k <= n:
        raise KvmlabError(f"--shard {text}: K must be between 1 and N")
    return k, n


def shard_config(record: dict, k: int, n: int) -> Config:
    """The config of shard K: the plan's, with the shard's cells and which plan."""
    if n != record["shards"]:
        raise KvmlabError(f"--shard {k}/{n}: the plan has {record['shards']} shards")
    return Config.from_json(record["config"]).with_(
        cells=tuple((test, point) for test, point in record["cells"][k - 1]),
        plan={"id": record["id"], "shard": k, "shards": n})


def refuse_other_kernel(config: Config, side: str, kernel: Kernel) -> None:
    """This machine must boot the very kernel the plan names: same package version and patches."""
    planned = config.side(side)
    mismatch = []
    if kernel.pinned != planned.exact and kernel.release != planned.release:
        mismatch.append(f"release {kernel.release}, not {planned.release}")
    if planned.version and kernel.version != planned.version:
        mismatch.append(f"Debian version {kernel.version}, not {planned.version}")
    ours = [p["sha256"] for p in kernel.patches or []]
    if ours != [p["sha256"] for p in planned.patches or []]:
        mismatch.append("other patch contents")
    if mismatch:
        raise KvmlabError(f"--shard: {side} {planned.spec} resolves here to {kernel.pinned} with "
                          f"{'; '.join(mismatch)}: the shards would not measure one plan")


def items_of(config: Config, items: list[matrix.Item]) -> list[matrix.Item]:
    """The plan's items that fall in this qualification's cells (all, when not a shard)."""
    if config.cells is None:
        return items
    chosen = set(config.cells)
    return [item for item in items if (item.test, item.point) in chosen]
