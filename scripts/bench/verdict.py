"""The rows of sip's own contributions against the baseline (diffusers' batched call at the same precision), what
each row's quality rests on *in this run*, and the two headline ratios scripts/bench_generate.py prints last.

A row is "equal quality" only when this run showed it: its images are the baseline's within ``EXACT_LEVELS`` grey
levels (same arithmetic, other kernels), or ``--quality`` judged its way in this run within ``tolerance`` of the
reference (DDIM 30) on both measures at the same settings. Every other row says "quality not judged in this run".
Nothing here is fixed text: every number printed comes from the rows passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

EXACT_LEVELS = 2  # max |d| in grey levels still "the same images" (fp32 kernels differ in rounding: ±1)
QUALITY_REFERENCE = "sip today: DDIM 30"


@dataclass
class Row:
    """One of sip's contributions, measured against its baseline in this run."""

    way: str
    precision: str
    batch_size: int
    images_per_s: float
    baseline_per_s: float
    max_diff: int | None = None     # grey levels from the baseline's images with the same seeds (None: other images)
    quality_way: str | None = None  # the name of this way in scripts/bench/quality_curve.py, when it has one
    note: str = ""

    @property
    def x(self) -> float:
        return self.images_per_s / self.baseline_per_s


def judge_rows(rows: list[Row], quality: list[dict] | None, tolerance: float = 0.01) -> list[dict]:
    """Each row with what its quality rests on in this run: ``exact``, ``judged`` (with the measured deltas) or
    ``not judged``."""
    by_way = {q["way"]: q for q in quality or []}
    ref = by_way.get(QUALITY_REFERENCE)
    out = []
    for r in rows:
        item = {"way": r.way, "precision": r.precision, "batch": r.batch_size, "images_per_s": round(r.images_per_s, 3),
                "x_baseline": round(r.x, 3), "max_diff": r.max_diff}
        q = by_way.get(r.quality_way) if r.quality_way else None
        if r.max_diff is not None and r.max_diff <= EXACT_LEVELS:
            item.update(quality="exact", equal_quality=True,
                        why=f"the baseline's images within {r.max_diff} grey levels")
        elif q is not None and ref is not None:
            dp = q["preservation_0.5"] - ref["preservation_0.5"]
            df = q["txt2img_fidelity"] - ref["txt2img_fidelity"]
            equal = dp >= -tolerance and df >= -tolerance
            item.update(quality="judged in this run", equal_quality=equal, preservation_delta=round(dp, 4),
                        fidelity_delta=round(df, 4),
                        why=f"judged in this run: preservation {100 * dp:+.1f} pt, txt2img fidelity {100 * df:+.1f} pt "
                            f"vs {QUALITY_REFERENCE} ({'within' if equal else 'NOT within'} "
                            f"{100 * tolerance:g} pt on both)")
        else:
            item.update(quality="not judged in this run", equal_quality=False,
                        why="quality not judged in this run" + (f" ({r.note})" if r.note else
                                                                "" if r.quality_way else ": speed only"))
        out.append(item)
    return out


def print_verdict(label: str, judged: list[dict]) -> dict:
    """Prints every row and returns ``speedup_same_precision`` (fastest fp32 row with the baseline's images) and
    ``speedup_equal_quality`` (fastest row shown equal in quality in this run; None when none was)."""
    print(f"\nverdict ({label}): each of sip's contributions against diffusers-batched (same precision, scheduler, "
          f"steps, batch)")
    for j in judged:
        print(f"  {j['way']:<40} {j['precision']:>5} b{j['batch']:<4} {j['images_per_s']:>9.2f} img/s "
              f"{j['x_baseline']:>6.2f}x  {j['why']}")
    same = [j for j in judged if j["precision"] == "fp32" and j["quality"] == "exact"]
    equal = [j for j in judged if j["equal_quality"]]
    best_same = max(same, key=lambda j: j["x_baseline"], default=None)
    best_equal = max(equal, key=lambda j: j["x_baseline"], default=None)
    if best_same:
        print(f"  same precision, same images: {best_same['way']} {best_same['x_baseline']:.2f}x")
    if best_equal:
        print(f"  equal quality (shown in this run): {best_equal['way']} {best_equal['x_baseline']:.2f}x")
    return {"speedup_same_precision": best_same["x_baseline"] if best_same else None,
            "speedup_same_precision_way": best_same["way"] if best_same else None,
            "speedup_equal_quality": best_equal["x_baseline"] if best_equal else None,
            "speedup_equal_quality_way": best_equal["way"] if best_equal else None,
            f"{label}_rows": judged}
