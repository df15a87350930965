"""Reusing a finished experiment only when it is the run that was asked for.

The experiment drivers (``scripts/student_experiments.py``, ``scripts/sip_ablation.py``) keep each finished run
and return its metrics when they are started again. That is only sound when the finished run's resolved settings
equal the requested ones: a driver compares them, reuses an equal run, and refuses a different one with the
differing keys, unless ``--rerun`` asks to redo it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class StaleRunError(SystemExit):
    """A finished run exists under the requested name but was made with other settings."""


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; tuples compare as lists."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def differing_keys(saved: dict, requested: dict, ignore: set[str] = frozenset()) -> list[str]:
    """The dotted keys whose values differ between two (nested) settings dicts, ``ignore`` left out."""
    old, new = flat(saved), flat(requested)
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k, "<unset>") != new.get(k, "<unset>"))


def reuse_or_refuse(where: Path, changed: list[str], rerun: bool, saved: dict | None = None,
                    requested: dict | None = None) -> bool:
    """Decide what to do with the finished run at ``where``.

    Args:
        where: The finished run (folder or result file), named in the message.
        changed: The keys whose resolved values differ from the requested run's.
        rerun: ``--rerun`` was given: a different finished run is redone instead of refused.
        saved: The finished run's flat settings, to show old values (optional).
        requested: The requested run's flat settings, to show new values (optional).

    Returns:
        True to reuse the finished run (no key differs), False to run it again (``rerun`` and keys differ).

    Raises:
        StaleRunError: Keys differ and ``rerun`` is False; the message lists them and the ways on.
    """
    if not changed:
        return True
    if rerun:
        print(f"  {where}: finished with other settings ({', '.join(changed)}); --rerun: running it again",
              flush=True)
        return False
    shown = [f"{k}: {saved.get(k, '<unset>')!r} -> {requested.get(k, '<unset>')!r}"
             if saved is not None and requested is not None else k for k in changed]
    raise StaleRunError(
        f"{where} holds a finished run made with other settings than requested:\n  " + "\n  ".join(shown)
        + "\nits results are not this run's: pass --rerun to redo it, choose another --out, or request the "
          "settings it was made with")


def finished_run(out: Path, requested: Any, rerun: bool) -> bool:
    """True when ``out`` holds a finished ``sip train`` / ``sip distill`` run of exactly ``requested`` (a recipe
    object): its ``final_metrics.json`` exists and ``sip.train.run_dir.recipe_changes`` finds no key that decides
    results differing from its ``config.yaml``. A different finished run is refused (:func:`reuse_or_refuse`)."""
    import yaml

    from sip.config import to_dict
    from sip.train.run_dir import recipe_changes

    if not (out / "final_metrics.json").is_file():
        return False
    saved = out / "config.yaml"
    if not saved.is_file():
        if rerun:
            return False
        raise SystemExit(f"{out} has final_metrics.json but no config.yaml: it cannot be checked against the "
                         f"requested run; move it away or pass --rerun")
    changed = recipe_changes(requested, saved)
    return reuse_or_refuse(out, changed, rerun, flat(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}),
                           flat(to_dict(requested)))


def run_sip(cli: list[str], cwd: Path, threads: int) -> None:
    """``sip <cli>`` (this interpreter's) with ``threads`` OpenMP threads and the hubs offline, the caller's
    environment otherwise (a frozen checkout's PYTHONPATH runs its own sip); exits naming the command on failure."""
    import os
    import shlex
    import subprocess
    import sys

    sip = str(Path(sys.executable).with_name("sip"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sip, *cli], cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: sip {shlex.join(cli)}")


def mean_std(values: list[float]) -> str:
    """``mean ± std`` of a table cell (one value as is, none as a dash)."""
    import statistics

    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "—"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired(with_arm: dict, without_arm: dict, label: str, out: dict, unit: str = " pt") -> None:
    """Print and record in ``out[label]`` the paired gain ``with_arm - without_arm`` over their common draws (keys),
    with its t-interval (``sip.report.stats``); fewer than 2 common draws are reported, not tested."""
    from sip.report.stats import paired_comparison

    both = sorted(set(with_arm) & set(without_arm))
    if len(both) < 2:
        print(f"{label}: {len(both)} paired draw(s) finished; a t-interval needs 2 or more")
        return
    gain = paired_comparison([with_arm[d] for d in both], [without_arm[d] for d in both])
    out[label] = {**gain.to_dict(2), "draws": both}
    print(f"{label}, paired by {both}: {', '.join(f'{x:+.2f}' for x in gain.diffs)}; {gain.describe(unit)}")


def execute(run: Any, args: Any, show: Any) -> None:
    """Reuse, report as missing (``args.report``), or run one experiment run and read its final metrics into
    ``run.metrics``. ``run`` has ``out``, ``table``, ``key``, ``cli()`` and ``requested()`` (the drivers' ``Run``);
    ``args.rerun`` redoes a finished run made with other settings; ``args.threads`` (default 1) threads per run;
    ``show(metrics)`` is the line printed when a run ends."""
    import json
    import shlex
    import time

    done = run.out / "final_metrics.json"
    cli = run.cli()
    if finished_run(run.out, run.requested(), args.rerun):
        run.metrics = json.loads(done.read_text())
        return
    if done.is_file():  # --rerun of a run made with other settings: start the folder over
        cli += ["--set", "run.resume=false"]
    if args.report:
        print(f"  {run.table} {run.key}: not finished ({run.out})", flush=True)
        return
    print("sip " + shlex.join(cli), flush=True)
    t0 = time.time()
    run_sip(cli, Path(__file__).resolve().parents[1], getattr(args, "threads", 1))
    run.metrics = json.loads(done.read_text())
    print(f"  {run.table} {run.key}: {show(run.metrics)} ({time.time() - t0:.0f}s)", flush=True)
