"""Published figures beside measured ones: ``kvmlab qualify --reference FILE``.

A series' cover letter posts a table of before and after times. Given as a CSV file
with the columns ``test,slots,before,after,source`` (times in seconds, as cover letters
post them; tests by the workload's measures or their command-line words, ``slot setup``
too; the second column is named by the workload's axis), the report
shows beside each cell the published change, the measured one, and whether the two
point the same way. A clock other than the author's machine can change the size of a
change; what a reproduction must get right first is its direction.

The file is read once, when the qualification is created (or again on ``--resume
--reference``), and kept in qualify.json: the reports can be made again without it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from kselftest_py.workload import Workload
from kvmlab.errors import KvmlabError
from kvmlab.qualify import workloads

SHIPPED = Path(__file__).parent / "references"
#: Bigger than any table a cover letter posts; a bound on what is read from a file kvmlab did not write.
MAX_BYTES = 1 << 20
IMPROVED, REGRESSED, NONE = "faster", "slower", "none"


def columns(workload: Workload) -> tuple[str, ...]:
    return ("test", workload.axis.name, "before", "after", "source")


def read(path: Path, workload: Workload | None = None) -> dict:
    """``{"file": name, "rows": [{test, slots, before, after, source}, ...]}``, or a one-line KvmlabError.

    A bare name that is no file here names a table kvmlab ships (``SHIPPED``), so that
    ``--reference scalable-memslots-v5`` works wherever kvmlab is installed."""
    where = f"--reference {path}"
    shipped = SHIPPED / f"{path}.csv"
    if not path.exists() and len(path.parts) == 1 and shipped.is_file():
        path = shipped
    try:
        if not path.is_file():
            raise KvmlabError(f"{where}: not a file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as err:
        raise KvmlabError(f"{where}: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise KvmlabError(f"{where}: larger than {MAX_BYTES} bytes; not a table of published figures")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise KvmlabError(f"{where}: not UTF-8 text") from None
    return {"file": path.name, "rows": parse(text, where, workload)}


def parse(text: str, where: str = "--reference", workload: Workload | None = None) -> list[dict]:
    workload = workload or workloads.get(workloads.DEFAULT)
    wanted, axis = columns(workload), workload.axis.name
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None or [word.strip().lower() for word in header] != list(wanted):
            raise KvmlabError(f"{where}: the first line must be the header {','.join(wanted)}")
        rows, seen = [], set()
        for line, fields in enumerate(reader, 2):
            if not any(field.strip() for field in fields):
                continue
            row = _row(fields, f"{where}:{line}", workload)
            if (row["test"], row[axis]) in seen:
                raise KvmlabError(f"{where}:{line}: a second row for {row['test']} @{row[axis]}")
            seen.add((row["test"], row[axis]))
            rows.append(row)
    except csv.Error as err:
        raise KvmlabError(f"{where}: not CSV: {err}") from None
    if not rows:
        raise KvmlabError(f"{where}: no rows of figures")
    return rows


def _row(fields: list[str], where: str, workload: Workload) -> dict:
    wanted = columns(workload)
    if len(fields) != len(wanted):
        raise KvmlabError(f"{where}: {len(fields)} fields where {','.join(wanted)} are 5")
    test, point, before, after, source = (field.strip() for field in fields)
    return {"test": test_name(test, where, workload), workload.axis.name: _point(point, where, workload),
            "before": _seconds(before, "before", where), "after": _seconds(after, "after", where),
            "source": source}


def test_name(word: str, where: str, workload: Workload) -> str:
    """The workload's name of a measure: ``move-active``, ``Move active area``, ``slot setup``…"""
    lowered = word.lower().replace("_", " ").replace("-", " ").strip()
    names = [measure.name for measure in workload.measures(workload.tests)]
    for name in names:
        option = workload.option(name) if name in workload.tests else name
        if lowered in (option.replace("-", " "), name.lower()):
            return name
    known = ", ".join(workload.option(name) if name in workload.tests else name.replace(" ", "-")
                      for name in names)
    raise KvmlabError(f"{where}: unknown test {word!r} (known: {known})")


def _point(text: str, where: str, workload: Workload) -> int:
    axis = workload.axis
    try:
        point = int(text)
    except ValueError:
        raise KvmlabError(f"{where}: {axis.name} {text!r} is not a count") from None
    if not axis.minimum <= point <= 1 << 20:
        raise KvmlabError(f"{where}: {axis.name} {point} is not a {axis.noun} count")
    return point


def _seconds(text: str, column: str, where: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise KvmlabError(f"{where}: {column} {text!r} is not a time in seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise KvmlabError(f"{where}: {column} {text!r} is not a positive time in seconds")
    return value


def published(config, measure: str, point: int) -> dict | None:
    """The reference row of one cell, if the qualification (a ``config.Config``) has a
    reference and it has that row."""
    axis = config.workload.axis.name
    for row in (config.reference or {}).get("rows", []):
        if row["test"] == measure and row.get(axis) == point:
            return row
    return None


def change(row: dict) -> float:
    """after / before - 1, as kvmlab's cells count a change: negative is faster."""
    return row["after"] / row["before"] - 1


def direction(change_: float, threshold: float) -> str:
    """faster, slower, or none within ``threshold``: how a change is read for agreement."""
    if change_ <= -threshold:
        return IMPROVED
    if change_ >= threshold:
        return REGRESSED
    return NONE
