"""How long `make qualify` takes from an empty cache (target: <= 15 min on 2 cores).

Runs the Makefile's qualify matrix with KVMLAB_CACHE pointing at a fresh directory, so
the kernels and kvmlab's QEMU are downloaded, the guest image built and both guests
booted as on a new machine (the venv and system packages are kept), and prints the
report, the wall time and the verdict line.

    python bench/qualify_cold.py
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmlab-cold-") as scratch:
        env = {**os.environ, "KVMLAB_CACHE": f"{scratch}/cache"}
        started = time.monotonic()
        done = subprocess.run(["make", "-s", "qualify", f"QUALIFY_DIR={scratch}/out"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        took = time.monotonic() - started
    print(done.stdout)
    verdict = next((line for line in done.stdout.splitlines() if line.startswith("Verdict:")), "no verdict")
    print(f"make qualify from an empty cache: {took / 60:.1f} min (target <= 15); {verdict}")
    return 0 if verdict != "no verdict" else 1


if __name__ == "__main__":
    sys.exit(main())
