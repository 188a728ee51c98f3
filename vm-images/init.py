#!/usr/bin/python3
"""kvmlab's guest init: set up the guest, run the job, report back, power off.

Runs as PID 1 from the per-run initramfs layer (``rdinit=/kvmlab/init``) on the
image's python3 with the standard library only. The host↔guest contract:

- the job is /kvmlab/job.json: ``argv``, ``env``, ``modules`` to load, ``keep``;
- the job's stdout and stderr go to the virtio-serial ports ``kvmlab.stdout`` and
  ``kvmlab.stderr``; whatever the job wrote under $KVMLAB_RESULTS (/results) goes to
  ``kvmlab.results`` as a tar stream when it ends;
- ``kvmlab.status`` carries JSON lines: ``{"event": "ready"}`` when userspace is up,
  then ``{"event": "exit", "code": N}`` (or ``{"event": "init-error", ...}``);
- then the guest powers off, or with ``keep`` stays up for drgn or a person.

A kernel crash never reaches this code: the host reads it from the serial console.
"""

import ctypes
import json
import os
import subprocess
import sys
import tarfile
import threading
import time

JOB = "/kvmlab/job.json"
USERSPACE_MARK = "userspace reached"  # the host times the boot by this console line
RESULTS = "/results"
PORTS = ("kvmlab.status", "kvmlab.stdout", "kvmlab.stderr", "kvmlab.results")
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


def open_ports(timeout: float = 20.0) -> dict[str, int]:
    """Open the named virtio-serial ports (they appear a little after virtio_console loads)."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        base = "/sys/class/virtio-ports"
        for dev in os.listdir(base) if os.path.isdir(base) else []:
            try:
                name = open(f"{base}/{dev}/name").read().strip()
            except OSError:
                continue
            if name in PORTS and os.path.exists(f"/dev/{dev}"):
                found[name] = f"/dev/{dev}"
        if len(found) == len(PORTS):
            return {name: os.open(path, os.O_WRONLY) for name, path in found.items()}
        time.sleep(0.02)
    raise RuntimeError(f"virtio-serial ports missing: {sorted(set(PORTS) - set(found))}")


_STATUS_LOCK = threading.Lock()


def status(ports: dict[str, int], **record) -> None:
    """One JSON line on the status port; whole lines only, whichever thread writes."""
    line = (json.dumps(record) + "\n").encode()
    with _STATUS_LOCK:
        os.write(ports["kvmlab.status"], line)


HEARTBEAT_S = 2.0


def heartbeat(ports: dict[str, int]) -> None:
    """Tell the host every few seconds that the guest kernel still schedules us.

    A guest kernel that livelocks stops its clock and everything else; the host
    notices the silence long before the job's timeout.
    """

    def beat() -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            status(ports, event="heartbeat")

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def run_job(job: dict, ports: dict[str, int]) -> int:
    os.makedirs(RESULTS, exist_ok=True)
    env = {
        "PATH": PATH,
        "HOME": "/root",
        "TERM": "dumb",
        "PYTHONPATH": "/opt/kvmlab",
        "PYTHONDONTWRITEBYTECODE": "1",
        "KVMLAB_RESULTS": RESULTS,
        **job.get("env", {}),
    }
    os.makedirs("/root", exist_ok=True)
    try:
        child = subprocess.Popen(
            job["argv"], env=env, cwd="/root", stdin=subprocess.DEVNULL,
            stdout=ports["kvmlab.stdout"], stderr=ports["kvmlab.stderr"],
        )
    except OSError as err:
        os.write(ports["kvmlab.stderr"], f"kvmlab: cannot run {job['argv'][0]}: {err}\n".encode())
        return 127 if isinstance(err, FileNotFoundError) else 126
    code = child.wait()
    return code if code >= 0 else 128 - code


def send_results(ports: dict[str, int]) -> None:
    with os.fdopen(os.dup(ports["kvmlab.results"]), "wb") as stream:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            tar.add(RESULTS, arcname=".")


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
    log(USERSPACE_MARK)
    os.environ["PATH"] = PATH
    mount_all()
    with open(JOB) as handle:
        job = json.load(handle)
    with open("/proc/sys/kernel/hostname", "w") as handle:
        handle.write("kvmlab")
    failed = load_modules(job.get("modules", []))
    ports = open_ports()
    status(ports, event="ready", uptime=float(open("/proc/uptime").read().split()[0]),
           failed_modules=failed)
    heartbeat(ports)
    code = run_job(job, ports)
    send_results(ports)
    status(ports, event="exit", code=code, keep=bool(job.get("keep")))
    if job.get("keep"):
        stay_up()
    power_off()


if __name__ == "__main__":
    try:
        main()
    except BaseException as err:  # PID 1 must never exit: the kernel would panic
        log(f"init failed: {type(err).__name__}: {err}")
        power_off()
