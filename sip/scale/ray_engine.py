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
  (:mod:`sip.augment.jobs`) gives set-up, the grid, the skip of finished ids, the jobs and the writer.

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


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


class _ReadCaption:
    """Reader + captioner actor: decodes the sources of a grid batch and captions them."""

    def __init__(self, recipe: dict[str, Any], cache_path: str | None, threads: int):
        from sip.augment.caption import CaptionCache, build_captioner
        from sip.augment.jobs import AugmentRecipe
        from sip.config import from_dict
        from sip.data.sources import open_source

        _threads(threads)
        self.recipe = from_dict(AugmentRecipe, recipe)
        self.source = open_source(self.recipe.source)
        self.captioner = build_captioner(self.recipe.caption)
        self.cache = CaptionCache(cache_path)
        self.cache.path = None  # read only: the driver is the one writer of captions.jsonl

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from sip.augment.caption import caption_images
        from sip.ids import image_hash

        row = _unpack(batch["row"][0])
        view = self.source.subset(sorted({pos for pos, _, _ in row["items"]}))
        samples = {s.source_id: s for s in view}
        hashes = {sid: image_hash(s.image) for sid, s in samples.items()}
        identity = self.captioner.identity
        missing = {sid for sid, h in hashes.items() if self.cache.get(h, identity) is None}  # before captioning
        captions = dict(zip(samples, caption_images([s.image for s in samples.values()], self.captioner, self.cache,
                                                    self.recipe.caption.batch_size, list(hashes.values()))))
        row["samples"], row["hashes"], row["captions"] = samples, hashes, captions
        row["new_captions"] = [(hashes[sid], identity, captions[sid]) for sid in missing]
        row["caption_hits"], row["caption_misses"] = len(samples) - len(missing), len(missing)
        row["unreadable"] = [f"{s.path}: {s.reason}" for s in view.skipped]
        return _pack(row)


class _Generate:
    """Generator actor: builds the jobs of a grid batch, draws them whole, filters them."""

    def __init__(self, kind: str, recipe: dict[str, Any], threads: int):
        from sip.augment.filter import build_filter
        from sip.augment.generate import DiffusionGenerator
        from sip.augment.jobs import AugmentRecipe, SynthRecipe, batch_generator, prompt_builder
        from sip.config import from_dict

        _threads(threads)
        self.kind = kind
        self.recipe = from_dict(AugmentRecipe if kind == "augment" else SynthRecipe, recipe)
        self.generator = DiffusionGenerator.from_config(self.recipe.generate)
        self.filter = build_filter(self.recipe.filter)
        self.builder = prompt_builder(self.recipe.prompt, self.generator)
        self.generate = batch_generator(self.generator, "img2img" if kind == "augment" else "txt2img",
                                        self.recipe.prompt.negative_prompt)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from sip.augment.jobs import augment_jobs, synth_jobs
        from sip.augment.loop import make_batch

        row = _unpack(batch["row"][0])
        settings = self.generator.settings()
        if self.kind == "augment":
            jobs = augment_jobs(row["items"], row["samples"], row["captions"], row["hashes"], self.builder,
                                self.recipe, settings)
        else:
            jobs = synth_jobs(row["items"], self.builder, self.recipe, settings)
        outcomes = make_batch(jobs, self.generate, self.filter) if jobs else []
        result = {"size": len(row["items"]), "outcomes": outcomes, "new_captions": row.get("new_captions", []),
                  "unreadable": row.get("unreadable", []), "caption_hits": row.get("caption_hits", 0),
                  "caption_misses": row.get("caption_misses", 0)}
        return _pack(result)


def _describe(kind: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """Run in a worker with a generator's resources: what ``run.json`` says of the generator (and, for
    ``augment``, the captioner identity that keys the caption cache), as the actors will build them."""
    from sip.augment.caption import build_captioner
    from sip.augment.generate import DiffusionGenerator
    from sip.augment.jobs import AugmentRecipe, SynthRecipe
    from sip.augment.loop import generator_info
    from sip.config import from_dict

    parsed = from_dict(AugmentRecipe if kind == "augment" else SynthRecipe, recipe)
    info = generator_info(DiffusionGenerator.from_config(parsed.generate))
    if kind == "augment":
        info["captioner"] = build_captioner(parsed.caption).identity
    return info


def _pipeline(ray, kind: str, recipe: Any, rows: list[dict[str, Any]], cache_path: str | None):
    import torch

    from sip.config import to_dict

    config, plain = recipe.ray, to_dict(recipe)
    threads = torch.get_num_threads()  # the local engine's, so the bytes are the local engine's
    ds = ray.data.from_items([{"row": _pack(r)["row"][0]} for r in rows],
                             override_num_blocks=max(1, min(len(rows), 200)))
    if kind == "augment":
        ds = ds.map_batches(_ReadCaption, fn_constructor_kwargs={"recipe": plain, "cache_path": cache_path,
                                                                 "threads": threads},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.caption_workers),
                            num_cpus=config.num_cpus)
    ds = ds.map_batches(_Generate, fn_constructor_kwargs={"kind": kind, "recipe": plain, "threads": threads},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.workers), num_cpus=config.num_cpus,
                        num_gpus=config.num_gpus or None)
    return ds


def _drive(ray, kind: str, recipe: Any, rows: list[dict[str, Any]], total: int, writer: Any, summary: Any,
           cache: Any) -> None:
    """Stream the pipeline's results into the writer (the driver is the only writer)."""
    from sip.augment.loop import write_outcomes

    done = total - sum(len(r["items"]) for r in rows)
    bar = tqdm(total=total, initial=done, desc=f"{kind} (ray)", unit="img", disable=not recipe.progress,
               dynamic_ncols=True)
    if rows:
        ds = _pipeline(ray, kind, recipe, rows, str(cache.path) if cache is not None and cache.path else None)
        for result in ds.iter_rows():
            r = _unpack(result["row"])
            write_outcomes(r["outcomes"], writer, summary)
            if cache is not None:  # the actors looked captions up; the driver counts and stores them
                cache.hits += r["caption_hits"]
                cache.misses += r["caption_misses"]
                cache.put(item for item in r["new_captions"] if cache.get(item[0], item[1]) is None)
            summary.add_unreadable(r["unreadable"])
            bar.update(r["size"])
            bar.set_postfix(written=summary.written, filtered=summary.filtered, refresh=False)
    bar.close()


def _record(recipe: Any) -> dict[str, Any]:
    return {"processes": recipe.ray.workers, "launcher": "ray"}


def run_synth_ray(recipe: Any):
    """``sip synth`` on Ray: the one-process grid of (class, k) batches over a pool of generator actors."""
    from sip.augment.jobs import RunSummary, open_batches, open_writer, prepare_synth, synth_grid

    t0 = time.perf_counter()
    ray = require_ray()
    classes, out = prepare_synth(recipe)
    with hold_output(out), _ray_session(ray, recipe.ray):
        writer = open_writer(recipe, _describe_remote(ray, "synth", recipe), classes, None, mode="txt2img",
                             **_record(recipe))
        batches = synth_grid(classes, recipe)
        rows, skipped = open_batches(batches, writer)
        summary = RunSummary(str(out), skipped=skipped)
        _drive(ray, "synth", recipe, [{"items": b} for b in rows], sum(len(b) for b in batches), writer, summary,
               None)
        summary.complete = writer.finish()
    summary.seconds = time.perf_counter() - t0
    return summary


def run_augment_ray(recipe: Any):
    """``sip augment`` on Ray: the one-process grid (chunks of ``recipe.chunk`` sources × variants) over a pool
    of reader + captioner actors and a pool of generator actors."""
    from sip.augment.caption import CaptionCache
    from sip.augment.jobs import RunSummary, augment_grid, open_batches, open_writer, prepare_augment

    t0 = time.perf_counter()
    ray = require_ray()
    source, out = prepare_augment(recipe)
    with hold_output(out), _ray_session(ray, recipe.ray):
        writer = open_writer(recipe, _describe_remote(ray, "augment", recipe), source.classes, None, mode="img2img",
                             **_record(recipe))
        cache = CaptionCache(recipe.caption.cache or Path(out) / "captions.jsonl")
        batches = [b for chunk in augment_grid(list(source.source_ids()), recipe) for b in chunk]
        rows, skipped = open_batches(batches, writer)
        summary = RunSummary(str(out), skipped=skipped)
        _drive(ray, "augment", recipe, [{"items": b} for b in rows], sum(len(b) for b in batches), writer, summary,
               cache)
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


def _describe_remote(ray, kind: str, recipe: Any) -> dict[str, Any]:
    from sip.config import to_dict

    remote = ray.remote(num_cpus=recipe.ray.num_cpus, num_gpus=recipe.ray.num_gpus or None)(_describe)
    return ray.get(remote.remote(kind, to_dict(recipe)))
