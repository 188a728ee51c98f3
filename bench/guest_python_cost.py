"""Guest side of bench/python_overhead.py (standard library only, runs in the lab guest).

For each slot count: build the move test's VM, then time the move test's host loop
(two KVM_SET_USER_MEMORY_REGION calls per iteration, plus the loop's bookkeeping) once
for real and once with the ioctl replaced by a no-op. The second is what Python alone
costs per iteration; the first, the operation as the test measures it without a guest.

    python3 guest_python_cost.py --json OUT SLOTS...
"""

import argparse
import json
import time
import types

import kselftest_py.kvm as kvm_module
from kselftest_py.kvm import KvmSystem
from kselftest_py.memslot_guests import GuestParams, move_guest
from kselftest_py.memslot_perf import Sizes, move_active_prepare, move_loop
from kselftest_py.memslot_vm import TestVm

ITERATIONS = 2000


def per_iteration_ns(vm: TestVm, sizes: Sizes, updates: tuple) -> float:
    """The move test's loop body as run_once runs it: the clock, the loop, the check."""
    started = time.perf_counter_ns()
    for _ in range(ITERATIONS):
        time.monotonic_ns()
        move_loop(vm, sizes, False, updates)
        vm.check()
    return (time.perf_counter_ns() - started) / ITERATIONS


def measure(kvm: KvmSystem, slots: int) -> dict:
    sizes = Sizes()
    code = move_guest(GuestParams(move_size=sizes.move_size))
    vm = TestVm(kvm, code, sizes.mem_size // 4096, slots - 1, sync_timeout_s=60)
    try:
        updates = move_active_prepare(vm, sizes)
        real = per_iteration_ns(vm, sizes, updates)
        real_fcntl = kvm_module.fcntl
        kvm_module.fcntl = types.SimpleNamespace(ioctl=lambda fd, request, arg=0: 0)
        try:
            python_only = per_iteration_ns(vm, sizes, updates)
        finally:
            kvm_module.fcntl = real_fcntl
    finally:
        vm.close()
    return {"slots": slots, "iteration_ns": real, "python_only_ns": python_only}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("slots", type=int, nargs="+")
    args = parser.parse_args()
    with KvmSystem() as kvm:
        rows = [measure(kvm, slots) for slots in args.slots]
    with open(args.json, "w") as handle:
        json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
