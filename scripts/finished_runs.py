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
