#!/usr/bin/python3
"""kvmlab's guest init: set up the guest, run the job, report back, power off.

Runs as PID 1 from the per-run initramfs layer (``rdinit=``, ``protocol.INIT``) on the
image's python3 with the standard library only. What it tells the host, and how, is
``protocol``: the job's streams and results on virtio-serial ports, ``ready``, a
heartbeat and ``exit`` on the status port. Then the guest powers off, or with ``keep``
stays up for drgn or a person.

A kernel crash never reaches this code: the host reads it from the serial console.
"""

import ctypes
import json
import os
import subprocess
import sys
import threading
import time

if not __package__:  # run by path as PID 1: the package's parent holds kvmlab_guest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
from kvmlab_guest import ports, protocol, results  # noqa: E402

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LIBC = ctypes.CDLL(None, use_errno=True)
RB_POWER_OFF = 0x4321FEDC

MOUNTS = [
    ("proc", "/proc", "proc"),
    ("sysfs", "/sys", "sysfs"),
    ("devtmpfs", "/dev", "devtmpfs"),
    ("tmpfs", "/tmp", "tmpfs"),
    ("tmpfs", "/run", "tmpfs"),
    ("devpts", "/dev/pts", "devpts"),
    ("tracefs", "/sys/kernel/tracing", "tracefs"),
    ("debugfs", "/sys/kernel/debug", "debugfs"),
]


def log(message: str) -> None:
    """Write to the serial console, where the host keeps it in the run's console.log."""
    print(f"kvmlab-init: {message}", file=sys.stderr, flush=True)


def mount_all() -> None:
    for source, target, fstype in MOUNTS:
        os.makedirs(target, exist_ok=True)
        if LIBC.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
            errno = ctypes.get_errno()
            if errno != 16:  # EBUSY: already mounted
                log(f"mount {fstype} on {target} failed: {os.strerror(errno)}")


def load_modules(names: list[str]) -> list[str]:
    """modprobe each module; the KVM vendor module matching this CPU only. Returns failures."""
    vendor = open("/proc/cpuinfo").read()
    skip = {"kvm_intel"} if "AuthenticAMD" in vendor else {"kvm_amd"}
    failed = []
    for name in names:
        if name in skip:
            continue
        done = subprocess.run(["modprobe", name], capture_output=True, text=True)
        if done.returncode != 0:
            log(f"modprobe {name} failed: {done.stderr.strip()}")
            failed.append(name)
    return failed


def open_ports() -> dict[str, int]:
    """The host's output ports, open for writing."""
    return {name: os.open(path, os.O_WRONLY) for name, path in ports.find(protocol.OUTPUT_PORTS).items()}


_STATUS_LOCK = threading.Lock()


def status(ports: dict[str, int], **record) -> None:
    """One JSON line on the status port; whole lines only, whichever thread writes."""
    line = (json.dumps(record) + "\n").encode()
    with _STATUS_LOCK:
        os.write(ports[protocol.PORT_STATUS], line)


def heartbeat(ports: dict[str, int], streamer: results.Streamer) -> None:
    """Tell the host every few seconds that the guest kernel still schedules us, and
    hand over the results that settled meanwhile.

    A guest kernel that livelocks stops its clock and everything else; the host
    notices the silence long before the job's timeout.
    """

    def beat() -> None:
        while True:
            time.sleep(protocol.HEARTBEAT_S)
            status(ports, event=protocol.EVENT_HEARTBEAT)
            streamer.scan()

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def run_job(job: protocol.Job, ports: dict[str, int]) -> int:
    env = {
        "PATH": PATH,
        "HOME": "/root",
        "TERM": "dumb",
        "PYTHONPATH": protocol.GUEST_CODE,
        "PYTHONDONTWRITEBYTECODE": "1",
        "KVMLAB_RESULTS": protocol.RESULTS,
        **job.env,
    }
    os.makedirs("/root", exist_ok=True)
    try:
        child = subprocess.Popen(
            job.argv, env=env, cwd="/root", stdin=subprocess.DEVNULL,
            stdout=ports[protocol.PORT_STDOUT], stderr=ports[protocol.PORT_STDERR],
        )
    except OSError as err:
        os.write(ports[protocol.PORT_STDERR], f"kvmlab: cannot run {job.argv[0]}: {err}\n".encode())
        return protocol.EXIT_NOT_FOUND if isinstance(err, FileNotFoundError) else protocol.EXIT_NOT_RUNNABLE
    code = child.wait()
    return code if code >= 0 else 128 - code


def power_off() -> None:
    os.sync()
    LIBC.reboot(RB_POWER_OFF)
    time.sleep(5)


def stay_up() -> None:
    """With ``keep``: stay up as PID 1, reaping orphans, until the host stops the VM."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)


def main() -> None:
    print(protocol.USERSPACE_MARK, file=sys.stderr, flush=True)
    os.environ["PATH"] = PATH
    mount_all()
    with open(protocol.JOB) as handle:
        job = protocol.Job.from_json(json.load(handle))
    with open("/proc/sys/kernel/hostname", "w") as handle:
        handle.write("kvmlab")
    failed = load_modules(job.modules)
    ports = open_ports()
    status(ports, event=protocol.EVENT_READY, uptime=float(open("/proc/uptime").read().split()[0]),
           failed_modules=failed)
    os.makedirs(protocol.RESULTS, exist_ok=True)
    streamer = results.Streamer(protocol.RESULTS, ports[protocol.PORT_RESULTS])
    heartbeat(ports, streamer)
    code = run_job(job, ports)
    streamer.close()
    status(ports, event=protocol.EVENT_EXIT, code=code, keep=job.keep)
    if job.keep:
        stay_up()
    power_off()


if __name__ == "__main__":
    try:
        main()
    except BaseException as err:  # PID 1 must never exit: the kernel would panic
        log(f"init failed: {type(err).__name__}: {err}")
        power_off()
