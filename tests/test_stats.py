"""sip.report.stats: the paired comparison every script uses to state a gain, checked against cases
computed by hand (Student's t with 2 degrees of freedom has a closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2)))."""

from __future__ import annotations

import math

import pytest

from sip.report.stats import paired_comparison


def test_three_draws_match_the_hand_computed_t_interval_and_p_value():
    # differences 1, 2, 3: mean 2, std 1, SE 1/sqrt(3), t = 2 sqrt(3); with 2 dof the two-sided p is
    # 1 - t / sqrt(2 + t^2) = 1 - sqrt(6/7), and t_0.975 solves q / sqrt(2 + q^2) = 0.95: q = sqrt(1.805 / 0.0975)
    r = paired_comparison([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert r.n == 3 and r.diffs == (1.0, 2.0, 3.0)
    assert r.mean == pytest.approx(2.0) and r.std == pytest.approx(1.0)
    assert r.se == pytest.approx(1 / math.sqrt(3))
    assert r.t == pytest.approx(2 * math.sqrt(3))
    assert r.p_value == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)
    half = math.sqrt(1.805 / 0.0975) / math.sqrt(3)
    assert (r.ci_low, r.ci_high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert r.ci_low < 0 < r.ci_high  # "2 standard errors" here is no shown gain
    assert "95% CI" in r.describe() and "p = 0.0742" in r.describe()


def test_the_issue_case_two_point_three_standard_errors_on_three_draws_is_p_about_0_15():
    # diffs with mean / SE = 2.3 on 3 draws: p = 1 - 2.3 / sqrt(2 + 2.3^2) = 0.148, not the normal 0.021
    se = 1 / math.sqrt(3)
    d = [2.3 * se - 1, 2.3 * se, 2.3 * se + 1]
    r = paired_comparison(d, [0.0, 0.0, 0.0])
    assert r.t == pytest.approx(2.3)
    assert r.p_value == pytest.approx(1 - 2.3 / math.sqrt(2 + 2.3 ** 2), rel=1e-9)
    assert r.p_value > 0.1


def test_the_sign_follows_the_arm_order_and_a_large_sample_tends_to_the_normal_interval():
    a = [float(i % 7) for i in range(400)]
    b = [x + 0.5 + 0.01 * (i % 3) for i, x in enumerate(a)]
    r = paired_comparison(a, b)
    assert r.mean < 0 and r.ci_high < 0
    assert (r.ci_high - r.mean) / r.se == pytest.approx(1.966, abs=2e-3)  # t_0.975 at 399 dof


def test_constant_differences_and_bad_inputs():
    r = paired_comparison([3.0, 4.0], [1.0, 2.0])
    assert r.se == 0 and r.p_value == 0.0 and r.ci_low == r.ci_high == 2.0
    with pytest.raises(ValueError, match="one value per draw"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 draws"):
        paired_comparison([1.0], [0.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_comparison([1.0, 2.0], [0.0, 0.0], confidence=95)
