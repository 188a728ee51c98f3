"""Run a job under ftrace, in the guest: trace-cmd around it, with a probe set.

    python3 -m traces.guest.capture SPEC.json -- CMD [ARGS...]

Runs inside the lab's guest, so it uses Python's standard library only. The host
(``kvmlab run --trace SET``) writes SPEC from ``traces/probes/<SET>.toml``: the set's
name, tracer, functions and events, and the buffer size and file format.

1. The set is resolved against the kernel: functions missing from
   ``available_filter_functions`` and events missing from ``available_events`` are
   skipped and listed; a set that matches nothing is an error (exit 2).
2. ``trace-cmd start`` sets the tracer up with a large ring buffer, the job runs, then
   ``trace-cmd stop`` and ``trace-cmd extract`` write trace.dat from the buffer in one
   go (then ``trace-cmd convert`` if a file version or compression was asked for).
   Not ``trace-cmd record``: its readers stream the buffer while the job writes
   it, and on the 6.1 guest that lost events without counting them (thousands of
   calibration calls, trace marks), or left the buffer's tail unrecorded at stop
   (19697 of 37108 events). A buffer too small for the job overwrites its oldest
   events, which the kernel counts (overrun) and trace.dat's CPU stats carry.
3. The tracer's own cost is calibrated on this kernel, because a memslot lookup costs
   less than function_graph's entry and exit: ``getppid()`` is timed before tracing
   and again with its syscall function traced (in the same tracing session as the set:
   every extra enabling of ftrace is code patching, which sometimes freezes the nested
   guest under TCG), between two trace marks; the durations function_graph reports
   for it (a function that does almost nothing) are the floor of what it can time,
   read by the host.
4. With ``profile``, the kernel also times the same functions during the same run with
   kprobes and hist triggers (``traces.guest.hist``): a second opinion on
   function_graph's numbers, aggregated in the kernel with no per-call event.

Everything lands in the output directory (default ``$KVMLAB_RESULTS``):
``trace.dat``, ``capture.json`` (what was traced, skipped, calibrated, and how it
ended), ``trace-cmd.log``, and ``latency_hist.json``. The exit code is the job's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from kselftest_py import trace_marker
from traces.guest import tracefs
from traces.guest.hist import LatencyHistograms, unavailable

CALIBRATION_CALLS = 20000
#: getppid's syscall function, by kernel generation: the thing calibration traces.
CALIBRATION_FUNCTIONS = ("__x64_sys_getppid", "__do_sys_getppid", "sys_getppid")
EXIT_BAD_SET = 2
DEFAULT_BUFFER_KB = 131072  # per CPU: 256 MiB of the 4 GiB guest holds minutes of memslot work
TRACE_CMD_TIMEOUT_S = 300


def available_functions() -> set[str]:
    """Names in available_filter_functions ("name" or "name [module]")."""
    return {line.split()[0] for line in tracefs.read("available_filter_functions").splitlines() if line}


def resolve(spec: dict, functions: set[str]) -> dict:
    """The set's functions and events split into used and skipped on this kernel."""
    events = set(tracefs.read("available_events").split())
    used = [f for f in spec["functions"] if f in functions]
    used_events = [e for e in spec.get("events", []) if e in events]
    return {
        "functions": used,
        "skipped_functions": [f for f in spec["functions"] if f not in functions],
        "events": used_events,
        "skipped_events": [e for e in spec.get("events", []) if e not in events],
    }


def calibration_target(functions: set[str]) -> str | None:
    """getppid's syscall function on this kernel: traced along with the set."""
    return next((f for f in CALIBRATION_FUNCTIONS if f in functions), None)


def calibrate_traced(target: str, untraced_ns: float) -> dict:
    """Time getppid() again now that its syscall function is traced, between two marks
    (``phase: calibration``) so the host can read the durations function_graph reported
    for it: the floor of what the tracer can time on this kernel."""
    mark("begin", "calibration")
    traced = _time_getppid()
    mark("end", "calibration")
    return {"function": target, "calls": CALIBRATION_CALLS, "untraced_ns_per_call": untraced_ns,
            "traced_ns_per_call": traced, "overhead_ns_per_call": traced - untraced_ns}


def _time_getppid() -> float:
    """Median ns per getppid() over a few rounds (each a real syscall; glibc does not cache it)."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(CALIBRATION_CALLS // 5):
            os.getppid()
        rounds.append((time.perf_counter_ns() - started) / (CALIBRATION_CALLS // 5))
    return statistics.median(rounds)


def start_command(spec: dict, probes: dict) -> list[str]:
    argv = ["trace-cmd", "start", "-p", spec.get("tracer", "function_graph"),
            "-b", str(spec.get("buffer_kb") or DEFAULT_BUFFER_KB)]
    for function in probes["functions"]:
        argv += ["-l", function]
    for event in probes["events"]:
        argv += ["-e", event]
    return argv


def convert_command(spec: dict, source: str, output: str) -> list[str] | None:
    """``trace-cmd convert`` to the asked file version and compression (extract writes
    trace-cmd's default and takes no such options), or None if nothing was asked."""
    if not spec.get("file_version") and not spec.get("compression"):
        return None
    argv = ["trace-cmd", "convert", "-i", source, "-o", output]
    if spec.get("file_version"):
        argv += ["--file-version", str(spec["file_version"])]
    if spec.get("compression"):
        argv += ["--compression", spec["compression"]]
    return argv


def trace_cmd(argv: list[str], log) -> None:
    """Run one trace-cmd step, its output in the log; a failure is a RuntimeError."""
    log.write(("$ " + " ".join(argv) + "\n").encode())
    log.flush()
    done = subprocess.run(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, timeout=TRACE_CMD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} exited {done.returncode} (see trace-cmd.log)")


def mark(edge: str, phase: str) -> None:
    """The capture's own marks (calibration, the job), in the format kselftest_py's use."""
    tracefs.write("trace_marker", trace_marker.line(edge, phase))


def fail(report: dict, key: str, message: str) -> None:
    """Record what went wrong in capture.json and say it on stderr."""
    report[key] = message
    print(f"kvmlab trace: {message}", file=sys.stderr)


def _start_histograms(spec: dict, probes: dict, report: dict) -> LatencyHistograms | None:
    """The kernel-side second opinion, when asked for and possible on this kernel."""
    if not spec.get("profile"):
        return None
    reason = unavailable()
    if reason:
        fail(report, "profile_error", f"kernel latency histograms unavailable: {reason}")
        return None
    histograms = LatencyHistograms([f for f in probes["functions"] if f not in CALIBRATION_FUNCTIONS])
    try:
        histograms.start()
    except OSError as err:
        histograms.remove()
        fail(report, "profile_error", f"kernel latency histograms could not be set up: {err}")
        return None
    return histograms


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
    functions = available_functions()
    probes = resolve(spec, functions)
    report.update(probes)
    if not probes["functions"] and not probes["events"]:
        fail(report, "error", f"probe set {spec['set']} matches nothing in kernel {report['release']}")
        _save(args.out, report)
        return EXIT_BAD_SET
    target = calibration_target(functions)
    if target is None:
        report["calibration"] = {"error": f"none of {', '.join(CALIBRATION_FUNCTIONS)} can be traced"}
    else:
        probes = {**probes, "functions": [*probes["functions"], target]}
        report["calibration"] = {"function": target, "untraced_ns_per_call": _time_getppid()}
    code = _record_around(spec, probes, command, args.out, report)
    _save(args.out, report)
    return code


def _record_around(spec: dict, probes: dict, command: list[str], out: str, report: dict) -> int:
    """Trace set up, the job run, the buffer extracted; the job's exit code."""
    with open(os.path.join(out, "trace-cmd.log"), "wb") as log:
        try:
            trace_cmd(start_command(spec, probes), log)
            if tracefs.read("tracing_on").strip() != "1":
                raise RuntimeError("trace-cmd start left tracing off")
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            fail(report, "error", str(err))
            return EXIT_BAD_SET
        histograms = None
        try:
            # first: adding kprobe and synthetic events clears the ring buffers
            histograms = _start_histograms(spec, probes, report)
            before = report["calibration"]
            if "function" in before:
                report["calibration"] = calibrate_traced(before["function"], before["untraced_ns_per_call"])
            started = time.monotonic()
            mark("begin", "job")
            code = subprocess.call(command, env={**os.environ, trace_marker.ENV: "1"})
            mark("end", "job")
            report["job_s"] = time.monotonic() - started
            report["job_code"] = code
            if histograms is not None:
                with open(os.path.join(out, "latency_hist.json"), "w") as handle:
                    json.dump(histograms.read(), handle)
        finally:
            tracefs.write("tracing_on", "0")
        try:
            trace_cmd(["trace-cmd", "stop"], log)
            output = os.path.join(out, "trace.dat")
            convert = convert_command(spec, output + ".extracted", output)
            trace_cmd(["trace-cmd", "extract", "-o", output + ".extracted" if convert else output], log)
            if convert:
                trace_cmd(convert, log)
                os.unlink(output + ".extracted")
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            fail(report, "error", f"the trace could not be extracted: {err}")
        finally:
            if histograms is not None:
                histograms.remove()  # after the extract: it clears the ring buffers
            subprocess.run(["trace-cmd", "reset"], stdout=log, stderr=log, check=False)
    return code


def _save(out: str, report: dict) -> None:
    with open(os.path.join(out, "capture.json"), "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
