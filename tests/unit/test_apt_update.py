"""A failed ``apt-get update`` (apt exits 0 even then) is said in one line and poisons
nothing: the next request, with a mirror that answers, asks apt again."""

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab import apt
from kvmlab.errors import KvmlabError

DEAD_MIRROR = "http://127.0.0.1:9/debian"  # nothing listens on the discard port


def test_an_unreachable_mirror_is_one_line_and_leaves_no_fresh_stamp(tmp_path, monkeypatch):
    env = {"KVMLAB_CACHE": str(tmp_path), "KVMLAB_DEBIAN_MIRROR": DEAD_MIRROR}
    done = kvmlab("kernel", "fetch", "debian:bookworm", env=env)
    assert_one_line_error(done, "apt-get update (bookworm) could not fetch from", DEAD_MIRROR)
    assert not (tmp_path / "apt" / "bookworm" / "updated").exists()

    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("KVMLAB_DEBIAN_MIRROR", raising=False)
    image = apt.AptRoot("bookworm").package("linux-image-cloud-amd64")
    assert image is not None and image.name == "linux-image-cloud-amd64"
    assert (tmp_path / "apt" / "bookworm" / "updated").exists()


def test_a_failed_refresh_does_not_count_as_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path))
    apt.AptRoot("bookworm").update()
    stamp = tmp_path / "apt" / "bookworm" / "updated"
    before = stamp.stat().st_mtime
    monkeypatch.setenv("KVMLAB_DEBIAN_MIRROR", DEAD_MIRROR)
    with pytest.raises(KvmlabError, match="could not fetch from http://127.0.0.1:9/debian"):
        apt.AptRoot("bookworm").update(force=True)
    assert stamp.stat().st_mtime == before, "a failed update counted as fresh"
