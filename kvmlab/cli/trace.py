"""``kvmlab trace report``: latency tables and plots from traced runs."""

import argparse
import sys
from pathlib import Path


def _trace_report(args: argparse.Namespace) -> int:
    from kvmlab import trace_report as report  # pandas and matplotlib: only for a report

    labels = report.distinct_labels(args.dirs)
    runs = [report.load_run(directory, args.partial) for directory in args.dirs]
    for run, label in zip(runs, labels, strict=True):
        run.label = label
    shown = report.readable(runs)
    for run in runs:
        if run.damage:
            print(f"kvmlab: warning: {report.damage_note(run)}", file=sys.stderr)
    report.distinct_kernels(shown)
    summary, comparison = report.summarize(runs), report.compare(shown)
    print(report.markdown(summary, comparison))
    for run in shown:
        if run.profile_check is not None:
            print("\n" + report.profile_markdown(run))
    for run in shown:
        if run.losses:
            print(f"kvmlab: {run.directory}: {'; '.join(run.losses)}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.out / "latency.csv", index=False)
    if not comparison.empty:
        comparison.to_csv(args.out / "comparison.csv", index=False)
    for run in shown:
        run.calls.to_csv(args.out / report.calls_file(run, shown), index=False)
    plots = report.plot(shown, args.out)
    print(f"kvmlab: wrote latency.csv, {len(plots)} plots and the calls tables to {args.out}",
          file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
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

