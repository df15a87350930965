"""``sip augment|synth … --engine ray``: generation as a streaming Ray Data pipeline.

    rows (one per grid batch)  →  [read + caption actors]  →  [generator actors]  →  driver: filter verdicts
    (ids, no pixels)               augment only                  img2img / txt2img          written by the one
                                                                 + filter                   DatasetWriter

- **Same output as one process.** Rows are the batches of the one-process batch grid (:mod:`sip.augment.loop`),
  the jobs (prompt, seed, record) are built by the same functions, so every image is drawn in the same batch
  as by ``sip augment`` without Ray: same ids, same bytes, same metadata apart from timestamps.
- **Streaming, bounded memory.** Rows carry ids and source positions only; a reader actor decodes its batch
  from a source it opened once (:meth:`ImageSource.subset`), so sources never pass through the driver.
- **Fault tolerance is Ray's.** Ray Data restarts a dead actor and re-runs its batch; the driver, the only
  writer, skips ids already written, so nothing is lost or written twice. A killed driver is a killed run:
  run the command again and it resumes like any sip run (finished batches are not sent again).
- **Same threads as the local engine.** CPU kernels split their sums by thread count, so an actor runs torch with
  the driver's thread count (what ``sip`` without Ray uses on this machine), not ``ray.num_cpus``: a Ray run
  equals a local one byte for byte, and a run killed under Ray and resumed locally (or back) stays identical.
  ``ray.num_cpus`` is what each actor reserves for scheduling.
- **Fails fast on a bad address** (:mod:`sip.scale.ray_address`), and a Ray this run started is stopped when the
  run ends, is interrupted, or its driver is killed (:mod:`sip.scale.ray_reaper`).
- Models are built once per actor; ``ray.num_gpus`` gives each generator actor its GPU. The one job API
  (:mod:`sip.augment.steps` over :mod:`sip.augment.jobs`, passed in by the caller: this package never imports
  the augmentation side) gives set-up, the grid, the skip of finished ids, the batch steps and the writer.

Ray is an optional extra: ``pip install 'sip[ray]'``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sip.data.run_lock import hold_output
from sip.scale.ray_address import HOW, RayAddressError, check_address
from sip.scale.ray_config import RayConfig
from sip.scale.ray_reaper import watch_local_ray

__all__ = ["require_ray", "run_augment_ray", "run_synth_ray"]

logger = logging.getLogger(__name__)


def require_ray():
    """Import Ray Data, or fail saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError("engine ray needs Ray Data: pip install 'sip[ray]' (or drop --engine ray to generate in "
                          "this process, or under torchrun / accelerate launch)") from e
    return ray


def _start(ray, config: RayConfig) -> bool:
    """Join ``config.address`` (checked first: one line within seconds when no cluster answers) or start a local
    Ray; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    check_address(config.address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if config.address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=config.address, **kwargs)
        except ConnectionError as e:  # answered the port, but is not a Ray head
            raise RayAddressError(f"ray.address {config.address}: could not join a Ray cluster there "
                                  f"({str(e).splitlines()[0][:200]}). {HOW}") from None
    else:
        need = config.workers * config.num_cpus + config.caption_workers * config.num_cpus
        # one CPU more than the actors reserve, for Ray Data's own tasks (else the pipeline waits forever)
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need) + 1), **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar in images, as without Ray
    return True


def _pack(value: Any) -> dict[str, Any]:
    """One row as Ray Data carries it: a pickled object in a binary column (no Arrow type inference of PIL
    images, tuples or nested dicts). Rows travel only between this run's own processes."""
    import pickle

    import numpy as np

    out = np.empty(1, dtype=object)
    out[0] = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return {"row": out}


def _unpack(cell: Any) -> Any:
    import pickle

    return pickle.loads(bytes(cell))


class _Actor:
    """A Ray Data actor around a step of the job API: unpacks a row, runs the step, packs its result."""

    def __init__(self, step: type, kwargs: dict[str, Any]):
        self.step = step(**kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return _pack(self.step(_unpack(batch["row"][0])))


class _ReadCaption(_Actor):
    """The reader + captioner actors (named apart in ``ps`` and Ray's logs)."""


class _Generate(_Actor):
    """The generator actors."""


def _pipeline(ray, api, kind: str, recipe: Any, rows: list[dict[str, Any]], cache_path: str | None):
    import torch

    from sip.config import to_dict

    config, plain = recipe.ray, to_dict(recipe)
    threads = torch.get_num_threads()  # the local engine's, so the bytes are the local engine's
    ds = ray.data.from_items([{"row": _pack(r)["row"][0]} for r in rows],
                             override_num_blocks=max(1, min(len(rows), 200)))
    if kind == "augment":
        reader = {"recipe": plain, "cache_path": cache_path, "threads": threads}
        ds = ds.map_batches(_ReadCaption, fn_constructor_kwargs={"step": api.ReadCaptionStep, "kwargs": reader},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.caption_workers),
                            num_cpus=config.num_cpus)
    generator = {"kind": kind, "recipe": plain, "threads": threads}
    ds = ds.map_batches(_Generate, fn_constructor_kwargs={"step": api.GenerateStep, "kwargs": generator},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.workers), num_cpus=config.num_cpus,
                        num_gpus=config.num_gpus or None)
    return ds


def _drive(ray, api, kind: str, recipe: Any, rows: list[dict[str, Any]], total: int, writer: Any, summary: Any,
           cache: Any) -> None:
    """Stream the pipeline's results into the writer (the driver is the only writer)."""
    done = total - sum(len(r["items"]) for r in rows)
    bar = tqdm(total=total, initial=done, desc=f"{kind} (ray)", unit="img", disable=not recipe.progress,
               dynamic_ncols=True)
    if rows:
        ds = _pipeline(ray, api, kind, recipe, rows, str(cache.path) if cache is not None and cache.path else None)
        for result in ds.iter_rows():
            r = _unpack(result["row"])
            api.settle(r, writer, summary, cache)
            bar.update(r["size"])
            bar.set_postfix(written=summary.written, filtered=summary.filtered, refresh=False)
    bar.close()


def _record(recipe: Any) -> dict[str, Any]:
    return {"processes": recipe.ray.workers, "launcher": "ray"}


def run_synth_ray(recipe: Any, api):
    """``sip synth`` on Ray: the one-process grid of (class, k) batches over a pool of generator actors.

    Args:
        recipe (SynthRecipe): the resolved recipe.
        api (module): the job API (:mod:`sip.augment.steps`), passed in by the caller so this engine never
            imports the augmentation side.
    """
    t0 = time.perf_counter()
    ray = require_ray()
    classes, out = api.prepare_synth(recipe)
    with hold_output(out), _ray_session(ray, recipe.ray):
        writer = api.open_writer(recipe, _describe_remote(ray, api, "synth", recipe), classes, None, mode="txt2img",
                                 **_record(recipe))
        batches = api.synth_grid(classes, recipe)
        rows, skipped = api.open_batches(batches, writer)
        summary = api.RunSummary(str(out), skipped=skipped)
        _drive(ray, api, "synth", recipe, [{"items": b} for b in rows], sum(len(b) for b in batches), writer,
               summary, None)
        summary.complete = writer.finish()
    summary.seconds = time.perf_counter() - t0
    return summary


def run_augment_ray(recipe: Any, api):
    """``sip augment`` on Ray: the one-process grid (chunks of ``recipe.chunk`` sources × variants) over a pool
    of reader + captioner actors and a pool of generator actors (``api`` as in :func:`run_synth_ray`)."""
    t0 = time.perf_counter()
    ray = require_ray()
    source, out = api.prepare_augment(recipe)
    with hold_output(out), _ray_session(ray, recipe.ray):
        writer = api.open_writer(recipe, _describe_remote(ray, api, "augment", recipe), source.classes, None,
                                 mode="img2img", **_record(recipe))
        cache = api.CaptionCache(recipe.caption.cache or Path(out) / "captions.jsonl")
        batches = [b for chunk in api.augment_grid(list(source.source_ids()), recipe) for b in chunk]
        rows, skipped = api.open_batches(batches, writer)
        summary = api.RunSummary(str(out), skipped=skipped)
        _drive(ray, api, "augment", recipe, [{"items": b} for b in rows], sum(len(b) for b in batches), writer,
               summary, cache)
        summary.complete = writer.finish()
        summary.caption_hits, summary.caption_misses = cache.hits, cache.misses
    summary.seconds = time.perf_counter() - t0
    return summary


@contextlib.contextmanager
def _ray_session(ray, config: RayConfig):
    """Join or start Ray for the block; a Ray this run started is shut down at its end, on an exception, and on
    SIGTERM / SIGHUP (which then end the run as Ctrl-C does)."""
    started = _start(ray, config)
    if not started:
        yield
        return
    local = not (config.address or os.environ.get("RAY_ADDRESS"))
    stop_watchdog = watch_local_ray() if local else None  # reaps this Ray if the driver is killed outright
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    main = threading.current_thread() is threading.main_thread()
    if main:
        for sig in previous:
            signal.signal(sig, interrupt)
    try:
        yield
    finally:
        if main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        ray.shutdown()
        if stop_watchdog is not None:
            stop_watchdog()


def _describe_remote(ray, api, kind: str, recipe: Any) -> dict[str, Any]:
    from sip.config import to_dict

    remote = ray.remote(num_cpus=recipe.ray.num_cpus, num_gpus=recipe.ray.num_gpus or None)(api.describe)
    return ray.get(remote.remote(kind, to_dict(recipe)))
