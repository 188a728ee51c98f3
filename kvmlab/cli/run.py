"""``kvmlab run`` and ``kvmlab stop``: boot a kernel, run one command in the guest, say how it went."""

import argparse
import json
import sys
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab import kernels
from kvmlab.errors import KvmlabError
from kvmlab.inspect.watch import InvariantWatch
from kvmlab.vm import boot, image, runner, runs
from traces import probes
from traces.tracedat import TraceFile, TraceFileError


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
    checker = None
    if args.check_invariants_every is not None:
        checker = InvariantWatch.every(kernel, args.check_invariants_every)
    options = boot.RunOptions(
        argv=command, timeout_s=args.timeout, stall_s=args.stall_timeout,
        cpus=args.cpus, memory_mb=args.memory,
        accel=args.accel, clock=args.clock, keep=args.keep, out=args.out, env=_parse_env(args.env),
        append=args.append, recipe=args.recipe, added=_existing(args.add),
        checker=checker, trace=_trace_options(args),
    )
    result = runner.run(kernel, options)
    if result.message:
        print(f"kvmlab: {result.message}", file=sys.stderr)
    if result.checks is not None and result.outcome != "invariant":
        print(f"kvmlab: {result.checks.summary()}", file=sys.stderr)
    if options.trace:
        _trace_summary(options.out or result.run_dir / "results")
    times = f"userspace at {result.boot_s:.1f} s, " if result.boot_s is not None else ""
    if result.ready_s is not None:
        times += f"job started at {result.ready_s:.1f} s, "
    print(
        f"kvmlab: {result.outcome}, exit {result.exit_code} ({times}{result.total_s:.1f} s in all); "
        f"console log {result.run_dir / 'console.log'}",
        file=sys.stderr,
    )
    return result.exit_code


def _stop(args: argparse.Namespace) -> int:
    vms = runs.kept()
    if args.run:
        wanted = runs.resolve(args.run)
        runs.read(wanted)  # a damaged run.json is named, not taken for a VM that ended
        vms = [vm for vm in vms if vm.run_dir == wanted]
        if not vms:
            raise KvmlabError(f"run {args.run} has no VM running")
    for vm in vms:
        runs.stop(vm)
        print(f"stopped {vm.run_dir.name} (pid {vm.pid})")
    if not vms:
        print("no kept VMs running")
    return 0


def add_parsers(sub) -> None:
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
                     help=f"copy a host file or directory into the guest's {protocol.ADDED}/")
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


    stop = sub.add_parser("stop", help="stop kept VMs (all, or one run)")
    stop.add_argument("run", nargs="?", help="run name or directory")
    stop.set_defaults(func=_stop)
