"""The A/B statistics on data whose answer is known."""

import numpy as np
import pytest

from kvmlab.stats import IMPROVED, NO_CHANGE, REGRESSED, WELCH_LOG, compare_cell, complexity_fit


def runs(median: float, spread: float, count: int, seed: int) -> np.ndarray:
    return median * np.random.default_rng(seed).lognormal(0, spread, count)


def test_a_clear_slowdown_is_a_regression_with_its_size():
    cell = compare_cell(runs(1.0, 0.02, 10, 1), runs(1.3, 0.02, 10, 2))
    assert cell.verdict == REGRESSED
    assert 0.25 < cell.change < 0.35 and cell.ci_low < cell.change < cell.ci_high and cell.ci_low > 0
    assert cell.p_value < 0.01


def test_a_clear_speedup_is_an_improvement():
    assert compare_cell(runs(1.0, 0.02, 10, 1), runs(0.5, 0.02, 10, 2)).verdict == IMPROVED


def test_the_same_distribution_is_no_change():
    cell = compare_cell(runs(1.0, 0.2, 10, 1), runs(1.0, 0.2, 10, 2))
    assert cell.verdict == NO_CHANGE and cell.ci_low < 0 < cell.ci_high


def test_a_significant_change_below_the_threshold_is_no_change():
    base, patched = runs(1.0, 0.001, 20, 1), runs(1.02, 0.001, 20, 2)
    assert compare_cell(base, patched).p_value < 0.001
    assert compare_cell(base, patched, threshold=0.05).verdict == NO_CHANGE
    assert compare_cell(base, patched, threshold=0.01).verdict == REGRESSED


def test_too_few_runs_is_refused():
    with pytest.raises(ValueError):
        compare_cell([1.0], [1.0, 2.0])


SLOTS = np.array([10, 30, 50, 100, 509, 2000, 8000, 32764])


@pytest.mark.parametrize("truth,times", [
    ("constant", 5.0 + 0 * SLOTS),
    ("log n", 3.0 + 2.0 * np.log2(SLOTS)),
    ("n", 1.0 + 0.01 * SLOTS),
    ("n log n", 1.0 + 0.001 * SLOTS * np.log2(SLOTS)),
])
def test_complexity_fit_finds_the_growth_class(truth, times):
    noisy = times * np.random.default_rng(3).normal(1, 0.01, len(SLOTS))
    fit = complexity_fit(SLOTS, noisy)
    assert fit.best == truth
    assert truth == "constant" or fit.r_squared > 0.99


MATRIX = np.repeat([10, 30, 50, 100, 509], 3)


def test_a_covariate_takes_its_share_before_a_class_is_called():
    """A move whose time is a fixed lookup plus work in its slot's size (the test's area over n
    slots): without the slot size as a covariate its 1/n decline is credited to a class."""
    noisy = (100.0 + 5000.0 / MATRIX) * np.random.default_rng(5).normal(1, 0.002, len(MATRIX))
    assert complexity_fit(MATRIX, noisy).best != "constant"
    fit = complexity_fit(MATRIX, noisy, 1 / MATRIX, "slot size")
    assert fit.best == "constant" and fit.covariate == "slot size" and fit.r_squared > 0.99


def test_classes_the_data_cannot_tell_apart_are_named_as_tied():
    flat = 100.0 * np.random.default_rng(7).normal(1, 0.05, len(MATRIX))
    fit = complexity_fit(MATRIX, flat)
    assert fit.tied and all(fit.aic[name] - fit.aic[fit.best] < 2 for name in fit.tied)
    linear = (1.0 + 0.01 * MATRIX) * np.random.default_rng(7).normal(1, 0.001, len(MATRIX))
    clear = complexity_fit(MATRIX, linear)
    assert clear.best == "n" and clear.tied == []


# -- the instruction clock's comparison: Welch's t on log times ----------------------------
def test_welch_log_calls_a_large_tight_change_with_three_runs_where_the_rank_test_cannot():
    base, patched = [150.6, 152.4, 153.9], [311.0, 312.5, 314.2]  # +106 %, as measured by hand
    assert compare_cell(base, patched).verdict == NO_CHANGE  # U's floor with 3 a side is p = 0.1
    cell = compare_cell(base, patched, threshold=0.02, method=WELCH_LOG)
    assert cell.verdict == REGRESSED and cell.p_value < 1e-4
    assert 1.0 < cell.ci_low < cell.change < cell.ci_high < 1.12


def test_welch_log_catches_three_percent_over_half_a_percent_of_noise():
    base, patched = runs(1.0, 0.005, 3, 1), runs(1.03, 0.005, 3, 2)
    cell = compare_cell(base, patched, threshold=0.02, method=WELCH_LOG)
    assert cell.verdict == REGRESSED and 0.015 < cell.change < 0.045


def test_welch_log_keeps_a_bimodal_cell_honest():
    base, patched = [4.0, 2.0, 4.0], [4.0, 4.0, 2.1]  # modes, not a change
    cell = compare_cell(base, patched, threshold=0.02, method=WELCH_LOG)
    assert cell.verdict == NO_CHANGE and cell.ci_low < 0 < cell.ci_high


def test_welch_log_on_identical_runs():
    same = compare_cell([5.0, 5.0], [5.0, 5.0], method=WELCH_LOG)
    assert same.verdict == NO_CHANGE and same.p_value == 1.0
    apart = compare_cell([5.0, 5.0], [5.5, 5.5], threshold=0.02, method=WELCH_LOG)
    assert apart.verdict == REGRESSED and apart.ci_low == pytest.approx(0.1)
