"""``kvmlab qualify``: is a patched kernel faster or slower than its base on a workload?

- ``qualification``: create, resume or shard a qualification, run it, report (below the CLI);
- ``workloads``: the kselftest_py tests it can run (``kselftest_py.workload`` declarations);
- ``config``: what qualify.json records, typed, with its defaults and checks;
- ``matrix``: the cells (test × point) and the interleaved order of their runs;
- ``plan``: a qualification dealt into shards; ``merge``: the shards put back together;
- ``records``: the kinds of record a qualification keeps, and what each holds;
- ``store``: the append-only record of every run, what ``--resume`` reads back;
- ``driver`` and ``lane``: guests running the matrix, A/B interleaved;
- ``conditions``: what each side's KVM ran with;
- ``analysis``: per-cell statistics, verdicts, complexity fits, the exit code;
- ``reference``: published figures beside the measured ones;
- ``tables``: the reports' tables and sentences, built once from the analysis;
- ``report``: report.md, report.html with plots, junit.xml, report.ktap, runs.csv, report.json.
"""
