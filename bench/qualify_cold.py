"""How long `make qualify` (or `make qualify-32k`) takes, from an empty cache or a warm one.

Runs the Makefile's target with KVMLAB_CACHE pointing at a fresh directory, so the
kernels and kvmlab's QEMU are downloaded, the guest image built and the guests booted
as on a new machine (the venv and system packages are kept); ``--warm`` keeps the
cache, with whatever templates it holds (``--no-templates``: none of them, so every
template is made again). Prints the report, the wall time, the boots, guests and runs
behind it, and the verdict line.

    python bench/qualify_cold.py [--target qualify|qualify-32k] [--warm [--no-templates]]
        [--fresh-boot] [--keep DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["qualify", "qualify-32k"], default="qualify")
    parser.add_argument("--warm", action="store_true", help="keep the cache (kernels, QEMU, image)")
    parser.add_argument("--no-templates", action="store_true",
                        help="with --warm: move the cache's templates aside for the run (put back after)")
    parser.add_argument("--fresh-boot", action="store_true", help="qualify --fresh-boot: boot every guest")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="copy the qualification's directory here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmlab-cold-") as scratch:
        env = dict(os.environ) if args.warm else {**os.environ, "KVMLAB_CACHE": f"{scratch}/cache"}
        out = Path(scratch) / "out"
        aside = _templates_aside(Path(scratch)) if args.warm and args.no_templates else None
        extra = ["QUALIFY_ARGS=--fresh-boot"] if args.fresh_boot else []
        started = time.monotonic()
        try:
            done = subprocess.run(["make", "-s", args.target, f"QUALIFY_DIR={out}", *extra], cwd=REPO,
                                  env=env, capture_output=True, text=True)
        finally:
            if aside is not None:
                _templates_back(aside)
        took = time.monotonic() - started
        records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()] \
            if (out / "runs.jsonl").exists() else []
        if args.keep and out.is_dir():
            shutil.copytree(out, args.keep)
    print(done.stdout)
    verdict = next((line for line in done.stdout.splitlines() if line.startswith("Verdict:")), "no verdict")
    guests = {r["boot"] for r in records if r.get("boot")}
    restored = {r["boot"] for r in records if r.get("restored")}
    boots = len(guests - restored) + len({r["template_boot"] for r in records if r.get("restored")})
    runs = sum(r["kind"] == "run" for r in records)
    cache = "a warm cache" if args.warm else "an empty cache"
    if args.warm and args.no_templates:
        cache += " without templates"
    print(f"make {args.target} from {cache}: {took / 60:.1f} min, {len(guests)} guests ({len(restored)} "
          f"restored), behind them {boots} boots, {runs} runs (one measurement); {verdict}")
    if done.returncode not in (0, 2):
        print(done.stderr[-3000:], file=sys.stderr)
    return 0 if verdict != "no verdict" else 1


def _templates_aside(scratch: Path) -> Path:
    from kvmlab.vm import template

    aside = template.area().with_name("templates.bench-aside")
    template.area().rename(aside)
    return aside


def _templates_back(aside: Path) -> None:
    from kvmlab.vm import template

    made = template.area()
    shutil.rmtree(made, ignore_errors=True)  # the ones this run made, which the measured guests used
    aside.rename(made)


if __name__ == "__main__":
    sys.exit(main())
