"""``kvmlab kernel``, ``kvmlab qemu`` and ``kvmlab image``: get the parts a run boots."""

import argparse
import json
import os
import sys
from pathlib import Path

from kvmlab import kernels
from kvmlab.kernels import build as kernel_build
from kvmlab.kernels import debian, patches, paths
from kvmlab.kernels.model import Kernel
from kvmlab.vm import emulator, image


def _kernel_fetch(args: argparse.Namespace) -> int:
    kernel = kernels.fetch(args.spec, debuginfo=args.debuginfo)
    if args.json:
        print(json.dumps(kernel.to_json(), indent=2))
    else:
        print(f"{kernel.spec}: {kernel.release} ({_origin(kernel)})")
        print(f"  vmlinuz  {kernel.vmlinuz}")
        if kernel.vmlinux:
            print(f"  vmlinux  {kernel.vmlinux}")
    return 0


def _origin(kernel: Kernel) -> str:
    """Where a fetched kernel came from, as ``kernel fetch`` says it."""
    if kernel.package is None:
        return "a local build"
    debian_package = f"{kernel.package}, {kernel.version}"
    if kernel.patches is not None:  # kvm-modules: the Debian image, with its KVM modules rebuilt
        return f"{debian_package}; KVM modules rebuilt in {kernel.store}"
    return debian_package


def _kernel_list(args: argparse.Namespace) -> int:
    damaged: list[str] = []
    rows = debian.cached(damaged)
    for problem in damaged:
        print(f"kvmlab: warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps([k.to_json() for k in rows], indent=2))
        return 0
    if not rows:
        print("no kernels cached; try: kvmlab kernel fetch debian:bookworm")
    else:
        print(f"{'RELEASE':32} {'VERSION':16} {'SOURCE':34} {'DEBUGINFO':12} PATH")
    for kernel in rows:
        debug = "yes" if kernel.vmlinux else "no"
        source = f"debian:{kernel.suite or '?'} ({len(kernel.parts or []) or 1} pkg)"
        print(f"{kernel.release:32} {kernel.version or '':16} {source:34} {debug:12} {kernel.vmlinuz.parent}")
    return 0


def _kernel_build(args: argparse.Namespace) -> int:
    series = [p for path in args.patch for p in patches.series(paths.expanded(path, "patch"))]
    options = kernel_build.BuildOptions(
        tree=args.tree, out=args.out, patches=series, fragments=args.config, base_config=args.base_config,
        kasan=args.kasan, lockdep=args.lockdep, jobs=args.jobs)
    print(kernel_build.build(options))
    return 0


def _qemu_fetch(args: argparse.Namespace) -> int:

    fetched = emulator.fetch()
    if args.json:
        print(json.dumps(fetched.to_json(), indent=2))
    else:
        print(f"{fetched.describe()}: {fetched.binary}")
    return 0


def _image_build(args: argparse.Namespace) -> int:
    path = image.build(image.recipe(args.recipe), force=args.force)
    print(path)
    return 0


def add_parsers(sub) -> None:
    kernel = sub.add_parser("kernel", help="fetch and list kernels").add_subparsers(
        dest="kernel_verb", required=True)
    fetch = kernel.add_parser("fetch", help="fetch a kernel into the cache")
    fetch.add_argument("spec", help=kernels.SPEC_HELP)
    fetch.add_argument("--debuginfo", action="store_true", help="also fetch vmlinux/modules with DWARF")
    fetch.add_argument("--json", action="store_true")
    fetch.set_defaults(func=_kernel_fetch)
    kbuild = kernel.add_parser("build", help="build a lab kernel from a source tree (boot it as local:OUT)")
    kbuild.add_argument("tree", type=Path, help="a Linux source tree (git checkout or unpacked linux-source)")
    kbuild.add_argument("-o", "--out", type=Path, help="build directory (TREE/kvmlab-build)")
    kbuild.add_argument("--patch", type=Path, action="append", default=[],
                        help="a patch, mbox or directory of patches to apply to TREE first (git am)")
    kbuild.add_argument("--config", type=Path, action="append", default=[], metavar="FRAGMENT",
                        help="a config fragment merged last")
    kbuild.add_argument("--base-config", type=Path, help="start from this .config, not x86_64_defconfig")
    kbuild.add_argument("--kasan", action="store_true", help="with KASAN")
    kbuild.add_argument("--lockdep", action="store_true", help="with lockdep (PROVE_LOCKING)")
    kbuild.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    kbuild.set_defaults(func=_kernel_build)
    listing = kernel.add_parser("list", help="kernels in the cache")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_kernel_list)

    qemu_parser = sub.add_parser("qemu", help="kvmlab's pinned QEMU").add_subparsers(
        dest="qemu_verb", required=True)
    qemu_fetch = qemu_parser.add_parser(
        "fetch", help="fetch kvmlab's QEMU (Debian bookworm-backports, verified by apt) into the cache")
    qemu_fetch.add_argument("--json", action="store_true")
    qemu_fetch.set_defaults(func=_qemu_fetch)

    img = sub.add_parser("image", help="guest images").add_subparsers(dest="image_verb", required=True)
    build = img.add_parser("build", help="build the guest image (cached by recipe hash)")
    build.add_argument("--recipe", default=image.DEFAULT_RECIPE)
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_image_build)

