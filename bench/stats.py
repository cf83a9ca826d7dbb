"""Medians, spreads and ratios over interleaved rounds.

Only ratios measured side by side mean anything on a noisy VM: every
configuration's figure in a round is divided by the baseline's figure of
the same round, and the median of those per-round ratios is reported.
"""

from __future__ import annotations

import statistics


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def quantile(xs, q):
    """Nearest-rank quantile (no interpolation: a p99 is a value we saw)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


def spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"min": min(xs), "max": max(xs),
            "iqr": [quantile(xs, 0.25), quantile(xs, 0.75)]}


def summarize(per_round, baseline_per_round):
    """per_round: {round: value}; baseline_per_round: same for the baseline
    of the same phase. Returns the median value, its spread, and the median
    of the same-round ratios with their spread."""
    vals = list(per_round.values())
    ratios = [v / baseline_per_round[r] for r, v in per_round.items()
              if baseline_per_round.get(r)]
    return {
        "median": median(vals),
        "spread": spread(vals),
        "values": vals,
        "ratio": median(ratios),
        "ratio_spread": spread(ratios),
        "ratios": ratios,
    }


def hist_quantile(buckets, q):
    """Quantile estimate from cumulative Prometheus buckets [(le, count)],
    linear inside the bucket, as histogram_quantile() does."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le
