"""Paired comparisons: the one way sip's scripts state a gain (arm A against arm B on the same draws).

A gain measured on a handful of paired draws (the same data draw, seed or image set for both arms) is the
mean of the per-draw differences; its uncertainty is Student's t with ``n - 1`` degrees of freedom, not a
normal "k standard errors": with 3 draws, 2.3 standard errors is a two-sided p of about 0.15, not a shown
gain. :func:`paired_comparison` returns the mean gain, its standard error, the t-based confidence interval
and the two-sided p-value (``scipy.stats``); :meth:`PairedComparison.describe` is the one line the scripts
print.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class PairedComparison:
    """The paired difference ``with_arm - without_arm`` over ``n`` draws.

    Attributes:
        n: Number of paired draws.
        diffs: The per-draw differences, in draw order.
        mean: Mean difference (the gain).
        std: Sample standard deviation of the differences (``n - 1`` in the denominator).
        se: Standard error of the mean, ``std / sqrt(n)``.
        t: The t statistic ``mean / se`` (``inf`` / ``nan`` when ``se`` is 0).
        ci_low: Lower end of the two-sided ``confidence`` interval, ``mean - t_{n-1} * se``.
        ci_high: Upper end of that interval.
        p_value: Two-sided p-value of the paired t-test against no difference.
        confidence: The interval's confidence level (0.95 unless asked otherwise).
    """

    n: int
    diffs: tuple[float, ...]
    mean: float
    std: float
    se: float
    t: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float

    def describe(self, unit: str = "", digits: int = 2) -> str:
        """One line: ``mean +1.20 (SE 0.40, 95% CI [-0.52, +2.92], t(2) = 3.00, p = 0.095)``."""
        f = f"{{:+.{digits}f}}"
        level = f"{100 * self.confidence:g}%"
        return (f"mean {f.format(self.mean)}{unit} (SE {self.se:.{digits}f}, {level} CI "
                f"[{f.format(self.ci_low)}, {f.format(self.ci_high)}]{unit}, t({self.n - 1}) = {self.t:.2f}, "
                f"p = {self.p_value:.3g}, n = {self.n})")

    def to_dict(self, digits: int = 4) -> dict:
        """JSON-ready fields, floats rounded to ``digits``."""
        out = asdict(self)
        out["diffs"] = [round(d, digits) for d in self.diffs]
        for k, v in out.items():
            if isinstance(v, float) and math.isfinite(v):
                out[k] = round(v, digits)
            elif isinstance(v, float):
                out[k] = None if math.isnan(v) else str(v)
        return out


def paired_comparison(with_arm: Sequence[float], without_arm: Sequence[float],
                      confidence: float = 0.95) -> PairedComparison:
    """Compare two arms measured on the same draws (``with_arm[i]`` and ``without_arm[i]`` share draw ``i``).

    Args:
        with_arm: The arm whose gain is claimed, one value per draw.
        without_arm: The reference arm, one value per draw, in the same order.
        confidence: Level of the two-sided t interval, in (0, 1). Defaults to 0.95.

    Returns:
        The :class:`PairedComparison` of ``with_arm - without_arm``.

    Raises:
        ValueError: The arms differ in length, have fewer than 2 draws, or ``confidence`` is not in (0, 1).
    """
    if len(with_arm) != len(without_arm):
        raise ValueError(f"paired arms need one value per draw each; got {len(with_arm)} and {len(without_arm)}")
    if len(with_arm) < 2:
        raise ValueError(f"a paired comparison needs at least 2 draws, got {len(with_arm)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = tuple(float(a) - float(b) for a, b in zip(with_arm, without_arm))
    n = len(diffs)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs)
    se = std / math.sqrt(n)
    dof = n - 1
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, dof)) * se
    if se > 0:
        t = mean / se
        p = float(2 * _scipy_stats.t.sf(abs(t), dof))
    else:  # every draw gave the same difference: no spread to test against
        t = math.copysign(math.inf, mean) if mean else math.nan
        p = 0.0 if mean else 1.0
    return PairedComparison(n=n, diffs=diffs, mean=mean, std=std, se=se, t=t, ci_low=mean - half,
                            ci_high=mean + half, p_value=p, confidence=confidence)
