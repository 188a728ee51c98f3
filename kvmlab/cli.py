"""The ``kvmlab`` command line: thin argument handling over the library modules."""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from kvmlab import image, kernels, runner, runs
from kvmlab.errors import KvmlabError

EXIT_INTERRUPTED = 130


def _kernel_fetch(args: argparse.Namespace) -> int:
    kernel = kernels.fetch(args.spec, debuginfo=args.debuginfo)
    if args.json:
        print(json.dumps(kernel.to_json(), indent=2))
    else:
        origin = kernel.package or f"KVM modules rebuilt in {kernel.store}"
        print(f"{kernel.spec}: {kernel.release} ({origin}, {kernel.version})")
        print(f"  vmlinuz  {kernel.vmlinuz}")
        if kernel.vmlinux:
            print(f"  vmlinux  {kernel.vmlinux}")
    return 0


def _kernel_list(args: argparse.Namespace) -> int:
    rows = kernels.cached()
    if args.json:
        print(json.dumps([k.to_json() for k in rows], indent=2))
        return 0
    if not rows:
        print("no kernels cached; try: kvmlab kernel fetch debian:bookworm")
    for kernel in rows:
        debug = "debuginfo" if kernel.vmlinux else "no debuginfo"
        print(f"{kernel.release:32} {kernel.version or '':14} {debug:13} {kernel.vmlinuz.parent}")
    return 0


def _kernel_build(args: argparse.Namespace) -> int:
    from kvmlab import kernel_build

    patches = [p for path in args.patch for p in kernel_build.patch_series.series(path)]
    options = kernel_build.BuildOptions(
        tree=args.tree, out=args.out, patches=patches, fragments=args.config, base_config=args.base_config,
        kasan=args.kasan, lockdep=args.lockdep, jobs=args.jobs)
    print(kernel_build.build(options))
    return 0


def _qemu_fetch(args: argparse.Namespace) -> int:
    from kvmlab import emulator

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


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KvmlabError(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _existing(paths: list[Path]) -> list[Path]:
    for path in paths:
        if not path.exists():
            raise KvmlabError(f"--add: {path} does not exist")
    return paths


def _trace_options(args: argparse.Namespace) -> dict | None:
    if not args.trace:
        return None
    from traces import probes

    spec = probes.load(args.trace)
    if args.trace_buffer_kb is not None and args.trace_buffer_kb <= 0:
        raise KvmlabError("--trace-buffer-kb wants a positive size")
    spec.update(buffer_kb=args.trace_buffer_kb, profile=args.trace_profile,
                file_version=args.trace_file_version, compression=args.trace_compression)
    return spec


def _trace_summary(results: Path) -> None:
    """What was traced and what was lost, said after every traced run."""
    capture_path, trace_path = results / "capture.json", results / "trace.dat"
    if not capture_path.exists():
        print("kvmlab: trace: the guest wrote no capture.json (the capture did not run)", file=sys.stderr)
        return
    capture = json.loads(capture_path.read_text())
    if capture.get("error"):
        print(f"kvmlab: trace: {capture['error']}", file=sys.stderr)
    skipped = capture.get("skipped_functions", []) + capture.get("skipped_events", [])
    print(f"kvmlab: trace: probe set {capture['set']}: {len(capture.get('functions', []))} functions, "
          f"{len(capture.get('events', []))} events; not in this kernel: {', '.join(skipped) or 'none'}",
          file=sys.stderr)
    if not trace_path.exists():
        print("kvmlab: trace: no trace.dat came back", file=sys.stderr)
        return
    from traces.tracedat import TraceFile, TraceFileError

    try:
        losses = TraceFile.open(trace_path).describe_losses()
    except TraceFileError as err:
        print(f"kvmlab: trace: {err}", file=sys.stderr)
        return
    print(f"kvmlab: trace: {trace_path}; {'; '.join(losses) or 'no events lost'}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if not command:
        raise KvmlabError("kvmlab run: no command given; usage: kvmlab run KERNEL -- CMD ARGS...")
    if args.check_invariants_every is not None and args.check_invariants_every <= 0:
        raise KvmlabError("--check-invariants-every wants a positive number of seconds")
    kernel = kernels.fetch(args.kernel, debuginfo=args.check_invariants_every is not None)
    options = runner.RunOptions(
        argv=command, timeout_s=args.timeout, stall_s=args.stall_timeout,
        cpus=args.cpus, memory_mb=args.memory,
        accel=args.accel, clock=args.clock, keep=args.keep, out=args.out, env=_parse_env(args.env),
        append=args.append, recipe=args.recipe, added=_existing(args.add),
        check_every_s=args.check_invariants_every, trace=_trace_options(args),
    )
    result = runner.run(kernel, options)
    if result.message:
        print(f"kvmlab: {result.message}", file=sys.stderr)
    if result.checks is not None and result.outcome != "invariant":
        print(f"kvmlab: {result.checks.summary()}", file=sys.stderr)
    if options.trace:
        _trace_summary(options.out or result.run_dir / "results")
    boot = f"userspace at {result.boot_s:.1f} s, " if result.boot_s is not None else ""
    if result.ready_s is not None:
        boot += f"job started at {result.ready_s:.1f} s, "
    print(
        f"kvmlab: {result.outcome}, exit {result.exit_code} ({boot}{result.total_s:.1f} s in all); "
        f"console log {result.run_dir / 'console.log'}",
        file=sys.stderr,
    )
    return result.exit_code


def _stop(args: argparse.Namespace) -> int:
    vms = runs.kept()
    if args.run:
        wanted = runs.resolve(args.run)
        vms = [vm for vm in vms if vm.run_dir == wanted]
        if not vms:
            raise KvmlabError(f"run {args.run} has no VM running")
    for vm in vms:
        runs.stop(vm)
        print(f"stopped {vm.run_dir.name} (pid {vm.pid})")
    if not vms:
        print("no kept VMs running")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from drgn_scripts import memslot_invariants, memslots
    from kvmlab import inspect

    where = inspect.target(args.target, args.kernel)
    snapshot = inspect.Inspector(where).snapshot(check=args.check, pid=args.pid)
    paused = "paused" if where.control_socket else "NOT paused (not a kvmlab run): may be inconsistent"
    if args.json:
        record = {"target": where.name, "read_s": snapshot.read_s, "paused_s": snapshot.paused_s,
                  "vms": [vm.to_json() for vm in snapshot.vms]}
        if args.check:
            record["violations"] = memslot_invariants.to_json(snapshot.violations)
        print(json.dumps(record))
    elif args.check:
        print(memslot_invariants.render(snapshot.violations) if snapshot.violations else
              f"{len(snapshot.vms)} VMs checked, no violations")
    else:
        print(memslots.render(snapshot.vms))
    if not args.json:
        print(f"kvmlab: read {where.name} in {snapshot.read_s:.2f} s, guest {paused}", file=sys.stderr)
    return 1 if snapshot.violations else 0


def _trace_report(args: argparse.Namespace) -> int:
    from traces import report

    runs = [report.load_run(directory, args.partial) for directory in args.dirs]
    for run in runs:
        if run.damage:
            print(f"kvmlab: warning: {run.damage}; reporting the events before it", file=sys.stderr)
    report.distinct_kernels(runs)
    summary, comparison = report.summarize(runs), report.compare(runs)
    print(report.markdown(summary, comparison))
    for run in runs:
        if run.profile_check is not None:
            print("\n" + report.profile_markdown(run))
    for run in runs:
        if run.losses:
            print(f"kvmlab: {run.directory}: {'; '.join(run.losses)}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.out / "latency.csv", index=False)
    if not comparison.empty:
        comparison.to_csv(args.out / "comparison.csv", index=False)
    for run in runs:
        run.calls.to_csv(args.out / f"calls-{run.directory.name}.csv", index=False)
    plots = report.plot(runs, args.out)
    print(f"kvmlab: wrote latency.csv, {len(plots)} plots and the calls tables to {args.out}",
          file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kvmlab", description=__doc__)
    sub = top.add_subparsers(dest="verb", required=True)

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

    run = sub.add_parser("run", help="boot KERNEL and run a command in the guest",
                         usage="kvmlab run KERNEL [options] -- CMD [ARGS...]")
    run.add_argument("kernel", help=kernels.SPEC_HELP)
    run.add_argument("--timeout", type=float, default=600.0, help="seconds before a hang is declared (600)")
    run.add_argument("--stall-timeout", type=float, default=90.0,
                     help="seconds without the guest's heartbeat before a hang is declared (90; 0: off)")
    run.add_argument("--cpus", type=int, default=2, help="guest vCPUs (2)")
    run.add_argument("--memory", type=int, default=4096, help="guest memory in MiB (4096)")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], default=None,
                     help="accelerator (auto: KVM only with nested virtualisation)")
    run.add_argument("--clock", choices=["auto", "icount", "wall"], default=None,
                     help="guest clock: wall (default: host time) or icount (TCG only: emulated "
                          "instructions, reproducible timings)")
    run.add_argument("--keep", action="store_true", help="leave the VM running after CMD")
    run.add_argument("--out", type=Path, help="copy the guest's $KVMLAB_RESULTS here")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--append", default="", help="extra kernel command-line arguments")
    run.add_argument("--recipe", default=image.DEFAULT_RECIPE, help="guest image recipe")
    run.add_argument("--add", type=Path, action="append", default=[], metavar="PATH",
                     help="copy a host file or directory into the guest's /opt/kvmlab/add/")
    run.add_argument("--check-invariants-every", type=float, metavar="SECONDS",
                     help="pause the guest this often, check its KVM memslot invariants with drgn, "
                          "resume (fetches the kernel's debuginfo)")
    run.add_argument("--trace", metavar="SET",
                     help="record the job with ftrace using probe set SET (traces/probes/SET.toml); "
                          "trace.dat and capture.json come back with the results")
    run.add_argument("--trace-buffer-kb", type=int, metavar="KB",
                     help="ftrace ring buffer per CPU (trace-cmd record -b)")
    run.add_argument("--trace-profile", action="store_true",
                     help="also time the same functions with kprobes and hist triggers, aggregated in the "
                          "kernel (a second opinion; needs CONFIG_HIST_TRIGGERS)")
    run.add_argument("--trace-file-version", type=int, choices=[6, 7],
                     help="trace.dat format (default: trace-cmd's)")
    run.add_argument("--trace-compression", help="trace.dat v7 compression (zstd, zlib, any)")
    run.set_defaults(command=[])
    run.set_defaults(func=_run)

    inspect = sub.add_parser("inspect", help="dump or check a lab VM's KVM memslots with drgn")
    inspect.add_argument("target", nargs="?",
                         help="run name or directory, or a QMP socket (default: the newest kept VM)")
    inspect.add_argument("--check", action="store_true",
                         help="check the memslot invariants (exit 1 on a violation)")
    inspect.add_argument("--json", action="store_true", help="one JSON record instead of tables")
    inspect.add_argument("--pid", type=int, help="only the VMs of this guest process")
    inspect.add_argument("--kernel", help="the kernel spec, for a QMP socket kvmlab did not start")
    inspect.set_defaults(func=_inspect)

    trace = sub.add_parser("trace", help="traced runs").add_subparsers(dest="trace_verb", required=True)
    trace_report = trace.add_parser("report", help="latency tables and plots from kvmlab run --trace results")
    trace_report.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                              help="results directories (trace.dat + capture.json); "
                                   "the first kernel is the base")
    trace_report.add_argument("-o", "--out", type=Path, default=Path("trace-report"),
                              help="where the CSV tables and PNG plots go (trace-report/)")
    trace_report.add_argument("--partial", action="store_true",
                              help="read a truncated or corrupt trace.dat up to the damage, not fail")
    trace_report.set_defaults(func=_trace_report)

    from kvmlab.qualify import command as qualify_command

    qualify_command.add_parser(sub)

    stop = sub.add_parser("stop", help="stop kept VMs (all, or one run)")
    stop.add_argument("run", nargs="?", help="run name or directory")
    stop.set_defaults(func=_stop)
    return top


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C must always reach us, even when started with SIGINT ignored (a background
    # job of a non-interactive shell): it is what kills QEMU and cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = parser().parse_args(argv)
    if command:
        args.command = command
    try:
        return args.func(args)
    except KvmlabError as err:
        print(f"kvmlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kvmlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
