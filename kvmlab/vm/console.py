"""Reading the guest's serial console: kernel splats, and excerpts to show the user."""

import re
from dataclasses import dataclass

# Each pattern marks the first line of a report the kernel prints when it is unwell.
SPLATS = [
    ("panic", re.compile(r"Kernel panic - not syncing")),
    ("oops", re.compile(r"\bOops: |general protection fault|kernel BUG at")),
    ("kasan", re.compile(r"BUG: KASAN: ")),
    ("ubsan", re.compile(r"UBSAN: ")),
    ("bug", re.compile(r"\bBUG: ")),
    ("warning", re.compile(r"WARNING: CPU: \d+ PID: \d+ at ")),
    ("rcu-stall", re.compile(r"rcu: INFO: \w+ (self-)?detected stall|rcu_\w+ detected stalls")),
    ("hung-task", re.compile(r"INFO: task \S+ blocked for more than")),
]
EXCERPT_BEFORE = 3
EXCERPT_AFTER = 30


@dataclass(frozen=True)
class Splat:
    kind: str
    line: int
    excerpt: str

    def summary(self) -> str:
        first = self.excerpt.splitlines()[EXCERPT_BEFORE:][:1] or [""]
        return f"{self.kind} at console line {self.line + 1}: {first[0].strip()}"


def find_splats(text: str) -> list[Splat]:
    """Every kernel splat in console ``text``, first line of each report, in order."""
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines):
        for kind, pattern in SPLATS:
            if pattern.search(line):
                start = max(0, number - EXCERPT_BEFORE)
                excerpt = "\n".join(lines[start:number + EXCERPT_AFTER])
                found.append(Splat(kind, number, excerpt))
                break
    return found


def worst(splats: list[Splat]) -> Splat | None:
    """The report to show first: a panic over an Oops over the rest, else the earliest."""
    order = [kind for kind, _ in SPLATS]
    return min(splats, key=lambda s: (order.index(s.kind), s.line), default=None)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])
