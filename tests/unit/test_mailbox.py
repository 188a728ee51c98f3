"""The first request's mailbox, both ends on plain files: what the host posts into a
paused guest's mailbox file is what the agent takes from its mapping of it, and the
agent takes its first request from whichever of the mailbox and the port has it."""

import json
import mmap
import os

import pytest
from kvmlab_guest import agent, mailbox, protocol


@pytest.fixture
def box(tmp_path):
    """A mailbox file as ``boot.launch`` makes it, and the agent's read-only mapping of it."""
    path = tmp_path / "mailbox"
    with open(path, "wb") as handle:
        handle.truncate(protocol.MAILBOX_BYTES)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
    yield path, mapped
    mapped.close()


@pytest.fixture
def port():
    """A pipe standing for the control port: the agent reads one end."""
    read, write = os.pipe()
    yield read, write
    os.close(read)
    os.close(write)


def test_what_the_host_posts_is_what_the_agent_takes(box):
    path, mapped = box
    assert mailbox.take(mapped) is None  # an empty mailbox
    message = {"id": 1, "argv": ["uname", "-r"], "files": [], "timeout_s": 600.0}
    data = (json.dumps(message) + "\n").encode()
    assert mailbox.post(path, data) == len(data)
    assert json.loads(mailbox.take(mapped)) == message


def test_a_message_too_big_for_the_mailbox_is_not_posted(box):
    path, mapped = box
    assert mailbox.post(path, b"x" * protocol.MAILBOX_BYTES + b"\n") == 0
    assert mailbox.take(mapped) is None


def test_a_length_beyond_the_mailbox_reads_as_empty(box):
    path, mapped = box
    with open(path, "r+b") as handle:
        handle.write((protocol.MAILBOX_BYTES).to_bytes(mailbox.HEADER, "little"))
    assert mailbox.take(mapped) is None


def test_the_first_request_comes_from_the_mailbox_then_the_rest_from_the_port(box, port):
    path, mapped = box
    read, write = port
    mailbox.post(path, b'{"id": 1, "argv": ["true"]}\n')
    taken = agent.requests(read, mapped)
    assert next(taken)["id"] == 1
    os.write(write, b'{"id": 2, "argv": ["false"]}\n')
    assert next(taken)["id"] == 2


def test_a_booted_guest_takes_its_first_request_from_the_port(box, port):
    """Nothing in the mailbox: the agent stops looking once the port has data."""
    _, mapped = box
    read, write = port
    os.write(write, b'{"id": 7, "argv": ["true"]}\n')
    assert agent.first_from_mailbox(read, mapped) is None
    assert next(agent.requests(read, mapped))["id"] == 7
