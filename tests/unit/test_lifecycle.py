"""The one VM lifecycle without a VM: a real ``sleep`` stands in for QEMU, and the test
writes the guest's status lines itself, as the guest init would."""

import json
import subprocess
import time

import pytest
from kvmlab_guest import protocol

from kvmlab.errors import EXIT_HANG, EXIT_INVARIANT, EXIT_LOST, EXIT_SPLAT
from kvmlab.vm import lifecycle


@pytest.fixture
def qemu():
    """A child process that lives until killed, as QEMU does."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    lifecycle.kill(process)


def say(run_dir, event: str, partial: bool = False, **fields) -> None:
    line = json.dumps({"event": event, **fields}) + ("" if partial else "\n")
    with open(run_dir / "status.jsonl", "a") as status:
        status.write(line)


def follow(liveness: lifecycle.Liveness, within_s: float) -> bool:
    """Poll as the runner does; True if the VM's life ended within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if liveness.over():
            return True
        time.sleep(0.02)
    return False


def judge(liveness, run_dir, kept=False):
    return lifecycle.judge(liveness.status, run_dir, liveness.started, kept, run_dir / "qmp.sock",
                           timeout_s=60, stall_s=liveness.stall_s)


def test_a_job_that_exits_ends_the_life_with_its_code(qemu, tmp_path):
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=60, stall_s=30, started=time.monotonic())
    say(tmp_path, protocol.EVENT_READY)
    assert not liveness.over()
    assert liveness.status.ready_at is not None
    say(tmp_path, protocol.EVENT_EXIT, code=3)
    assert liveness.over()
    result = judge(liveness, tmp_path)
    assert (result.outcome, result.exit_code, result.job_code) == ("failed", 3, 3)


def test_a_half_written_line_waits_for_its_newline(qemu, tmp_path):
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=60, stall_s=30, started=time.monotonic())
    say(tmp_path, protocol.EVENT_EXIT, partial=True, code=0)
    assert not liveness.over()
    with open(tmp_path / "status.jsonl", "a") as status:
        status.write("\n")
    assert liveness.over() and liveness.status.exit_code == 0


def test_silence_after_the_job_started_is_a_hang(qemu, tmp_path):
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=60, stall_s=0.3, started=time.monotonic())
    say(tmp_path, protocol.EVENT_READY)
    assert follow(liveness, within_s=5)
    assert liveness.status.stalled and liveness.status.timed_out
    result = judge(liveness, tmp_path)
    assert (result.outcome, result.exit_code) == ("hang", EXIT_HANG)
    assert "stopped responding" in result.message


def test_a_boot_that_never_beats_is_a_hang_counted_from_qemus_start(qemu, tmp_path):
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=60, stall_s=0.3, started=time.monotonic())
    assert follow(liveness, within_s=5)
    result = judge(liveness, tmp_path)
    assert result.outcome == "hang" and "never finished booting" in result.message


def test_heartbeats_keep_a_guest_alive_until_the_deadline(qemu, tmp_path):
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=0.6, stall_s=0.3, started=time.monotonic())
    deadline = time.monotonic() + 5
    while not liveness.over() and time.monotonic() < deadline:
        say(tmp_path, protocol.EVENT_HEARTBEAT)
        time.sleep(0.05)
    assert liveness.status.timed_out and not liveness.status.stalled
    result = judge(liveness, tmp_path)
    assert result.outcome == "hang" and "no exit within" in result.message


def test_time_paused_is_neither_silence_nor_running_time(qemu, tmp_path):
    started = time.monotonic()
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=1.0, stall_s=0.4, started=started)
    say(tmp_path, protocol.EVENT_READY)
    assert not liveness.over()
    time.sleep(0.6)  # the guest was paused: no heartbeat could come
    liveness.paused(0.6)
    assert not liveness.over(), "a paused guest was taken for a hung one"
    assert liveness.deadline == pytest.approx(started + 1.6)
    assert follow(liveness, within_s=5) and liveness.status.stalled  # then real silence


def test_qemu_ending_without_an_exit_status_is_a_lost_vm(tmp_path):
    process = subprocess.Popen(["true"])
    liveness = lifecycle.Liveness(process, tmp_path, timeout_s=60, stall_s=30, started=time.monotonic())
    assert follow(liveness, within_s=5)
    result = judge(liveness, tmp_path)
    assert (result.outcome, result.exit_code) == ("lost", EXIT_LOST)


def test_a_kernel_splat_fails_a_clean_exit_and_a_splat_in_a_hang_is_a_hang(qemu, tmp_path):
    (tmp_path / "console.log").write_text(
        f"{protocol.USERSPACE_MARK}\n[ 5.0] BUG: unable to handle page fault for address: 0000\n")
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=60, stall_s=0.3, started=time.monotonic())
    say(tmp_path, protocol.EVENT_READY)
    say(tmp_path, protocol.EVENT_EXIT, code=0)
    assert liveness.over() and liveness.status.userspace_at is not None
    result = judge(liveness, tmp_path)
    assert (result.outcome, result.exit_code) == ("splat", EXIT_SPLAT)
    liveness.status.timed_out = True
    assert judge(liveness, tmp_path).outcome == "hang"


def test_a_kept_vm_reports_its_sockets(qemu, tmp_path):
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=60, stall_s=30, started=time.monotonic())
    say(tmp_path, protocol.EVENT_EXIT, code=0)
    assert liveness.over()
    result = judge(liveness, tmp_path, kept=True)
    assert result.outcome == "kept" and f"kvmlab stop {tmp_path.name}" in result.message


class Report:
    def __init__(self):
        self.failed, self.error = False, None

    def summary(self) -> str:
        return "checked"


class PausingCheck:
    """A check that keeps the guest paused ``pause_s`` each time it runs."""

    def __init__(self, pause_s: float, error: str | None = None):
        self.pause_s, self.runs, self.report = pause_s, 0, Report()
        self.report.error = error

    def due(self, now: float) -> bool:
        return True

    def check(self) -> float:
        self.runs += 1
        return self.pause_s


def test_a_check_runs_once_the_job_started_and_its_pause_moves_the_deadline(qemu, tmp_path):
    liveness = lifecycle.Liveness(qemu, tmp_path, timeout_s=60, stall_s=30, started=time.monotonic())
    check = PausingCheck(pause_s=5.0)
    liveness.run_check(check)
    assert check.runs == 0, "checked before the job started"
    say(tmp_path, protocol.EVENT_READY)
    liveness.over()
    deadline, beat = liveness.deadline, liveness.status.last_beat
    liveness.run_check(check)
    assert check.runs == 1
    assert liveness.deadline == pytest.approx(deadline + 5.0)
    assert liveness.status.last_beat == pytest.approx(beat + 5.0)


def test_a_check_error_from_a_guest_that_went_away_is_not_the_checks_fault(tmp_path):
    process = subprocess.Popen(["true"])
    process.wait()
    liveness = lifecycle.Liveness(process, tmp_path, timeout_s=60, stall_s=30, started=time.monotonic())
    say(tmp_path, protocol.EVENT_READY)
    liveness.catch_up()
    check = PausingCheck(pause_s=0.0, error="drgn: connection reset")
    liveness.run_check(check)
    assert check.report.error is None


def test_failed_checks_fail_a_run_that_passed():
    result = lifecycle.RunResult("ok", 0, 0, "", run_dir=None)
    report = Report()
    report.failed = True
    lifecycle.judge_checks(result, report)
    assert (result.outcome, result.exit_code) == ("invariant", EXIT_INVARIANT)
