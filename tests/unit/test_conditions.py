"""What each side of a qualification ran with: read in the guest, kept per boot, compared,
and shown where a reader of the verdict sees it."""

import json
from pathlib import Path

from conftest import assert_one_line_error, kvmlab
from kvmlab_guest import conditions as guest

from kvmlab.kernels.model import Kernel
from kvmlab.qualify import analysis, conditions, report
from kvmlab.qualify.config import Config
from kvmlab.qualify.store import Store, record_problem
from unit.test_report import SPREAD, _records
from unit.test_store import CONFIG as STORE_CONFIG

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC Processor
flags\t\t: fpu vme de pse tsc msr pae svm npt lbrv nrip_save hypervisor lm

processor\t: 1
model name\t: Other CPU
flags\t\t: fpu vmx ept
"""

CONFIG = Config.from_json({
    "base": {"spec": "debian:bookworm", "exact": "x", "release": "6.1.0-50-cloud-amd64"},
    "patched": {"spec": "debian:bookworm", "exact": "x", "release": "6.1.0-50-cloud-amd64",
                "append": "kvm.tdp_mmu=0"},
    "tests": ["move active area"], "slots": [10, 509], "runs": 5, "seconds": 1.0, "threshold": 0.05,
    "trace": None, "check_invariants": False, "append": "",
})
GUEST = {"kvm.tdp_mmu": "Y", "kvm.halt_poll_ns": "200000", "kvm_amd.npt": "1", "kvm_amd.sev": "N",
         "cmdline": "console=ttyS0 quiet", "cpu.model": "AMD EPYC Processor", "cpu.virt_flags": "npt svm",
         "l1.vcpus": "1", "l1.memory_mib": "3900"}


def _kernel(tmp_path: Path, config_text: str = "CONFIG_KVM=m\n# CONFIG_KASAN is not set\n") -> Kernel:
    config = tmp_path / "config"
    config.write_text(config_text + "CONFIG_HZ=250\nCONFIG_KVM_AMD=m\n")
    return Kernel("debian:bookworm", "x", "6.1", tmp_path / "vmlinuz", config, None, None)


def _conditions_record(side: str, found: dict, boot: str = "boot-1") -> dict:
    return {"kind": "conditions", "side": side, "test": None, "slots": None, "run": None,
            "conditions": found, "boot": boot}


# -- in the guest ------------------------------------------------------------------------
def test_the_guest_reads_its_first_cpus_model_and_only_its_virtualisation_flags():
    assert guest.cpu(CPUINFO) == {"cpu.model": "AMD EPYC Processor",
                                  "cpu.virt_flags": "hypervisor lbrv npt nrip_save svm"}


def test_the_guest_reads_every_kvm_module_parameter_it_can(tmp_path):
    for module, name, value in (("kvm", "tdp_mmu", "Y\n"), ("kvm_amd", "npt", "1\n"), ("ext4", "x", "1")):
        (tmp_path / module / "parameters").mkdir(parents=True, exist_ok=True)
        (tmp_path / module / "parameters" / name).write_text(value)
    (tmp_path / "kvm" / "parameters" / "write_only").mkdir()  # unreadable as a file: left out
    assert guest.module_parameters(str(tmp_path)) == {"kvm.tdp_mmu": "Y", "kvm_amd.npt": "1"}
    assert guest.memory_mib(str(tmp_path / "none"), "MemTotal:        4030000 kB\nMemFree: 1 kB\n") == "3935"
    for number, (start, end, kind) in enumerate([(0, 0x9fbff, "System RAM"), (0x9fc00, 0x9ffff, "Reserved"),
                                                 (0x100000, 0xbffdffff, "System RAM")]):
        (tmp_path / "memmap" / str(number)).mkdir(parents=True)
        for name, value in (("start", hex(start)), ("end", hex(end)), ("type", kind)):
            (tmp_path / "memmap" / str(number) / name).write_text(value + "\n")
    assert guest.memory_mib(str(tmp_path / "memmap"), "MemTotal: 1 kB\n") == "3071"  # 3 GiB less the holes


# -- on the host -------------------------------------------------------------------------
def test_a_boot_adds_its_kernels_kvm_config_and_splits_its_command_line(tmp_path):
    found = conditions.of_boot(json.dumps({**GUEST, "cmdline": "quiet kvm.tdp_mmu=0"}), _kernel(tmp_path))
    assert found["CONFIG_KVM"] == "m" and found["CONFIG_KASAN"] == "n" and found["CONFIG_KVM_AMD"] == "m"
    assert "CONFIG_HZ" not in found
    assert found["cmdline:kvm.tdp_mmu"] == "0" and found["cmdline:quiet"] == ""
    assert record_problem(_conditions_record("base", found)) is None


def test_a_setting_both_sides_have_set_differently_is_a_confound_and_the_rest_only_differ(tmp_path):
    kernel = _kernel(tmp_path)
    base = conditions.of_boot(json.dumps(GUEST), kernel)
    patched = conditions.of_boot(json.dumps({**GUEST, "kvm.tdp_mmu": "N", "kvm_amd.sev": "0",
                                             "kvm.new_param": "1",
                                             "cmdline": "console=ttyS0 quiet kvm.tdp_mmu=0"}), kernel)
    found = conditions.from_records([_conditions_record("base", base),
                                     _conditions_record("patched", patched)])
    names = {d.name: d for d in found.differences}
    # N and 0 are one value (5.10 prints some booleans as 0/1); the whole cmdline is not a row
    assert set(names) == {"kvm.tdp_mmu", "kvm.new_param", "cmdline:kvm.tdp_mmu"}
    assert [d.name for d in found.confounds] == ["kvm.tdp_mmu"]
    assert found.verdict_note() == "conditions differ: kvm.tdp_mmu Y vs N"


def test_a_value_that_changes_between_boots_of_one_side_is_named():
    records = [_conditions_record("base", {**GUEST, "l1.memory_mib": str(mib)}, f"b{mib}")
               for mib in (3900, 3800)]
    records.append(_conditions_record("patched", GUEST))
    found = conditions.from_records(records)
    assert found.boots == {"base": 2, "patched": 1} and found.varies == {"base": ["l1.memory_mib"]}


def _analysis_with(base: dict, patched: dict) -> analysis.Analysis:
    values = {(side, test, slots): [1e6 * s for s in SPREAD]
              for side in ("base", "patched") for test in CONFIG.tests for slots in CONFIG.points}
    records = _records(values) + [_conditions_record("base", base), _conditions_record("patched", patched)]
    return analysis.analyse(CONFIG, records)


def test_the_reports_mark_a_confound_and_name_it_in_the_verdict_without_changing_the_exit_code():
    result = _analysis_with(GUEST, {**GUEST, "kvm.tdp_mmu": "N", "cmdline:kvm.tdp_mmu": "0"})
    text = report.markdown(result)
    assert "| kvm.tdp_mmu | Y | N | ≠ **setting** |" in text
    assert "| cmdline:kvm.tdp_mmu | – | 0 | ≠ |" in text
    assert "| cpu.model | AMD EPYC Processor | AMD EPYC Processor | |" in text
    assert "| kvm.halt_poll_ns |" not in text  # the same on both sides, and not a key condition
    assert text.rstrip().endswith(
        "Verdict: PASS (4 no significant change); conditions differ: kvm.tdp_mmu Y vs N.")
    assert result.exit_code == 0
    assert "kernel arguments: kvm.tdp_mmu=0" in report.kernel_label(CONFIG, "patched")
    every_row = "".join(report.conditions_markdown(result, every_row=True))
    assert "| kvm.halt_poll_ns | 200000 | 200000 |" in every_row
    document = json.loads(report.json_report(result))
    assert document["conditions"]["differences"][-1] == {"name": "kvm.tdp_mmu", "base": "Y", "patched": "N",
                                                         "setting": True}
    assert document["verdict"] == report.verdict_line(result) and len(document["cells"]) == 4
    junit = report.junit(result)
    assert '<property name="conditions.differ" value="conditions differ: kvm.tdp_mmu Y vs N" />' in junit
    assert '<property name="conditions.patched.kvm.tdp_mmu" value="N" />' in junit


def test_a_qualification_of_a_kernel_against_itself_marks_nothing():
    result = _analysis_with(GUEST, dict(GUEST))
    text = report.markdown(result)
    assert "≠" not in text and "conditions differ" not in text
    assert "the guests reported them (1 base and 1 patched boots; a template's guests ask once)" in text


def test_a_store_without_conditions_says_so_and_judges_as_before():
    values = {(side, "move active area", slots): [1e6 * s for s in SPREAD]
              for side in ("base", "patched") for slots in CONFIG.points}
    result = analysis.analyse(CONFIG, _records(values))
    assert "Conditions: not recorded for base and patched" in report.markdown(result)
    assert "conditions differ" not in report.verdict_line(result)


def test_resume_refuses_a_base_append_other_than_the_stored_one(tmp_path):
    config = Config.from_json({**STORE_CONFIG, "base": {**STORE_CONFIG["base"], "append": "kvm.tdp_mmu=0"}})
    store = Store.create(tmp_path / "q", config)
    store.release()
    done = kvmlab("qualify", "--resume", "--base-append", "kvm.tdp_mmu=1", "-o", str(store.directory))
    assert_one_line_error(done, "--resume: --base-append differ")
    done = kvmlab("qualify", "--shard", "1/2", str(tmp_path / "plan"), "--patched-append", "x", "-o",
                  str(tmp_path / "s"))
    assert_one_line_error(done, "drop --patched-append")
