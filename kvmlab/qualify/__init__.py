"""``kvmlab qualify``: is a patched kernel faster or slower than its base at memslot work?

- ``matrix``: the cells (test × slot count) and the interleaved order of their runs;
- ``store``: the append-only record of every run, what ``--resume`` reads back;
- ``driver``: boots one guest per kernel and runs the matrix, A/B interleaved;
- ``analysis``: per-cell statistics, verdicts, complexity fits, the exit code;
- ``report``: report.md, report.html with plots, junit.xml, report.ktap, runs.csv.
"""
