"""What a command keeps on disk at its peak: ``du`` of the places it writes, every few seconds.

    python bench/disk_peak.py -- .ci/run          # in a fresh clone, with the cache moved aside

The README's figure for a cold ``make test`` came from sampling these places while it ran:
kvmlab's cache (and its templates, counted within it), pytest's temporary directories,
the clone with its venv, and /dev/shm, where a template's memory lives while it boots.
"""

from __future__ import annotations

import argparse
import getpass
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmlab import cache


def places() -> dict[str, Path]:
    return {"cache": cache.root(), "templates": cache.root() / "templates",
            "pytest": Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}",
            "clone": Path.cwd(), "shm": Path("/dev/shm")}


def megabytes(path: Path) -> int:
    done = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=False)
    return int(done.stdout.split()[0]) if done.stdout.strip() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=20.0, help="seconds between samples (20)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --")
    started = time.monotonic()
    process = subprocess.Popen(command)
    samples = []
    while True:
        sizes = {name: megabytes(path) for name, path in places().items()}
        total = sum(size for name, size in sizes.items() if name != "templates")
        samples.append((total, sizes))
        if process.poll() is not None:
            break
        time.sleep(args.every)
    total, sizes = max(samples, key=lambda sample: sample[0])
    parts = ", ".join(f"{name} {size / 1024:.1f} GB" for name, size in sizes.items())
    print(f"disk_peak: {' '.join(command)} exited {process.returncode} after "
          f"{time.monotonic() - started:.0f} s; peak {total / 1024:.1f} GB ({parts}; "
          f"templates counted within the cache) in {len(samples)} samples {args.every:g} s apart")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
