"""Restate a paired gain from per-draw results: the one statistics helper (``sip.report.stats``) on numbers typed in.

The README's older tables list each arm's per-draw test accuracies; this prints the paired gain of one arm over
the other with its standard error, t-based 95 % interval and p-value, so every gain README states comes with the
command that prints it (run folders of those tables are not needed).

Usage::

    python scripts/paired_gain.py --with 87.56 87.61 88.17 --without 85.52 86.40 87.91
"""

from __future__ import annotations

import argparse
import json

from sip.report.stats import paired_comparison


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with", dest="with_arm", type=float, nargs="+", required=True,
                    help="the arm whose gain is claimed, one value per draw")
    ap.add_argument("--without", dest="without_arm", type=float, nargs="+", required=True,
                    help="the reference arm, same draws in the same order")
    ap.add_argument("--confidence", type=float, default=0.95)
    args = ap.parse_args(argv)
    result = paired_comparison(args.with_arm, args.without_arm, args.confidence)
    print(result.describe(" pt"))
    shown = result.ci_low > 0 or result.ci_high < 0
    print("the interval excludes zero: a difference these draws show" if shown
          else "the interval includes zero: no difference these draws can show")
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main()
