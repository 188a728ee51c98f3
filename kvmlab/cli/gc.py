"""``kvmlab gc``: remove old run directories from the cache, never one that may be in use."""

import argparse
import math
import sys
from collections import Counter

from kvmlab import cache
from kvmlab.errors import EXIT_USAGE, KvmlabError, shown
from kvmlab.vm import gc, template

SECONDS_PER_DAY = 86400.0
UNITS = ("KiB", "MiB", "GiB", "TiB")


def _keep_count(text: str) -> int:
    # isdigit alone takes "²", which int() refuses; 18 digits are more runs than any disk
    # holds, and int() refuses 4300.
    if text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 18:
        return int(text)
    raise KvmlabError(f"--keep wants a whole number of run directories (0 or more), got {shown(text, 80)}")


def _older_than_s(text: str | None, option: str = "--older-than") -> float | None:
    if text is None:
        return None
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not math.isfinite(days) or days < 0:
        raise KvmlabError(f"{option} wants a number of days (0 or more), got {text!r}")
    return days * SECONDS_PER_DAY


def size(count: int) -> str:
    """Bytes as a person reads them: 512 B, 3.4 MiB."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in UNITS:
        value /= 1024
        if value < 1024 or unit == UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def _directories(count: int) -> str:
    return f"{count} run director{'y' if count == 1 else 'ies'}"


def _why(reasons: Counter, older_than: str | None) -> str:
    """The kept directories counted by reason, in ``gc.REASONS`` order."""
    words = {
        gc.NEWEST: "newest",
        gc.KEPT_VM: "with a kept VM",
        gc.RUNNING: "running",
        gc.QUALIFYING: "of a qualification in progress",
        gc.BOOTING: "booting",
        gc.DAMAGED: "with a damaged run.json",
        gc.RECENT: f"changed in the last {older_than} days",
    }
    return ", ".join(f"{reasons[reason]} {words[reason]}" for reason in gc.REASONS if reasons[reason])


def _list_dry_run(survey: gc.Survey) -> int:
    """Say what would go, and which damaged directories stay; returns the bytes that would go."""
    total = 0
    for run in survey.removable:
        usage = cache.disk_usage(run.path)
        total += usage
        print(f"would remove {run.path.name} ({size(usage)}, {run.info.get('state', '?')})")
    for run, reason in survey.kept:
        if reason == gc.DAMAGED:
            print(f"keeping {run.path.name}: {run.damage}")
    return total


def _gc(args: argparse.Namespace) -> int:
    keep, older_than_s = _keep_count(args.keep), _older_than_s(args.older_than)
    _older_than_s(args.templates_older_than, "--templates-older-than")  # refused before anything goes
    survey = gc.survey(keep=keep, older_than_s=older_than_s)
    total = len(survey.kept) + len(survey.removable)
    kept = f"{len(survey.kept)}" + (f" ({_why(survey.reasons(), args.older_than)})" if survey.kept else "")
    where = f"of {_directories(total)} in {gc.area()}"
    if args.dry_run:
        freeing = _list_dry_run(survey)
        print(f"kvmlab gc: would remove {len(survey.removable)} {where}, freeing {size(freeing)}; "
              f"would keep {kept}")
        _gc_templates(args)
        return 0
    removal = gc.remove(survey.removable)
    for run, error in removal.failed:
        print(f"kvmlab: gc: could not remove {run.path}: {error}", file=sys.stderr)
    failed = f"; {len(removal.failed)} could not be removed" if removal.failed else ""
    print(f"kvmlab gc: removed {len(removal.removed)} {where}, freed {size(removal.freed)}; "
          f"kept {kept}{failed}")
    _gc_templates(args)
    # The host refused a removal (an immutable file, a read-only disk, a mount point): the
    # README's 2, as for a full or read-only disk elsewhere. 1 means a regression.
    return EXIT_USAGE if removal.failed else 0


def _gc_templates(args: argparse.Namespace) -> None:
    """Prune the saved guests (``kvmlab.vm.template``), and say what they hold."""
    survey = gc.survey_templates(_older_than_s(args.templates_older_than, "--templates-older-than"))
    doomed = [stored for stored, _ in survey.removable]
    going = sum(stored.disk_bytes for stored in doomed)
    going += sum(cache.disk_usage(path) for path in survey.leftovers)
    staying = sum(stored.disk_bytes for stored in survey.kept)
    verb = "would remove" if args.dry_run else "removed"
    for stored, why in survey.removable:
        print(f"{'would remove' if args.dry_run else 'removing'} template {stored.directory.name} "
              f"({size(stored.disk_bytes)}): {why}")
    for path in survey.leftovers:
        print(f"{'would remove' if args.dry_run else 'removing'} {path}: left by a kvmlab that died "
              "saving a template")
    if not args.dry_run:
        gc.remove_templates(doomed, survey.leftovers)
    print(f"kvmlab gc: {verb} {len(doomed)} of {len(doomed) + len(survey.kept)} templates in "
          f"{template.area()}, freeing {size(going)}; kept {len(survey.kept)} ({size(staying)} on disk)")


def add_parsers(sub) -> None:
    parser = sub.add_parser(
        "gc", help="remove old run directories from the cache (never a running VM's)",
        description="Removes run directories beyond the newest N from the cache's runs area. It keeps, "
        "whatever their age, a kept or running VM's, a boot in progress, the boots of a qualification in "
        "progress, and any whose run.json is damaged. It also removes the saved guests (templates) "
        "not restored for a while, and those whose kernel has changed.",
    )
    parser.add_argument("--keep", default=str(gc.DEFAULT_KEEP), metavar="N",
                        help=f"keep the newest N run directories ({gc.DEFAULT_KEEP}), besides those in use")
    parser.add_argument("--older-than", metavar="DAYS",
                        help="remove only run directories whose run.json changed more than DAYS days ago")
    parser.add_argument("--templates-older-than", metavar="DAYS", default=f"{gc.TEMPLATE_IDLE_DAYS:g}",
                        help="remove saved guests (templates) not restored for DAYS days "
                        f"({gc.TEMPLATE_IDLE_DAYS:g}; 0: all); those whose kernel changed or went always go")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be removed and the space it would free; remove nothing")
    parser.set_defaults(func=_gc)
