"""The complexity fits over several qualifications' runs pooled: `make qualify` (10 to 509
slots) and `make qualify-32k` (8194 and 32764) measure the same array and trees, so
together they give each test up to seven slot counts to fit.

Reads each DIR's store as it is (nothing is written), takes every run record, and prints
the complexity table of kvmlab qualify's report over all of them, with the slot counts
and runs behind each side. Both qualifications must have been measured under the same
clock, QEMU and CPU model; it refuses otherwise.

    python bench/complexity_pooled.py qualify-results/<make qualify> qualify-results/<make qualify-32k>
"""

import argparse
import sys
from pathlib import Path

from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, report
from kvmlab.qualify.store import Store

SAME = ("clock", "emulator", "cpu", "cpus")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path, metavar="DIR")
    args = parser.parse_args()
    try:
        stores = [Store.read(directory) for directory in args.directories]
        records = [record for store in stores for record in store.records()]
    except KvmlabError as err:
        print(f"complexity_pooled: {err}", file=sys.stderr)
        return 2
    first = stores[0].config.to_json()
    for store in stores[1:]:
        differing = [key for key in SAME if store.config.to_json().get(key) != first.get(key)]
        if differing:
            print(f"complexity_pooled: {store.directory} was measured with another {', '.join(differing)}",
                  file=sys.stderr)
            return 2
    config = stores[0].config.with_(
        tests=tuple(dict.fromkeys(t for store in stores for t in store.config.tests)),
        points=tuple(sorted({n for store in stores for n in store.config.points})))
    result = analysis.analyse(config, records)
    runs = result.runs
    for side in ("base", "patched"):
        mine = runs[runs["side"] == side]
        print(f"{side}: {len(mine)} runs at {sorted(mine['slots'].unique().tolist())} slots, "
              f"from {', '.join(sorted({store.config.side(side).spec for store in stores}))}")
    print()
    print("\n".join(report.complexity_markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
