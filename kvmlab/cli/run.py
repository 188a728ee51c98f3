"""``kvmlab run`` and ``kvmlab stop``: boot a kernel, run one command in the guest, say how it went."""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab import kernels
from kvmlab.errors import KvmlabError
from kvmlab.inspect.watch import InvariantWatch
from kvmlab.vm import boot, image, runner, runs
from traces import probes
from traces.errors import TraceError, require_regular_file

#: What ``trace-cmd convert --compression`` takes.
TRACE_COMPRESSIONS = ("zstd", "zlib", "any", "none")


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


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse what argparse's float and int let through: nan, inf, zero and negatives."""
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise KvmlabError(f"--timeout wants a positive number of seconds, got {args.timeout:g}")
    if not (math.isfinite(args.stall_timeout) and args.stall_timeout >= 0):
        raise KvmlabError(f"--stall-timeout wants a number of seconds (0: off), got {args.stall_timeout:g}")
    if args.cpus < 1:
        raise KvmlabError(f"--cpus wants a positive number of vCPUs, got {args.cpus}")
    if args.memory < 1:
        raise KvmlabError(f"--memory wants a positive size in MiB, got {args.memory}")
    every = args.check_invariants_every
    if every is not None and not (math.isfinite(every) and every > 0):
        raise KvmlabError(f"--check-invariants-every wants a positive number of seconds, got {every:g}")


def _check_out(out: Path | None) -> None:
    """--out must be a directory kvmlab can write, or one it can create: found only after
    the boot, a file there would cost the run's results."""
    if out is None:
        return
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise KvmlabError(f"--out {out} is not writable")
        return
    if os.path.lexists(out):  # a file, a FIFO, a dangling symlink or a symlink loop
        raise KvmlabError(f"--out {out} exists and is not a directory")
    parent = next(p for p in out.absolute().parents if os.path.lexists(p))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise KvmlabError(f"--out {out} cannot be created: {parent} is not a writable directory")


def _trace_options(args: argparse.Namespace) -> dict | None:
    """The probe set and capture settings for the guest (None: no --trace), checked."""
    if args.trace_buffer_kb is not None and args.trace_buffer_kb <= 0:
        raise KvmlabError("--trace-buffer-kb wants a positive size")
    if args.trace_compression is not None and args.trace_compression not in TRACE_COMPRESSIONS:
        raise KvmlabError(f"--trace-compression wants one of {', '.join(TRACE_COMPRESSIONS)}, "
                          f"got {args.trace_compression!r}")
    if args.trace_compression not in (None, "none") and args.trace_file_version == 6:
        raise KvmlabError("--trace-compression needs --trace-file-version 7: "
                          "version 6 files are not compressed")
    if not args.trace:
        return None
    spec = probes.load(args.trace)
    spec.update(buffer_kb=args.trace_buffer_kb, profile=args.trace_profile,
                file_version=args.trace_file_version, compression=args.trace_compression)
    return spec


def _trace_summary(results: Path) -> None:
    """What was traced and what was lost, said after every traced run."""
    capture_path, trace_path = results / "capture.json", results / "trace.dat"
    if not capture_path.exists():
        print("kvmlab: trace: the guest wrote no capture.json (the capture did not run)", file=sys.stderr)
        return
    try:
        require_regular_file(capture_path)
        capture = json.loads(capture_path.read_text())
        capture["set"]
    except (OSError, ValueError, KeyError, TypeError, TraceError) as err:
        print(f"kvmlab: trace: {capture_path} is damaged ({err!r})", file=sys.stderr)
        return
    if capture.get("error"):
        print(f"kvmlab: trace: {capture['error']}", file=sys.stderr)
    skipped = capture.get("skipped_functions", []) + capture.get("skipped_events", [])
    print(f"kvmlab: trace: probe set {capture['set']}: {len(capture.get('functions', []))} functions, "
          f"{len(capture.get('events', []))} events; not in this kernel: {', '.join(skipped) or 'none'}",
          file=sys.stderr)
    if not trace_path.exists():
        print("kvmlab: trace: no trace.dat came back", file=sys.stderr)
        return
    from traces.tracedat import TraceFile  # pandas: only after a traced run

    try:
        losses = TraceFile.open(trace_path).describe_losses()
    except TraceError as err:  # damaged, or not a regular file: the run's own outcome still counts
        print(f"kvmlab: trace: {err}", file=sys.stderr)
        return
    print(f"kvmlab: trace: {trace_path}; {'; '.join(losses) or 'no events lost'}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if not command:
        raise KvmlabError("kvmlab run: no command given; usage: kvmlab run KERNEL -- CMD ARGS...")
    # Every option is checked before the kernel is fetched or a run directory made.
    _check_numbers(args)
    _check_out(args.out)
    env, added, trace = _parse_env(args.env), _existing(args.add), _trace_options(args)
    kernel = kernels.fetch(args.kernel, debuginfo=args.check_invariants_every is not None)
    checker = None
    if args.check_invariants_every is not None:
        checker = InvariantWatch.every(kernel, args.check_invariants_every)
    options = boot.RunOptions(
        argv=command, timeout_s=args.timeout, stall_s=args.stall_timeout,
        cpus=args.cpus, memory_mb=args.memory,
        accel=args.accel, clock=args.clock, keep=args.keep, out=args.out, env=env,
        append=args.append, recipe=args.recipe, added=added,
        checker=checker, trace=trace, fresh_boot=args.fresh_boot,
    )
    result = runner.run(kernel, options)
    if result.message:
        print(f"kvmlab: {result.message}", file=sys.stderr)
    if result.checks is not None and result.outcome != "invariant":
        print(f"kvmlab: {result.checks.summary()}", file=sys.stderr)
    if options.trace:
        _trace_summary(options.out or result.run_dir / "results")
    times = f"userspace at {result.boot_s:.1f} s, " if result.boot_s is not None else ""
    if result.ready_s is not None and result.boot_s is not None:
        times += f"job started at {result.ready_s:.1f} s, "
    restored = runs.read(result.run_dir).get("template")
    if restored:
        times += f"restored from {restored}, "
    print(
        f"kvmlab: {result.outcome}, exit {result.exit_code} ({times}{result.total_s:.1f} s in all); "
        f"console log {result.run_dir / 'console.log'}",
        file=sys.stderr,
    )
    return result.exit_code


def _stop(args: argparse.Namespace) -> int:
    vms = runs.kept()
    if args.run is not None:  # an empty name is a name that matches no run, not "all of them"
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
    run.add_argument("--keep", action="store_true",
                     help="leave the VM running after CMD (boots the kernel: a kept guest is never restored)")
    run.add_argument("--fresh-boot", action="store_true",
                     help="boot the kernel instead of restoring its saved guest (a template, made by "
                          "the first run of each kernel and settings)")
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
    run.add_argument("--trace-compression",
                     help=f"trace.dat v7 compression ({', '.join(TRACE_COMPRESSIONS)})")
    run.set_defaults(command=[])
    run.set_defaults(func=_run)


    stop = sub.add_parser("stop", help="stop kept VMs (all, or one run)")
    stop.add_argument("run", nargs="?", help="run name or directory")
    stop.set_defaults(func=_stop)
