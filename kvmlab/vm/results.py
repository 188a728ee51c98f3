"""Unpacking a run's results.tar: every whole member, even of an archive cut short.

The guest sends result files as they settle (``kvmlab_guest.results``), so the archive
of a guest that crashed mid-job holds whole members up to the last one it finished,
then perhaps half a member. Each regular file is read whole before it is written, so a
cut member never replaces the complete copy of that file sent before it.
"""

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Unpacked:
    files: list[str] = field(default_factory=list)
    """The files written, in the archive's order (a file sent twice counts once)."""
    cut: str | None = None
    """What ended the archive early (None: it was whole)."""


def unpack(archive: Path, target: Path) -> Unpacked:
    """Unpack ``archive`` into ``target``, keeping what came before any damage."""
    done = Unpacked()
    target.mkdir(parents=True, exist_ok=True)
    if not archive.exists() or archive.stat().st_size == 0:
        return done
    try:
        with tarfile.open(archive, mode="r|") as tar:
            for member in tar:
                _extract(tar, member, target)
                if member.name not in done.files:
                    done.files.append(member.name)
    except (tarfile.TarError, EOFError) as err:
        done.cut = str(err) or type(err).__name__
    return done


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    member = tarfile.data_filter(member, str(target))  # nothing outside target, no devices
    if not member.isfile():
        tar.extract(member, target, filter="data")
        return
    data = tar.extractfile(member).read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"{member.name} cut short at {len(data)} of {member.size} bytes")
    path = target / member.name
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.kvmlab-partial")
    scratch.write_bytes(data)
    os.chmod(scratch, member.mode)
    os.utime(scratch, (member.mtime, member.mtime))
    os.replace(scratch, path)
