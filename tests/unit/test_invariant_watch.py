"""How a run's outcome takes the periodic invariant checks into account (plain data)."""

from pathlib import Path

from kvmlab.errors import EXIT_INVARIANT, EXIT_SPLAT
from kvmlab.inspect.watch import WatchReport
from kvmlab.vm.lifecycle import RunResult, judge_checks


def result(outcome: str, code: int) -> RunResult:
    return RunResult(outcome, code, code, "", Path("/nonexistent"))


def test_clean_checks_leave_the_job_code():
    report = WatchReport(checks=5, checks_with_vms=4, max_slots=65, paused_s=[0.5, 0.7])
    done = result("failed", 3)
    judge_checks(done, report)
    assert (done.outcome, done.exit_code) == ("failed", 3)
    assert report.summary().startswith("invariant checks: 5 ran, 4 saw a VM (up to 65 slots)")
    assert "paused 0.60 s per check; no violations" in report.summary()


def test_a_violation_fails_a_passing_run_with_its_report():
    report = WatchReport(checks=2, checks_with_vms=2, violations=["gfn_order: kvm 0x1 pid 7 ..."])
    done = result("ok", 0)
    judge_checks(done, report)
    assert (done.outcome, done.exit_code) == ("invariant", EXIT_INVARIANT)
    assert "VIOLATIONS at check 2" in done.message and "gfn_order: kvm 0x1 pid 7" in done.message


def test_checks_that_could_not_run_fail_the_run():
    report = WatchReport(error="drgn cannot attach to run-x: no such socket")
    done = result("ok", 0)
    judge_checks(done, report)
    assert done.exit_code == EXIT_INVARIANT
    assert "checks stopped: drgn cannot attach" in done.message


def test_a_kernel_splat_outranks_a_violation():
    done = result("splat", EXIT_SPLAT)
    judge_checks(done, WatchReport(violations=["x"]))
    assert done.exit_code == EXIT_SPLAT
