"""The host↔guest contract: the one copy of every name both sides must agree on.

Imported by the host (``kvmlab.vm``, ``traces``) and by the guest (``init``, ``agent``),
so it is standard library only and holds data, not behaviour. The trace mark prefix
belongs to kselftest_py, which writes the marks and stands alone on any host's python3;
it is named here for the host.

How a lab VM talks to the host:

- the kernel runs ``INIT`` as PID 1 (``rdinit=``), from the per-run initramfs layer;
- the job is ``JOB`` (``Job``: ``argv``, ``env``, ``modules`` to load, ``keep``);
- the guest's code lives under ``GUEST_CODE``, on the job's ``PYTHONPATH``;
- the job's stdout and stderr go to the virtio-serial ports ``PORT_STDOUT`` and
  ``PORT_STDERR``; what it writes under ``RESULTS`` (``$KVMLAB_RESULTS``) goes to
  ``PORT_RESULTS`` as one tar stream, each file once it settles (``results``) and the
  rest when the job ends;
- ``PORT_STATUS`` carries JSON lines: ``ready`` when the job starts, a ``heartbeat``
  every ``HEARTBEAT_S``, ``exit`` with its code;
- a guest that stays up runs the agent, which takes requests on ``PORT_CONTROL``;
- the init's first console line is ``USERSPACE_MARK``: the host times the boot by it;
- a job marks the phases of its work in ftrace's trace_marker with ``MARK_PREFIX``
  and a JSON object, which the host's trace reader splits on.
"""

from dataclasses import asdict, dataclass, field

from kselftest_py import trace_marker

GUEST_ROOT = "/kvmlab"
JOB = f"{GUEST_ROOT}/job.json"
INIT = "/opt/kvmlab/kvmlab_guest/init.py"
GUEST_CODE = "/opt/kvmlab"
"""The guest's Python packages: kvmlab_guest, kselftest_py, traces (its guest half)."""
ADDED = f"{GUEST_CODE}/add"
"""Files and directories the user added with ``kvmlab run --add``."""
RESULTS = "/results"

PORT_STATUS = "kvmlab.status"
PORT_STDOUT = "kvmlab.stdout"
PORT_STDERR = "kvmlab.stderr"
PORT_RESULTS = "kvmlab.results"
OUTPUT_PORTS = (PORT_STATUS, PORT_STDOUT, PORT_STDERR, PORT_RESULTS)
"""Guest → host streams, each written by QEMU to a file in the run directory."""
PORT_CONTROL = "kvmlab.control"
"""Host ↔ guest requests and answers for the agent (a UNIX socket on the host)."""
MAILBOX_VENDOR, MAILBOX_DEVICE = 0x1AF4, 0x1110
"""The first request's mailbox (``mailbox``): QEMU's ivshmem-plain PCI device, whose
memory is ``MAILBOX_BYTES`` of a file the host writes."""
MAILBOX_BYTES = 4 << 20
HOLD_VENDOR, HOLD_DEVICE = 0x1B36, 0x0011
"""The device the agent pauses its VM with (``hold``): QEMU's pvpanic-pci."""
HOLD_EVENT = 1
"""pvpanic's "panicked": QEMU, with ``-action panic=pause``, pauses the guest there."""

EVENT_READY = "ready"
EVENT_HEARTBEAT = "heartbeat"
EVENT_EXIT = "exit"
EVENT_AGENT_READY = "agent-ready"
HEARTBEAT_S = 2.0

USERSPACE_MARK = "kvmlab-init: userspace reached"
MARK_PREFIX = trace_marker.PREFIX
"""Written by kselftest_py itself, which stands alone; named here for the host's reader."""

EXIT_NOT_FOUND = 127
"""The job's program does not exist (as a shell says)."""
EXIT_NOT_RUNNABLE = 126
"""The job's program exists but cannot be run."""
AGENT_TIMEOUT = "timeout"
"""The agent's answer's ``code`` when it had to kill the command."""


@dataclass
class Job:
    """What the guest init runs, as ``JOB`` holds it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    keep: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "Job":
        return cls(argv=list(record["argv"]), env=dict(record.get("env", {})),
                   modules=list(record.get("modules", [])), keep=bool(record.get("keep")))
