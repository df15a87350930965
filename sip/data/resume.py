"""Resume: is a folder's run the same as this one? (used by :class:`sip.data.bank.DatasetWriter` on open).

Only the keys that decide what the images are count: where and how fast they are made
(:data:`VOLATILE_KEYS`) never does, a local path compares resolved, a local LoRA file by its content
(:data:`CONTENT_KEYS`), and the model folder shipped inside sip compares by its name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sip
from sip.ids import file_sha256

__all__ = ["CONTENT_KEYS", "LAUNCH_KEYS", "PATH_KEYS", "VOLATILE_KEYS", "config_differences", "resolve_paths"]

# Config keys that decide where or how fast images are made, not what they are (compared nowhere).
VOLATILE_KEYS = frozenset({"shard", "batch_size", "device", "progress", "output", "chunk", "cache", "engine", "ray"})
# Top-level run.json keys saying how the latest launch ran (process count, launcher): never compared (only
# ``config`` is), and brought up to date when a folder is resumed under another launch.
LAUNCH_KEYS = frozenset({"processes", "launcher"})
# Config keys that may hold a local path (stored resolved, so `IN` and `/abs/IN` are the same config).
PATH_KEYS = frozenset({"path", "model", "tiny_vae", "cache"})
# Config keys naming a local file whose bytes decide the images (a LoRA): stored and compared with the file's
# SHA-256, so a file replaced under the same name is another run (a hub id compares by its name).
CONTENT_KEYS = frozenset({"lora"})
_SHIPPED_MODELS = Path(sip.__file__).resolve().parent / "models"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of a nested config, leaving out :data:`VOLATILE_KEYS` at any depth."""
    if not isinstance(node, dict):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if key in VOLATILE_KEYS:
            continue
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_paths(config: Any) -> Any:
    """The config with every local path (keys in :data:`PATH_KEYS`) made absolute and resolved, so a run
    started with ``--input IN`` and one with ``--input /abs/IN`` store and compare the same value. A
    model or cache value that is not an existing local path (a hub id) is left as it is."""
    if isinstance(config, dict):
        return {k: (_resolve(v, k == "path") if k in PATH_KEYS and isinstance(v, str)
                    else _with_digest(v) if k in CONTENT_KEYS and isinstance(v, str) else resolve_paths(v))
                for k, v in config.items()}
    return config


def _with_digest(value: str) -> str:
    """A local LoRA as ``"<resolved file> sha256:<hex>"`` (a folder: its one ``.safetensors`` file); anything else
    (a hub id, a value that already carries its digest) as it is."""
    path = Path(value).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        path = files[0] if len(files) == 1 else path
    if not path.is_file():
        return value
    return f"{path.resolve()} sha256:{file_sha256(path)}"


def _resolve(value: str, always: bool) -> str:
    path = Path(value).expanduser()
    if always or path.exists():
        return str(path.resolve())
    return value


def _same_model_folder(value: Any) -> Any:
    """A model folder shipped inside some sip installation compares by its name (``sip/models/<name>``), so
    the previous release's install path and this one's are the same default model."""
    if isinstance(value, str):
        path = Path(value)
        if path.parent.name == "models" and path.parent.parent.name == "sip" and (_SHIPPED_MODELS / path.name).is_dir():
            return f"<sip>/models/{path.name}"
    return value


def config_differences(previous: dict[str, Any], current: dict[str, Any],
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """The image-deciding config keys on which two runs differ, as ``"key: <previous> in run.json, <current>
    now"`` lines ([] when a folder may be resumed).

    Keys in :data:`VOLATILE_KEYS` (output, shard, batch size, device, progress, chunk, caption cache) are
    not compared; paths are compared resolved; a key the previous run's config lacks (a newer sip added it)
    takes its value from ``defaults``, the config a recipe has when nothing is set.

    Args:
        previous (dict): the ``config`` of the folder's ``run.json``.
        current (dict): this run's resolved config.
        defaults (dict, optional): this sip's default config for the same recipe. Defaults to None (a key
            missing from ``previous`` is then a difference).
    """
    old, new = _flatten(resolve_paths(previous)), _flatten(resolve_paths(current))
    fill = _flatten(resolve_paths(defaults or {}))
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        before = old.get(key, fill.get(key, missing))
        after = new.get(key, missing)
        if _same_model_folder(before) != _same_model_folder(after):
            show = lambda v: "(absent)" if v is missing else json.dumps(v, ensure_ascii=False)
            was = show(before) + (" (absent, the default)" if key not in old and before is not missing else "")
            lines.append(f"{key}: {was} in run.json, {show(after)} now")
    return lines
