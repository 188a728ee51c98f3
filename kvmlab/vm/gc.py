"""Pruning the cache's run directories: which ones may go, and removing them.

Every boot leaves a run directory (``runs.new``) and nothing removed them. The boots of
``kvmlab qualify`` are there too, in the same ``runs`` area: a qualification's output
directory keeps only their names (``boot`` in its runs.jsonl). ``survey`` sorts every run
directory into kept, with the reason, or removable; ``remove`` carries a survey out. The
two are apart so that ``kvmlab gc --dry-run`` shows exactly what a real gc would do.

Kept whatever their age, besides the newest ``keep``:

- a run whose QEMU is alive: kept VMs and boots in progress. The pid in run.json only
  counts while that process is a qemu-system whose arguments name a file of the run
  directory (``runs.qemu_alive``), so a recycled pid keeps nothing;
- a boot still assembling its initramfs (state ``preparing``, no QEMU yet) whose run.json
  changed within ``BOOTING_S``. A boot refused at that point stays ``preparing`` for
  ever, so after that it may go;
- the guests of a qualification in progress: a qualification names itself in each of
  its guests' run.json (``runs.QUALIFY``: its pid and start time), and while that
  process runs, its guests' directories stay. Its finished guests hold the console logs
  that its crash records name;
- a directory whose run.json is missing or damaged (not JSON, not an object, no
  ``state`` or ``argv``, a ``qemu_pid`` that is no pid). Without it gc cannot tell
  whether a QEMU of that run is alive. Keeping a few small directories is the
  cheaper mistake, and ``kvmlab gc --dry-run`` names them for a person to look at.

With ``older_than_s``, a run whose run.json changed more recently than that stays too.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab import cache
from kvmlab.errors import KvmlabError
from kvmlab.vm import runs, template

DEFAULT_KEEP = 20
BOOTING_S = 3600.0
"""How long a ``preparing`` run counts as a boot in progress (a cold image build takes minutes)."""
NAME_TIME = "%Y%m%d-%H%M%S"
"""The start time at the head of a run directory's name (``runs.new``, local time)."""
REQUIRED = ("state", "argv")
"""Keys ``boot.start`` writes first; a run.json without them was never whole."""

# Why a run directory stays, in the order the summary gives them.
NEWEST = "newest"
KEPT_VM = "kept VM"
RUNNING = "running"
QUALIFYING = "qualifying"
BOOTING = "booting"
DAMAGED = "damaged"
RECENT = "recent"
REASONS = (NEWEST, KEPT_VM, RUNNING, QUALIFYING, BOOTING, DAMAGED, RECENT)


@dataclass(frozen=True)
class Run:
    """One run directory as gc sees it."""

    path: Path
    started: float
    """Epoch seconds, from the directory's name."""
    changed: float
    """When run.json last changed (its state with it), epoch seconds."""
    info: dict
    damage: str | None = None
    """Why run.json cannot be trusted, or None."""


@dataclass
class Survey:
    kept: list[tuple[Run, str]] = field(default_factory=list)
    removable: list[Run] = field(default_factory=list)

    def reasons(self) -> Counter[str]:
        return Counter(reason for _, reason in self.kept)


@dataclass
class Removal:
    removed: list[Run] = field(default_factory=list)
    freed: int = 0
    """Bytes on disk of what was removed."""
    failed: list[tuple[Run, str]] = field(default_factory=list)


def area() -> Path:
    return cache.area("runs")


def survey(keep: int = DEFAULT_KEEP, older_than_s: float | None = None) -> Survey:
    """Which run directories stay (and why) and which may go; nothing is touched."""
    now = time.time()
    result = Survey()
    for rank, run in enumerate(scan(area())):
        reason = NEWEST if rank < keep else _reason_to_keep(run, now, older_than_s)
        if reason is None:
            result.removable.append(run)
        else:
            result.kept.append((run, reason))
    return result


def _reason_to_keep(run: Run, now: float, older_than_s: float | None) -> str | None:
    """Why ``run`` must stay although it is not among the newest; None: it may go."""
    if run.damage:
        return DAMAGED
    pid = run.info.get("qemu_pid")
    if pid is not None and runs.qemu_alive(run.path, pid):
        return KEPT_VM if run.info.get("keep") else RUNNING
    if _booting(run, now):
        return BOOTING
    if runs.owner_alive(run.info.get(runs.QUALIFY)):
        return QUALIFYING
    if older_than_s is not None and now - run.changed < older_than_s:
        return RECENT
    return None


def _booting(run: Run, now: float) -> bool:
    return (run.info.get("state") == "preparing" and "qemu_pid" not in run.info
            and now - run.changed < BOOTING_S)


def remove(doomed: list[Run]) -> Removal:
    """Remove the run directories a survey found removable, measuring what each frees first."""
    removal = Removal()
    for run in doomed:
        size = cache.disk_usage(run.path)
        try:
            shutil.rmtree(run.path)
        except FileNotFoundError:
            continue  # removed meanwhile by someone else: not ours to count
        except OSError as err:
            removal.failed.append((run, str(err)))
            continue
        removal.removed.append(run)
        removal.freed += size
    return removal


# -- reading the run directories --------------------------------------------------------
def scan(directory: Path) -> list[Run]:
    """Every run directory in ``directory``, newest first by the start time in its name."""
    entries = os.scandir(directory)
    found = [_load(Path(entry.path)) for entry in entries if entry.is_dir(follow_symlinks=False)]
    return sorted(found, key=lambda run: (run.started, run.path.name), reverse=True)


def _load(path: Path) -> Run:
    info, damage = _read_info(path / "run.json")
    changed = _mtime(path / "run.json") or _mtime(path)
    return Run(path, _started(path, changed), changed, info, damage)


def _read_info(path: Path) -> tuple[dict, str | None]:
    """run.json's fields, and what is wrong with it if gc cannot trust it."""
    if not path.exists():
        return {}, "no run.json"
    try:
        info = runs.read(path.parent)
    except KvmlabError as err:
        return {}, str(err)
    missing = [key for key in REQUIRED if key not in info]
    if missing:
        return info, f"run.json lacks {', '.join(missing)}"
    pid = info.get("qemu_pid")
    if pid is not None and not runs.is_pid(pid):
        return info, f"run.json's qemu_pid is no pid: {pid!r}"
    return info, None


def _started(path: Path, fallback: float) -> float:
    try:
        return time.mktime(time.strptime(path.name[:15], NAME_TIME))
    except (ValueError, OverflowError):
        return fallback  # not named by runs.new


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# -- templates ----------------------------------------------------------------------------
TEMPLATE_IDLE_DAYS = 14.0
"""A template unused for this long goes (``kvmlab gc --templates-older-than``)."""


@dataclass
class TemplateSurvey:
    kept: list[template.Stored] = field(default_factory=list)
    removable: list[tuple[template.Stored, str]] = field(default_factory=list)
    """Each with why it may go."""
    leftovers: list[Path] = field(default_factory=list)
    """What a kvmlab killed while saving a template left (``template.leftovers``)."""


def survey_templates(idle_s: float) -> TemplateSurvey:
    """Which templates go: unused for ``idle_s``, or whose kernel has changed or gone
    (their key names the kernel file as it was), or without a readable record."""
    now = time.time()
    result = TemplateSurvey()
    for stored in template.stored():
        why = template.unusable(stored.directory)
        if why is None and now - stored.last_used > idle_s:
            why = f"unused for {(now - stored.last_used) / 86400:.0f} days"
        if why is None:
            result.kept.append(stored)
        else:
            result.removable.append((stored, why))
    result.leftovers = template.leftovers()
    return result


def remove_templates(doomed: list[template.Stored], leftovers: list[Path] = ()) -> int:
    """Remove the templates a survey found and the leftovers; returns the bytes freed. A guest
    restored from a template keeps its memory mapped: the file goes when that guest ends."""
    freed = 0
    for stored in doomed:
        template.discard(stored.directory)
        freed += stored.disk_bytes
    for path in leftovers:
        freed += cache.disk_usage(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return freed
