"""The statistics behind an A/B verdict: per-cell change with confidence, and complexity fits.

Times are "lower is better". A cell (one test at one slot count) compares the runs of a
base kernel with those of a patched one the way Go's benchstat does: medians, the
relative change of the medians, a Mann-Whitney U test (no normality assumed: run times
under emulation are skewed and bimodal), and a practical threshold below which a
significant change is still reported as no change. The confidence interval of the
change is a percentile bootstrap of the ratio of medians.

Under the instruction clock (icount) runs repeat to a fraction of a percent, and the
rank test is the wrong tool: with 3 runs a side Mann-Whitney U cannot go below p = 0.1,
even for a +106 % change whose interval is [+104 %, +108 %]. There the comparison is
Welch's t-test on log times (``WELCH_LOG``): the change is the ratio of geometric
means, its 95 % interval comes from the t distribution with Welch's degrees of
freedom, and a cell whose runs fall into modes gets a wide interval and a high p, as
it should. A run is a boot there (qualify boots afresh for each round), so the spread
between boots is inside the statistics, not hidden from them.

The complexity fit answers the scalable-memslots series' claim (O(n) memslot work before the trees, O(log
n) after): time against slot count is fitted as a + b·f(n) for f in constant, log n, n
and n log n, and the model with the lowest AIC wins (the constant model has one
parameter fewer, so it wins unless the slope explains enough).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMPROVED, REGRESSED, NO_CHANGE = "improved", "regressed", "no significant change"
MANN_WHITNEY, WELCH_LOG = "mann-whitney", "welch-log"
METHODS = (MANN_WHITNEY, WELCH_LOG)
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
    method: str = MANN_WHITNEY
    lower_is_better: bool = True

    @property
    def improvement(self) -> float:
        """The change in the better direction: positive is better, whichever way that is."""
        return -self.change if self.lower_is_better else self.change


def compare_cell(base, patched, alpha: float = 0.05, threshold: float = 0.05,
                 seed: int = 0, method: str = MANN_WHITNEY, lower_is_better: bool = True) -> CellComparison:
    """Base against patched runs of one cell (times, unless ``lower_is_better`` is off:
    rates, where more is better); ``threshold`` is the practical floor."""
    base, patched = np.asarray(base, dtype=float), np.asarray(patched, dtype=float)
    if len(base) < 2 or len(patched) < 2:
        raise ValueError("a cell needs at least two runs of each kernel")
    base_median, patched_median = float(np.median(base)), float(np.median(patched))
    if method == WELCH_LOG:
        ratio, low, high, p_value = welch_log_ratio(base, patched)
    elif method == MANN_WHITNEY:
        from scipy.stats import mannwhitneyu  # scipy costs a second to import: only when comparing

        ratio, low, high = bootstrap_ratio(base, patched, np.median, seed)
        p_value = float(mannwhitneyu(base, patched, alternative="two-sided").pvalue)
    else:
        raise ValueError(f"unknown comparison method {method!r}")
    change = ratio - 1
    verdict = NO_CHANGE
    if p_value < alpha and abs(change) >= threshold:
        verdict = IMPROVED if (change < 0) == lower_is_better else REGRESSED
    return CellComparison(base_median, patched_median, float(base.min()), float(patched.min()), change,
                          low - 1, high - 1, p_value, verdict, (len(base), len(patched)), method,
                          lower_is_better)


def welch_log_ratio(base, patched, level: float = 0.95) -> tuple[float, float, float, float]:
    """Ratio of geometric means (patched / base), its ``level`` interval and Welch's two-sided p.

    Identical runs on each side (possible under icount) have no spread: then any
    difference at all is certain (p = 0) and none is no evidence (p = 1).
    """
    log_base, log_patched = np.log(np.asarray(base, float)), np.log(np.asarray(patched, float))
    difference = float(log_patched.mean() - log_base.mean())
    var_base = log_base.var(ddof=1) / len(log_base)
    var_patched = log_patched.var(ddof=1) / len(log_patched)
    error = math.sqrt(var_base + var_patched)
    if error == 0:
        ratio = math.exp(difference)
        return ratio, ratio, ratio, 0.0 if difference else 1.0
    freedom = (var_base + var_patched) ** 2 / (
        var_base**2 / (len(log_base) - 1) + var_patched**2 / (len(log_patched) - 1)
    )
    from scipy.stats import t as student_t  # scipy costs a second to import: only when comparing

    p_value = float(2 * student_t.sf(abs(difference) / error, freedom))
    half = float(student_t.ppf(0.5 + level / 2, freedom)) * error
    return math.exp(difference), math.exp(difference - half), math.exp(difference + half), p_value


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


#: Candidates within this much AIC of the best have substantial support too (Burnham and
#: Anderson's rule of thumb): the fit cannot tell them from the best.
AIC_TIE = 2.0


@dataclass(frozen=True)
class ComplexityFit:
    best: str
    r_squared: float
    """Of the best model (0 for the constant one without a covariate: it explains no variance)."""
    aic: dict[str, float]
    covariate: str | None = None
    """What else the times were fitted against, besides the growth class (e.g. the slot size)."""

    @property
    def tied(self) -> list[str]:
        """The other classes the data cannot tell from the best."""
        least = self.aic[self.best]
        return [name for name, value in self.aic.items() if name != self.best and value - least < AIC_TIE]


def complexity_fit(slots, times, covariate=None, covariate_name: str | None = None) -> ComplexityFit:
    """The growth class that best explains ``times`` against ``slots`` (at least 3 counts).

    Each class is fitted as a + b·f(n), by least squares, and the best has the least AIC.
    ``covariate`` (one value per time) is what else the work grows with as the test
    varies n, such as the size of the slot a move test moves: every class then gets
    a third term c·covariate, so that its share is not credited to f(n)."""
    n, t = np.asarray(slots, dtype=float), np.asarray(times, dtype=float)
    if len(set(n)) < 3 + (covariate is not None):
        raise ValueError("a complexity fit needs at least three distinct slot counts (four with a covariate)")
    extra = [] if covariate is None else [np.asarray(covariate, dtype=float)]
    total = float(((t - t.mean()) ** 2).sum())
    aic, r_squared = {}, {}
    for name, feature in COMPLEXITY.items():
        columns = [np.ones_like(n)] + ([] if name == "constant" else [feature(n)]) + extra
        design = np.column_stack(columns)
        coefficients, *_ = np.linalg.lstsq(design, t, rcond=None)
        residual = max(float(((t - design @ coefficients) ** 2).sum()), 1e-300)
        aic[name] = len(t) * math.log(residual / len(t)) + 2 * len(columns)
        r_squared[name] = 1 - residual / total if total else 1.0
    best = min(aic, key=aic.get)
    explained = 0.0 if best == "constant" and covariate is None else r_squared[best]
    return ComplexityFit(best, explained, aic, covariate_name)
