"""Published figures beside measured ones: the reference table is read strictly, refused in
one line before anything boots, and shown cell by cell with the direction compared."""

import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, reference, report
from kvmlab.qualify.config import Config
from unit.test_report import SPREAD, _records

HEADER = "test,slots,before,after,source\n"
CONFIG = Config.from_json({
    "base": {"spec": "debian:bullseye", "exact": "x", "release": "5.10"},
    "patched": {"spec": "debian:bookworm", "exact": "y", "release": "6.1"},
    "tests": ["unmap", "move active area"], "slots": [10, 509], "runs": 5, "seconds": 1.0,
    "threshold": 0.05, "trace": None, "check_invariants": False, "append": "",
})


def test_the_cover_letters_table_ships_whole_and_by_name():
    table = reference.read(Path("scalable-memslots-v5"))
    rows = {(row["test"], row["slots"]): row for row in table["rows"]}
    assert len(rows) == 6 * 5 + 6  # six rows at 10, 30, 50, 100 and 509 slots; the 32k table
    assert rows[("unmap chunked", 509)]["before"] == 0.00155 and rows[("map", 8194)]["after"] == 0.0541
    assert rows[("slot setup", 32764)] == {**rows[("slot setup", 32764)], "before": 16.1, "after": 0.59}
    assert all("Szmigiero" in row["source"] and "TDP MMU disabled" in row["source"] for row in rows.values())
    assert reference.direction(reference.change(rows[("unmap", 509)]), 0.02) == reference.IMPROVED
    assert reference.direction(reference.change(rows[("map", 100)]), 0.03) == reference.NONE


@pytest.mark.parametrize("text, complaint", [
    ("", "the first line must be the header"),
    ("test,slots,before,after\nunmap,10,1,2\n", "the first line must be the header"),
    (HEADER, "no rows of figures"),
    (HEADER + "remap,10,1,2,x\n", ":2: unknown test 'remap'"),
    (HEADER + "unmap,ten,1,2,x\n", ":2: slots 'ten' is not a count"),
    (HEADER + "unmap,10,0,2,x\n", ":2: before '0' is not a positive time"),
    (HEADER + "unmap,10,1,nan,x\n", ":2: after 'nan' is not a positive time"),
    (HEADER + "unmap,10,1,2\n", ":2: 4 fields"),
    (HEADER + "unmap,10,1,2,x\nUnmap,10,1,2,y\n", ":3: a second row for unmap @10"),
])
def test_a_damaged_reference_is_refused_in_one_line(tmp_path, text, complaint):
    path = tmp_path / "ref.csv"
    path.write_text(text)
    with pytest.raises(KvmlabError, match=complaint.replace("(", r"\(")):
        reference.read(path)


def test_what_is_not_a_small_text_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.csv").write_bytes(b"x" * (reference.MAX_BYTES + 1))
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe")
    for name, complaint in (("fifo", "not a file"), ("big.csv", "larger than"), ("binary.csv", "not UTF-8"),
                            ("missing.csv", "not a file")):
        with pytest.raises(KvmlabError, match=complaint):
            reference.read(tmp_path / name)


def test_qualify_refuses_a_reference_naming_an_unknown_test_before_anything_boots(tmp_path):
    path = tmp_path / "ref.csv"
    path.write_text(HEADER + "unmap,10,1,2,x\nfly,10,1,2,x\n")
    done = kvmlab("qualify", "--base", "debian:bullseye", "--patched", "debian:bookworm",
                  "--reference", str(path), "-o", str(tmp_path / "q"))
    assert_one_line_error(done, "ref.csv:3: unknown test 'fly'")
    assert not (tmp_path / "q").exists()


def test_the_report_puts_the_published_change_beside_the_measured_one():
    published = HEADER + "unmap,10,1,0.5,letter\nmove-active,10,1,1.01,letter\nunmap,509,1,2,letter\n"
    config = CONFIG.with_(reference={"file": "ref.csv", "rows": reference.parse(published)})
    faster = [0.5e6 * s for s in SPREAD]
    same = [1e6 * s for s in SPREAD]
    values = {("base", test, slots): same for test in CONFIG.tests for slots in CONFIG.points}
    values |= {("patched", test, slots): same for test in CONFIG.tests for slots in CONFIG.points}
    values[("patched", "unmap", 10)] = values[("patched", "unmap", 509)] = faster
    result = analysis.analyse(config, _records(values))
    text = report.markdown(result)
    assert "| p | runs | published | same direction |" in text
    unmap_10, unmap_509 = [line for line in text.splitlines() if line.startswith("| Unmap |")]
    assert unmap_10.endswith("| 5/5 | 50% | yes |")  # both twice as fast
    assert unmap_509.endswith("| 5/5 | -100% | **no** |")  # measured faster, published slower
    assert "| Move active area |" in text and "| -1% | yes |" in text  # within the threshold: none, and none
    assert "goes the published way in 2 of 3 cells compared" in text
    cells = json.loads(report.json_report(result))["cells"]
    assert cells[0]["published"]["same_direction"] is True and "published" not in cells[2]
