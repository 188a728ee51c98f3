"""Run a job under ftrace, in the guest: ``trace-cmd record`` around it, with a probe set.

    python3 -m traces.guest.capture SPEC.json -- CMD [ARGS...]

Runs inside the lab's guest, so it uses Python's standard library only. The host
(``kvmlab run --trace SET``) writes SPEC from ``traces/probes/<SET>.toml``: the set's
name, tracer, functions and events, and the buffer size and file format.

1. The set is resolved against the kernel: functions missing from
   ``available_filter_functions`` and events missing from ``available_events`` are
   skipped and listed; a set that matches nothing is an error (exit 2).
2. The tracer's own cost is calibrated on this kernel, because a memslot lookup costs
   less than function_graph's entry and exit: ``getppid()`` is timed with its syscall
   function traced and untraced, and the duration function_graph reports for it (a
   function that does almost nothing) is the floor of what it can time.
3. ``trace-cmd record`` starts in the background; once tracing is on, the job runs;
   then tracing is turned off, trace-cmd drains the buffers and is stopped with SIGINT.
   ``buffer_percent`` is set to 0 first: with the kernel's default (50), trace-cmd's
   readers sleep until a CPU's buffer is half full, and what is still in the buffers
   when trace-cmd stops is never recorded (seen: 19697 of 37108 events on 6.1). What
   is lost anyway shows in the per-CPU stats that trace.dat carries.
4. With ``profile``, the kernel's function profiler counts and times the same
   functions during the same run, as a second opinion on function_graph's numbers.

Everything lands in the output directory (default ``$KVMLAB_RESULTS``):
``trace.dat``, ``capture.json`` (what was traced, skipped, calibrated, and how it
ended), ``trace-cmd.log``, and ``function_profile.txt``. The exit code is the job's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

TRACEFS = "/sys/kernel/tracing"
CALIBRATION_CALLS = 20000
#: getppid's syscall function, by kernel generation: the thing calibration traces.
CALIBRATION_FUNCTIONS = ("__x64_sys_getppid", "__do_sys_getppid", "sys_getppid")
#: "  0)   0.561 us    |  __x64_sys_getppid();" in function_graph's text output
GRAPH_LEAF = re.compile(r"(\d+\.\d+) us\s+\|\s+(\S+)\(\);")
EXIT_BAD_SET = 2
MARKER_ENV, MARKER_PREFIX = "KVMLAB_TRACE_MARKERS", "kvmlab "  # as kselftest_py.trace_marker
DRAIN_S = 1.0
STOP_TIMEOUT_S = 120


def tracefs(name: str) -> str:
    return os.path.join(TRACEFS, name)


def write(name: str, value: str) -> None:
    with open(tracefs(name), "w") as handle:
        handle.write(value)


def read(name: str) -> str:
    with open(tracefs(name)) as handle:
        return handle.read()


def available_functions() -> set[str]:
    """Names in available_filter_functions ("name" or "name [module]")."""
    return {line.split()[0] for line in read("available_filter_functions").splitlines() if line}


def resolve(spec: dict) -> dict:
    """The set's functions and events split into used and skipped on this kernel."""
    functions = available_functions()
    events = set(read("available_events").split())
    used = [f for f in spec["functions"] if f in functions]
    used_events = [e for e in spec.get("events", []) if e in events]
    return {
        "functions": used,
        "skipped_functions": [f for f in spec["functions"] if f not in functions],
        "events": used_events,
        "skipped_events": [e for e in spec.get("events", []) if e not in events],
    }


def calibrate(functions: set[str]) -> dict:
    """What function_graph costs per traced call on this kernel, and the shortest
    duration it reports (for a function that does next to nothing)."""
    target = next((f for f in CALIBRATION_FUNCTIONS if f in functions), None)
    if target is None:
        return {"error": f"none of {', '.join(CALIBRATION_FUNCTIONS)} can be traced"}
    untraced = _time_getppid()
    write("tracing_on", "0")
    write("trace", "")
    write("current_tracer", "function_graph")
    write("set_ftrace_filter", target)
    write("tracing_on", "1")
    try:
        traced = _time_getppid()
    finally:
        write("tracing_on", "0")
        durations = [float(m[1]) * 1000 for m in GRAPH_LEAF.finditer(read("trace")) if m[2] == target]
        write("current_tracer", "nop")
        write("set_ftrace_filter", "")
        write("trace", "")
    return {
        "function": target,
        "calls": CALIBRATION_CALLS,
        "untraced_ns_per_call": untraced,
        "traced_ns_per_call": traced,
        "overhead_ns_per_call": traced - untraced,
        "reported_floor_ns": statistics.median(durations) if durations else None,
        "reported_samples": len(durations),
    }


def _time_getppid() -> float:
    """Median ns per getppid() over a few rounds (each a real syscall; glibc does not cache it)."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(CALIBRATION_CALLS // 5):
            os.getppid()
        rounds.append((time.perf_counter_ns() - started) / (CALIBRATION_CALLS // 5))
    return statistics.median(rounds)


def record_command(spec: dict, probes: dict, output: str) -> list[str]:
    argv = ["trace-cmd", "record", "-p", spec.get("tracer", "function_graph"), "-o", output]
    for function in probes["functions"]:
        argv += ["-l", function]
    for event in probes["events"]:
        argv += ["-e", event]
    if spec.get("buffer_kb"):
        argv += ["-b", str(spec["buffer_kb"])]
    if spec.get("file_version"):
        argv += ["--file-version", str(spec["file_version"])]
    if spec.get("compression"):
        argv += ["--compression", spec["compression"]]
    return argv


def wait_until_tracing(recorder: subprocess.Popen, tracer: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if recorder.poll() is not None:
            raise RuntimeError(f"trace-cmd record exited {recorder.returncode} before tracing started")
        if read("tracing_on").strip() == "1" and read("current_tracer").strip() == tracer:
            return
        time.sleep(0.05)
    raise RuntimeError(f"tracing did not start within {timeout_s:g} s")


def mark(edge: str, phase: str) -> None:
    """The job's own begin/end in the trace, in kselftest_py.trace_marker's format."""
    with open(tracefs("trace_marker"), "w") as handle:
        handle.write(MARKER_PREFIX + json.dumps({"edge": edge, "phase": phase}) + "\n")


def function_profile() -> str:
    """trace_stat/function<cpu> of every CPU, each under a '# cpu N' line."""
    parts = []
    stat_dir = tracefs("trace_stat")
    for name in sorted(os.listdir(stat_dir)):
        if name.startswith("function"):
            with open(os.path.join(stat_dir, name)) as handle:
                parts.append(f"# cpu {name.removeprefix('function')}\n{handle.read()}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="traces.guest.capture", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the probe set resolved by the host, as JSON")
    parser.add_argument("--out", default=os.environ.get("KVMLAB_RESULTS", "."))
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command given after --")
    with open(args.spec) as handle:
        spec = json.load(handle)
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"set": spec["set"], "release": os.uname().release, "tracer": spec.get("tracer")}
    probes = resolve(spec)
    report.update(probes)
    if not probes["functions"] and not probes["events"]:
        report["error"] = f"probe set {spec['set']} matches nothing in kernel {report['release']}"
        _save(args.out, report)
        print(f"kvmlab trace: {report['error']}", file=sys.stderr)
        return EXIT_BAD_SET
    report["calibration"] = calibrate(available_functions())
    code = _record_around(spec, probes, command, args.out, report)
    _save(args.out, report)
    return code


def _record_around(spec: dict, probes: dict, command: list[str], out: str, report: dict) -> int:
    """trace-cmd record in the background, the job in the foreground; the job's code."""
    output = os.path.join(out, "trace.dat")
    tracer = spec.get("tracer", "function_graph")
    if os.path.exists(tracefs("buffer_percent")):
        write("buffer_percent", "0")
    with open(os.path.join(out, "trace-cmd.log"), "wb") as log:
        recorder = subprocess.Popen(record_command(spec, probes, output), stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until_tracing(recorder, tracer)
        except RuntimeError as err:
            recorder.kill()
            recorder.wait()
            report["error"] = str(err)
            print(f"kvmlab trace: {err} (see trace-cmd.log)", file=sys.stderr)
            return EXIT_BAD_SET
        if spec.get("profile"):
            write("function_profile_enabled", "1")
        started = time.monotonic()
        mark("begin", "job")
        code = subprocess.call(command, env={**os.environ, MARKER_ENV: "1"})
        mark("end", "job")
        report["job_s"] = time.monotonic() - started
        report["job_code"] = code
        if spec.get("profile"):
            write("function_profile_enabled", "0")
            with open(os.path.join(out, "function_profile.txt"), "w") as handle:
                handle.write(function_profile())
        write("tracing_on", "0")
        time.sleep(DRAIN_S)
        report["trace_cmd_code"] = stop_recorder(recorder, report)
    return code


def stop_recorder(recorder: subprocess.Popen, report: dict) -> int:
    """Ctrl-C for trace-cmd's whole process group, as from a terminal: its per-CPU
    recorder processes need the signal too (on 5.10, one sent to the parent alone left
    them asleep on an empty buffer for good). Killed if it does not finish in time."""
    os.killpg(recorder.pid, signal.SIGINT)
    try:
        return recorder.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(recorder.pid, signal.SIGKILL)
        report["error"] = f"trace-cmd did not stop within {STOP_TIMEOUT_S} s after SIGINT; killed"
        print(f"kvmlab trace: {report['error']}; trace.dat may be incomplete", file=sys.stderr)
        return recorder.wait()


def _save(out: str, report: dict) -> None:
    with open(os.path.join(out, "capture.json"), "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
