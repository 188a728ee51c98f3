"""``kvmlab inspect``: dump or check a lab VM's KVM memslots with drgn."""

import argparse
import json
import sys

from drgn_scripts import memslot_invariants, memslots
from kvmlab import kernels
from kvmlab.errors import KvmlabError
from kvmlab.inspect import attach, interactive, reader
from kvmlab.vm import boot, runner, runs


def _inspect(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise KvmlabError("--timeout wants a positive number of seconds")
    if args.interactive and (args.check or args.json or args.pid is not None):
        raise KvmlabError("--interactive takes no --check, --json or --pid: its helpers do those")
    if args.boot is not None:
        return _boot_and_interact(args)
    if args.interactive:
        where = attach.target(args.target, args.kernel)
        return interactive.run(where, args.timeout)
    where = attach.target(args.target, args.kernel)
    snapshot = reader.snapshot(where, args.timeout, check=args.check, pid=args.pid)
    paused = ("paused" if where.control_socket else
              f"as it panicked (from {where.vmcore})" if where.vmcore else
              "NOT paused (not a kvmlab run): may be inconsistent")
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


def _boot_and_interact(args: argparse.Namespace) -> int:
    """Boot ``--boot SPEC`` kept (running ``-- CMD`` first, if given), open the session on
    it, and stop the VM when the session ends, however it ends."""
    if not args.interactive or args.target is not None:
        raise KvmlabError("--boot SPEC goes with -i and no RUN: it boots the VM the session attaches to")
    kernel = kernels.fetch(args.boot, debuginfo=True)
    options = boot.RunOptions(argv=getattr(args, "command", None) or ["true"], keep=True)
    result = runner.run(kernel, options)
    if result.outcome != "kept":
        first = result.message.splitlines()[0] if result.message else result.outcome
        raise KvmlabError(f"the VM for the session did not stay up ({result.outcome}, exit "
                          f"{result.exit_code}): {first}")
    pid = runs.read(result.run_dir)["qemu_pid"]
    try:
        return interactive.run(attach.target(str(result.run_dir)), args.timeout)
    finally:
        runs.stop(runs.KeptVm(result.run_dir, pid, result.run_dir / "qmp.sock"))
        print(f"kvmlab: stopped {result.run_dir.name}", file=sys.stderr)


def add_parsers(sub) -> None:
    attach_parser = sub.add_parser("inspect", help="dump or check a lab VM's KVM memslots with drgn")
    attach_parser.add_argument("target", nargs="?",
                         help="run name or directory, or a QMP socket (default: the newest kept VM)")
    attach_parser.add_argument("-i", "--interactive", action="store_true",
                               help="drgn's interactive shell on the VM, with kvmlab's memslot helpers")
    attach_parser.add_argument("--boot", metavar="SPEC",
                               help="with -i: boot SPEC for the session (running -- CMD first, if "
                                    "given) and stop it when the session ends")
    attach_parser.add_argument("--check", action="store_true",
                         help="check the memslot invariants (exit 1 on a violation)")
    attach_parser.add_argument("--json", action="store_true", help="one JSON record instead of tables")
    attach_parser.add_argument("--pid", type=int, help="only the VMs of this guest process")
    attach_parser.add_argument("--kernel", help="the kernel spec, for a QMP socket kvmlab did not start")
    attach_parser.add_argument("--timeout", type=float, default=attach.TIMEOUT_S, metavar="S",
                               help="how long QEMU may take to answer: to let drgn in, and each "
                                    "command and read after that (default %(default)g s; inf: no "
                                    "limit); exceeded: one line, exit 2")
    attach_parser.set_defaults(func=_inspect)

