"""A workload is a kselftest_py test's declaration: one registered here, and nothing else
of the host touched, goes through plan, store, analysis and reports."""

import json
import xml.etree.ElementTree as ET

import pytest

from kselftest_py.workload import Axis, Measure, Metric, Workload
from kvmlab import stats
from kvmlab.errors import KvmlabError
from kvmlab.qualify import analysis, matrix, plan, report, workloads
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store


class Spin(Workload):
    """A toy: vCPUs spinning, each run giving a rate (more is better) and a latency (less is)."""

    def argv(self, test, point, seconds, result_file, setup_budget=None):
        return ["python3", "-m", self.module, "--vcpus", str(point), "--json", result_file]

    def cost(self, point):
        return float(point)


TOY = Spin(
    name="toy-spin",
    module="kselftest_py.toy_spin",
    tests=("spin", "yield"),
    axis=Axis("vcpus", "vCPUs", "vCPU", "{} vCPUs spinning", (1, 2, 4), 1),
    metrics=(Metric("rate_per_s", "per second", unit="1/s", lower_is_better=False),
             Metric("latency_ns", "per call")),
    summary="spins per second and the latency of one",
)
CONFIG = {
    "base": {"spec": "debian:bullseye", "exact": "a", "release": "5.10.0-32-cloud-amd64"},
    "patched": {"spec": "debian:bookworm", "exact": "b", "release": "6.1.0-50-cloud-amd64"},
    "workload": TOY.name, "tests": ["spin", "yield"], "vcpus": [1, 2, 4], "runs": 3, "seconds": 1.0,
    "threshold": 0.02, "clock": "icount", "cpus": 1, "method": stats.WELCH_LOG, "trace": None,
    "check_invariants": False,
}


@pytest.fixture
def toy():
    workloads.register(TOY)
    yield TOY
    workloads._KNOWN.pop(TOY.name)


def _run(item, rate: float, latency: float) -> dict:
    return {"kind": "run", "side": item.side, "test": item.test, "vcpus": item.point, "run": item.run,
            "rate_per_s": rate, "latency_ns": latency, "release": CONFIG[item.side]["release"]}


def test_a_registered_toy_goes_through_plan_store_analysis_and_reports(toy, tmp_path):
    assert matrix.parse_tests(toy, "yield,spin") == ["yield", "spin"]
    assert matrix.parse_points(toy, "4,1", "--slots") == [1, 4]
    items = matrix.run_order(CONFIG["tests"], CONFIG["vcpus"], CONFIG["runs"], rounds_first=True)
    assert len(items) == 2 * 2 * 3 * 3
    # Dealt by the toy's own cost: the 4-vCPU row alone, against 1 and 2 together.
    assert plan.deal(toy, CONFIG["tests"], CONFIG["vcpus"], 2) == [
        [["spin", 4], ["yield", 4]], [["spin", 1], ["yield", 1], ["spin", 2], ["yield", 2]]]
    config = Config.from_json(CONFIG)  # once the toy is known
    assert config.workload is toy and config.points == (1, 2, 4)
    planned = plan.write(tmp_path / "plan.json", config, 2)
    assert plan.read(tmp_path / "plan.json")["cells"] == planned["cells"]

    store = Store.create(tmp_path / "q", config)
    for item in items:
        # The patched kernel spins 10 % faster at 4 vCPUs; its latency is the same everywhere.
        faster = 1.1 if item.side == "patched" and item.point == 4 else 1.0
        jitter = 1 + item.run / 1000
        store.append(_run(item, 1e6 * faster * jitter, 500.0 * jitter))
    records = store.records()
    assert len(records) == len(items) and store.workload is toy

    result = analysis.analyse(store.config, records)
    cells = {(cell.measure, cell.point): cell for cell in result.cells}
    assert set(cells) == {(f"{test}: {key}", point) for test in ("spin", "yield")
                          for key in ("rate_per_s", "latency_ns") for point in (1, 2, 4)}
    # More is better for a rate: 10 % more is an improvement, not a regression.
    assert cells[("spin: rate_per_s", 4)].verdict == stats.IMPROVED
    assert cells[("spin: rate_per_s", 4)].comparison.improvement == pytest.approx(0.1)
    assert cells[("spin: rate_per_s", 1)].verdict == stats.NO_CHANGE
    assert cells[("spin: latency_ns", 4)].verdict == stats.NO_CHANGE
    assert result.exit_code == 0

    written = report.write_all(result, store.directory)
    markdown = (store.directory / "report.md").read_text()
    assert "kselftest_py toy_spin" in markdown and "spins per second and the latency of one" in markdown
    assert "4 vCPUs spinning:" in markdown and "| Spin: rate_per_s |" in markdown
    assert "| Spin: rate_per_s | " in markdown and "10%" in markdown
    assert "slot" not in markdown.lower() and "memslot" not in markdown.lower()
    assert (store.directory / "runs.csv").read_text().splitlines()[0] == \
        "side,test,vcpus,run,rate_per_s,latency_ns,release"
    cases = ET.parse(store.directory / "junit.xml").getroot().findall("testcase")
    assert {case.get("classname") for case in cases} == {"toy-spin.1", "toy-spin.2", "toy-spin.4"}
    assert "spin: rate_per_s @4 vcpus" in {case.get("name") for case in cases}
    cells_json = json.loads((store.directory / "report.json").read_text())["cells"]
    assert [c["verdict"] for c in cells_json if c["test"] == "spin: rate_per_s" and c["vcpus"] == 4] == \
        [stats.IMPROVED]
    assert {path.name for path in written} >= {"report.md", "spin-rate_per_s.png", "yield-latency_ns.png"}


def test_a_toy_record_without_its_metric_is_named(toy, tmp_path):
    store = Store.create(tmp_path / "q", Config.from_json(CONFIG))
    item = matrix.Item("base", "spin", 2, 0)
    record = _run(item, 1e6, 500.0)
    del record["latency_ns"]
    store.append(record)
    with pytest.raises(KvmlabError, match="run record without 'latency_ns'"):
        store.records()


def test_an_unknown_workload_is_one_line():
    with pytest.raises(KvmlabError, match="unknown workload 'nope'; known: memslot-perf"):
        workloads.get("nope")


def test_memslot_perf_declares_what_its_reports_always_showed():
    memslot_perf = workloads.get("memslot-perf")
    rows = memslot_perf.measures(("unmap", "move active area"))
    assert [(m.name, m.metric, m.tests) for m in rows] == [
        ("unmap", "iteration_ns", ("unmap",)),
        ("move active area", "iteration_ns", ("move active area",)),
        ("slot setup", "slot_setup_ns", ("move active area",)),
    ]
    assert rows[1].point_sized and rows[2].per_point and not rows[0].point_sized
    assert memslot_perf.measures(("map",))[-1] == Measure("slot setup", "slot_setup_ns", ("map",),
                                                          per_point=True)
    assert memslot_perf.argv("unmap chunked", 509, 0.5, "/tmp/r.json") == [
        "python3", "-m", "kselftest_py.memslot_perf", "-s", "509", "-f", "2", "-e", "2", "-r", "1",
        "-l", "0.5", "--json", "/tmp/r.json"]
    assert [memslot_perf.option(test) for test in memslot_perf.tests] == [
        "map", "unmap", "unmap-chunked", "move-active", "move-inactive", "rw"]
