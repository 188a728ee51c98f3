"""The statistics behind an A/B verdict: per-cell change with confidence, and complexity fits.

Times are "lower is better". A cell (one test at one slot count) compares the runs of a
base kernel with those of a patched one the way Go's benchstat does: medians, the
relative change of the medians, a Mann-Whitney U test (no normality assumed: run times
under emulation are skewed and bimodal), and a practical threshold below which a
significant change is still reported as no change. The confidence interval of the
change is a percentile bootstrap of the ratio of medians.

The complexity fit answers the seed's claim (O(n) memslot work before the trees, O(log
n) after): time against slot count is fitted as a + b·f(n) for f in constant, log n, n
and n log n, and the model with the lowest AIC wins (the constant model has one
parameter fewer, so it wins unless the slope explains enough).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu

IMPROVED, REGRESSED, NO_CHANGE = "improved", "regressed", "no significant change"
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class CellComparison:
    base_median: float
    patched_median: float
    base_min: float
    patched_min: float
    change: float
    """patched median / base median - 1: negative is faster."""
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    runs: tuple[int, int]


def compare_cell(base, patched, alpha: float = 0.05, threshold: float = 0.05,
                 seed: int = 0) -> CellComparison:
    """Base against patched run times of one cell; ``threshold`` is the practical floor."""
    base, patched = np.asarray(base, dtype=float), np.asarray(patched, dtype=float)
    if len(base) < 2 or len(patched) < 2:
        raise ValueError("a cell needs at least two runs of each kernel")
    base_median, patched_median = float(np.median(base)), float(np.median(patched))
    ratio, low, high = bootstrap_ratio(base, patched, np.median, seed)
    change = ratio - 1
    p_value = float(mannwhitneyu(base, patched, alternative="two-sided").pvalue)
    verdict = NO_CHANGE
    if p_value < alpha and abs(change) >= threshold:
        verdict = IMPROVED if change < 0 else REGRESSED
    return CellComparison(base_median, patched_median, float(base.min()), float(patched.min()), change,
                          low - 1, high - 1, p_value, verdict, (len(base), len(patched)))


def bootstrap_ratio(base, patched, statistic=np.mean, seed: int = 0) -> tuple[float, float, float]:
    """statistic(patched) / statistic(base) and its 95 % percentile-bootstrap interval."""
    base, patched = np.asarray(base, dtype=float), np.asarray(patched, dtype=float)
    rng = np.random.default_rng(seed)
    base_values = statistic(rng.choice(base, (BOOTSTRAP_RESAMPLES, len(base))), axis=1)
    patched_values = statistic(rng.choice(patched, (BOOTSTRAP_RESAMPLES, len(patched))), axis=1)
    low, high = np.percentile(patched_values / base_values, [2.5, 97.5])
    return float(statistic(patched) / statistic(base)), float(low), float(high)


COMPLEXITY = {
    "constant": lambda n: np.zeros_like(n),
    "log n": np.log2,
    "n": lambda n: n,
    "n log n": lambda n: n * np.log2(n),
}


@dataclass(frozen=True)
class ComplexityFit:
    best: str
    r_squared: float
    """Of the best model (0 for the constant one, which explains no variance by design)."""
    aic: dict[str, float]


def complexity_fit(slots, times) -> ComplexityFit:
    """The growth class that best explains ``times`` against ``slots`` (at least 3 counts)."""
    n, t = np.asarray(slots, dtype=float), np.asarray(times, dtype=float)
    if len(set(n)) < 3:
        raise ValueError("a complexity fit needs at least three distinct slot counts")
    total = float(((t - t.mean()) ** 2).sum())
    aic, r_squared = {}, {}
    for name, feature in COMPLEXITY.items():
        x = feature(n)
        parameters = 1 if name == "constant" else 2
        if parameters == 1:
            residual = total
        else:
            design = np.column_stack([np.ones_like(x), x])
            coefficients, *_ = np.linalg.lstsq(design, t, rcond=None)
            residual = float(((t - design @ coefficients) ** 2).sum())
        residual = max(residual, 1e-300)
        aic[name] = len(t) * math.log(residual / len(t)) + 2 * parameters
        r_squared[name] = 1 - residual / total if total else 1.0
    best = min(aic, key=aic.get)
    return ComplexityFit(best, 0.0 if best == "constant" else r_squared[best], aic)
