"""Results travel while the job runs: the guest's streamer sends files once they settle,
and the host unpacks every whole member of an archive a crash cut short."""

import os
import tarfile

import pytest
from kvmlab_guest.results import Streamer

from kvmlab.vm import results


@pytest.fixture
def guest(tmp_path):
    """A results directory and the "port" (a plain file here) its streamer writes to."""
    root = tmp_path / "results"
    root.mkdir()
    port_path = tmp_path / "results.tar"
    port = os.open(port_path, os.O_WRONLY | os.O_CREAT)
    yield root, port_path, Streamer(str(root), port)
    os.close(port)


def _write(path, text: str, mtime_ns: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _members(archive) -> list[str]:
    with tarfile.open(archive, mode="r|") as tar:
        try:
            return [member.name for member in tar]
        except tarfile.ReadError:
            return []


def test_a_file_goes_once_it_settles_and_again_when_it_changes(guest, tmp_path):
    root, archive, streamer = guest
    _write(root / "a.json", "first", 1)
    streamer.scan()
    assert archive.stat().st_size == 0  # seen once: it may still be growing
    streamer.scan()
    assert _members(archive) == ["a.json"]
    _write(root / "a.json", "second, longer", 2)
    _write(root / "sub" / "b.txt", "b", 1)
    streamer.scan()
    streamer.scan()
    streamer.scan()  # nothing changed since: nothing is sent twice
    assert _members(archive) == ["a.json", "a.json", "sub/b.txt"]
    unpacked = results.unpack(archive, tmp_path / "host")
    assert (tmp_path / "host" / "a.json").read_text() == "second, longer"
    assert unpacked.files == ["a.json", "sub/b.txt"]


def test_close_sends_the_unsettled_and_ends_the_archive(guest, tmp_path):
    root, archive, streamer = guest
    _write(root / "trace.dat", "x" * 5000, 1)
    streamer.close()
    with tarfile.open(archive) as tar:  # a whole archive: random access works
        assert tar.getnames() == ["trace.dat"]
    unpacked = results.unpack(archive, tmp_path / "host")
    assert unpacked.cut is None and (tmp_path / "host" / "trace.dat").read_text() == "x" * 5000


def test_an_archive_cut_anywhere_keeps_every_whole_file_and_no_half_one(guest, tmp_path):
    root, archive, streamer = guest
    versions = {"a.json": [], "b.bin": []}
    for step in range(3):
        for name in versions:
            text = f"{name} version {step} " * (200 * (step + 1))
            _write(root / name, text, step + 1)
            versions[name].append(text)
        streamer.scan()
        streamer.scan()
    data = archive.read_bytes()
    for cut in range(0, len(data) + 1, 97):
        partial = tmp_path / f"cut-{cut}.tar"
        partial.write_bytes(data[:cut])
        host = tmp_path / f"host-{cut}"
        unpacked = results.unpack(partial, host)
        for name, sent in versions.items():
            if (host / name).exists():
                assert (host / name).read_text() in sent, f"a half-written {name} at cut {cut}"
                assert name in unpacked.files
        assert not list(host.glob(".*kvmlab-partial"))
    whole = results.unpack(archive, tmp_path / "whole")
    final = [(tmp_path / "whole" / name).read_text() for name in versions]
    assert final == [sent[-1] for sent in versions.values()]
    assert whole.files == ["a.json", "b.bin"]


def test_a_member_reaching_outside_the_target_is_not_written(tmp_path):
    archive = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, arcname="../escaped")
    unpacked = results.unpack(archive, tmp_path / "host")
    assert not (tmp_path / "escaped").exists()
    assert unpacked.cut and "outside" in unpacked.cut
