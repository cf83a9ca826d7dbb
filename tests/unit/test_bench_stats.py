"""The benchmark's arithmetic: same-round ratios, quantiles, histogram
quantiles and the targets check (bench/stats.py, bench/report.py)."""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import report, stats  # noqa: E402


def test_ratio_is_taken_within_each_round():
    # the median of per-round ratios (1.3, 0.9, 1.45), not the ratio of the
    # medians (160 / 110 = 1.45)
    cfg = {0: 130.0, 1: 180.0, 2: 160.0}
    base = {0: 100.0, 1: 200.0, 2: 110.0}
    s = stats.summarize(cfg, base)
    assert s["median"] == 160.0
    assert math.isclose(s["ratio"], 1.3)
    assert math.isclose(s["ratio_spread"]["min"], 0.9)
    assert math.isclose(s["ratio_spread"]["max"], 160.0 / 110.0)


def test_round_without_baseline_gives_no_ratio():
    s = stats.summarize({0: 5.0, 1: 6.0}, {1: 3.0})
    assert s["ratios"] == [2.0]


def test_quantile_is_a_value_we_saw():
    xs = list(range(1, 101))
    assert stats.quantile(xs, 0.5) in xs
    assert stats.quantile(xs, 0.99) == 99
    assert stats.quantile([], 0.5) is None


def test_hist_quantile_interpolates_inside_the_bucket():
    buckets = [(0.00001, 0), (0.00005, 50), (0.0001, 100), (float("inf"), 100)]
    assert math.isclose(stats.hist_quantile(buckets, 0.5), 0.00005)
    assert math.isclose(stats.hist_quantile(buckets, 0.75), 0.000075)
    assert stats.hist_quantile([(float("inf"), 0)], 0.5) is None


def test_check_reports_by_how_much_a_target_is_missed():
    t = report.check("x", 1.38, 1.15, "<=")
    assert not t["met"] and t["note"] == "missed by 20 %"
    t = report.check("drops", 12.0, 0, "<=")
    assert not t["met"] and t["note"] == "missed by 12" and t["measured"] == 12
    assert report.check("eps", 350000, 300000, ">=")["met"]
    assert report.check("none", None, 1, "<=")["note"] == "not measured"
