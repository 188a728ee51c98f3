"""Which runs of a qualification are done, from its records, in one pass.

A run is done when it was measured or failed, when its kernel's share of the cell is
n/a, or when it was tried in as many boots as a run gets (``ATTEMPTS``) and given up.
The driver skips done runs on ``--resume``; merge and ``qualify report`` refuse a store
with runs that are not done, unless a partial result is asked for. Both read stores
of 100,000 records, so this is sets built once, not a scan per run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kvmlab.qualify import matrix, plan
from kvmlab.qualify.config import Config
from kvmlab.qualify.records import CRASH, FAIL, RUN, SKIP
from kvmlab.qualify.store import RunKey, Share, record_key

ATTEMPTS = 2
"""Boots of one run before it is given up: one fresh boot after a guest went down."""


@dataclass
class Completion:
    finished: set[RunKey] = field(default_factory=set)
    """Runs measured or failed."""
    not_applicable: set[Share] = field(default_factory=set)
    crashes: Counter = field(default_factory=Counter)
    """Per run, the boots it went down in."""

    @classmethod
    def of(cls, records: list[dict], axis: str) -> Completion:
        done = cls()
        for record in records:
            kind = record["kind"]
            if kind in (RUN, FAIL):
                done.finished.add(record_key(record, axis))
            elif kind == SKIP:
                done.not_applicable.add(record_key(record, axis).share)
            elif kind == CRASH:
                done.crashes[record_key(record, axis)] += 1
        return done

    def is_done(self, item: matrix.Item) -> bool:
        key = item.key
        return (key in self.finished or key.share in self.not_applicable
                or self.crashes[key] >= ATTEMPTS)


def items(config: Config, rounds_first: bool | None = None) -> list[matrix.Item]:
    """Every run this qualification (or shard) asks for, in the order they run."""
    first = config.boot_per_round if rounds_first is None else rounds_first
    order = matrix.run_order(config.tests, config.points, config.runs, rounds_first=first)
    return plan.items_of(config, order)


def missing(config: Config, records: list[dict]) -> list[matrix.Item]:
    """The runs of ``config`` that ``records`` do not show done."""
    done = Completion.of(records, config.workload.axis.name)
    return [item for item in items(config) if not done.is_done(item)]


def describe(config: Config, left: list[matrix.Item]) -> str:
    """"13 of 20 runs not done (first: base map @10 slots run 2)": what ``missing`` found."""
    return (f"{len(left)} of {len(items(config))} runs not done (first: "
            f"{left[0].describe(config.workload.axis.name)})")
