"""Part 1 of scripts/bench_scale.py: ``sip augment`` / ``sip synth`` with one process, under torchrun and on
Ray actors; throughput (end-to-end and steady), equivalence with the one-process output, and the table."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .scale_launch import REPO, Launch, cell, fresh, launch, to_monotonic

# sip's summary line, one per process; not anchored at a line start: another rank's progress bar (stderr, the
# same log) can run into it
_SUMMARY = re.compile(r"(?:rank (\d+)/(\d+) \((\w+)\): )?written (\d+), skipped (\d+)[^\n]*? in ([\d.]+)s")


@dataclass
class GenRun:
    launch: Launch
    out: Path
    lanes: int  # processes or generator actors drawing in parallel
    ranks: list[dict] = field(default_factory=list)  # the summary line of each process
    images: int = 0
    steady: float | None = None
    end_to_end: float = 0.0
    first_image_s: float | None = None
    equal: dict | None = None


def png_times(out: Path, clock: list[tuple[float, float]]) -> dict[str, float]:
    """When each image was written, on the monotonic clock."""
    return {p.relative_to(out).as_posix(): to_monotonic(p.stat().st_mtime, clock)
            for p in (out / "train").rglob("*.png")}


def steady_rate(mtimes: list[float], lanes: int, batch: int) -> float | None:
    """images/s after the first batch of every lane: (N - lanes × batch) images over the time from the
    (lanes × batch)-th written image to the last. None when too few images for that."""
    t = sorted(mtimes)
    skip = lanes * batch
    if len(t) <= skip or t[-1] <= t[skip - 1]:
        return None
    return (len(t) - skip) / (t[-1] - t[skip - 1])


def summary_lines(output: str, alone: str) -> list[dict]:
    """sip's per-process summary lines in a launch's log; ``alone`` names a line without a rank prefix."""
    return [{"rank": int(m[1] or 1), "world": int(m[2] or 1), "launcher": m[3] or alone,
             "written": int(m[4]), "skipped": int(m[5]), "seconds": float(m[6])} for m in _SUMMARY.finditer(output)]


def digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "train").rglob("*.png"))}


def metadata_rows(out: Path) -> list[str]:
    """The dataset's metadata rows (sip's reader: merged file and shard files), without timestamps."""
    from sip.data.readers import read_metadata

    return sorted(json.dumps({k: v for k, v in r.items() if k != "created"}, sort_keys=True)
                  for r in read_metadata(out))


def compare_outputs(one: Path, other: Path) -> dict:
    """Same file names, same bytes, same metadata (apart from timestamps) as the one-process output; for
    files whose bytes differ, how far their pixels are apart."""
    import numpy as np
    from PIL import Image

    a, b = digests(one), digests(other)
    differing = sorted(k for k in a if k in b and a[k] != b[k])
    max_diff, values = 0, 0
    for k in differing:
        x = np.asarray(Image.open(one / k), dtype=np.int16)
        y = np.asarray(Image.open(other / k), dtype=np.int16)
        if x.shape != y.shape:
            max_diff, values = 255, values + x.size
            continue
        d = np.abs(x - y)
        max_diff, values = max(max_diff, int(d.max())), values + int((d > 0).sum())
    return {"same_files": set(a) == set(b), "files": len(b), "files_one": len(a),
            "identical": sum(1 for k in a if b.get(k) == a[k]),
            "identical_all": bool(a) and a == b, "max_pixel_diff": max_diff, "differing_values": values,
            "same_metadata": metadata_rows(one) == metadata_rows(other)}


def generation_argv(args: argparse.Namespace, out: Path, mode: str) -> list[str]:
    """The sip command of one configuration: "one", "torchrun" or "ray"."""
    kind = args.generate
    recipe = REPO / "pipelines" / ("fmnist_augment.yaml" if kind == "augment" else "fmnist_synth.yaml")
    sets = [f"generate.steps={args.steps}", f"generate.batch_size={args.batch_size}", "generate.device=cpu",
            f"generate.batch_invariant={'true' if args.batch_invariant else 'false'}", "progress=false"]
    if kind == "augment":
        sets += [f"source.shots={args.shots}", f"generate.per_image={args.per_image}", "caption.device=cpu"]
    else:
        sets += [f"generate.per_class={args.shots * args.per_image}"]
    if mode == "ray":
        sets += [f"ray.workers={args.processes}", "ray.num_cpus=1", "ray.caption_workers=1"]
    sip = ["-m", "sip", kind, str(recipe), "-o", str(out), *[x for s in sets for x in ("--set", s)]]
    if mode == "ray":
        sip += ["--engine", "ray"]
    if mode == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(args.processes), *sip]
    return [sys.executable, *sip]


def run_generation(args: argparse.Namespace, root: Path) -> dict[str, GenRun]:
    """Each configuration into ``root/generate/MODE`` (log next to it), then the others against "one"."""
    n = 10 * args.shots * args.per_image
    denoise = int(args.steps * args.strength) if args.generate == "augment" else args.steps
    print(f"\n## 1. generation: sip {args.generate}, shipped model, {n} images ({args.shots} per class × "
          f"{args.per_image}), {args.steps} steps ({denoise} denoising), batch {args.batch_size}, "
          f"batch_invariant {args.batch_invariant}", flush=True)
    modes = ["one", "torchrun"] + ([] if args.skip_ray else ["ray"])
    if "ray" in modes and importlib.util.find_spec("ray") is None:
        print("Ray is not installed (pip install 'sip[ray]'): the Ray configuration is skipped")
        modes.remove("ray")
    runs: dict[str, GenRun] = {}
    for mode in modes:
        out = fresh(root / "generate" / mode)
        name = {"one": "1 process", "torchrun": f"torchrun × {args.processes}",
                "ray": f"ray, {args.processes} actors"}[mode]
        done = launch(name, generation_argv(args, out, mode), root / "generate" / f"{mode}.log",
                      "ray" if mode == "ray" else "local", args.timeout)
        run = GenRun(done, out, 1 if mode == "one" else args.processes)
        run.ranks = summary_lines(done.output, "driver" if mode == "ray" else "process")
        times = png_times(out, done.clock)
        run.images = len(times)
        run.steady = steady_rate(list(times.values()), run.lanes, args.batch_size)
        run.end_to_end = run.images / done.wall_s
        run.first_image_s = (min(times.values()) - done.started) if times else None
        runs[mode] = run
    for mode, run in runs.items():
        if mode != "one":
            run.equal = compare_outputs(runs["one"].out, run.out)
    return runs


def _efficiency(x: float | None, base: float | None, lanes: int) -> float | None:
    """Scaling efficiency: rate with ``lanes`` / (``lanes`` × the one-process rate)."""
    return None if x is None or not base else x / (lanes * base)


def _equal_cells(eq: dict | None) -> tuple[str, str, str]:
    """The "same files", "identical bytes" and "same metadata" cells."""
    if eq is None:
        return "—", "—", "—"
    same = "yes" if eq["same_files"] else f"NO ({eq['files']} vs {eq['files_one']})"
    ident = "yes" if eq["identical_all"] else (f"NO: {eq['identical']}/{eq['files_one']} (max {eq['max_pixel_diff']} "
                                               f"grey levels, {eq['differing_values']} values)")
    return same, ident, "yes" if eq["same_metadata"] else "NO"


def report_generation(args: argparse.Namespace, runs: dict[str, GenRun]) -> dict:
    """Print the table and its notes; return each configuration's numbers by mode."""
    one = runs["one"]
    p = args.processes
    print("\n| configuration | workers seen | images | wall s | first image s | end-to-end img/s | steady img/s "
          "| efficiency (steady) | efficiency (end-to-end) | CPU s | same files | identical bytes | same metadata |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict = {}
    for mode, run in runs.items():
        seen = len(run.launch.workers)
        eff_s = _efficiency(run.steady, one.steady, run.lanes) if mode != "one" else None
        eff_e = _efficiency(run.end_to_end, one.end_to_end, run.lanes) if mode != "one" else None
        same, ident, meta = _equal_cells(run.equal)
        print(f"| {run.launch.name} | {seen} | {run.images} | {run.launch.wall_s:.1f} | {cell(run.first_image_s, 1)} "
              f"| {run.end_to_end:.2f} | {cell(run.steady)} | {cell(eff_s)} | {cell(eff_e)} | {run.launch.cpu_s:.1f} "
              f"| {same} | {ident} | {meta} |")
        summary[mode] = {"images": run.images, "wall_s": round(run.launch.wall_s, 2),
                         "images_per_s_steady": None if run.steady is None else round(run.steady, 3),
                         "images_per_s_end_to_end": round(run.end_to_end, 3), "cpu_s": round(run.launch.cpu_s, 1),
                         "processes_seen": seen, "efficiency_steady": None if eff_s is None else round(eff_s, 3),
                         "efficiency_end_to_end": None if eff_e is None else round(eff_e, 3),
                         "equal": run.equal, "ranks": run.ranks}
    # what each process reported, and whether the launch really split the work
    for mode, run in runs.items():
        lines = "; ".join(f"{r['launcher']} {r['rank']}/{r['world']}: {r['written']} written in {r['seconds']:.1f}s"
                          for r in run.ranks)
        print(f"- {run.launch.name}: sip's summary lines: {lines or 'none found'}")
        if mode == "torchrun" and (len(run.ranks) != p or len(run.launch.workers) != p):
            print(f"  WARNING: asked torchrun for {p} processes; {len(run.ranks)} summary lines, "
                  f"{len(run.launch.workers)} sip processes seen")
        if mode == "ray" and len(run.launch.workers) != p:
            print(f"  WARNING: asked Ray for {p} generator actors; {len(run.launch.workers)} seen")
        if run.images != one.images:
            print(f"  WARNING: {run.images} images written, the one-process run wrote {one.images}")
    torchrun = runs.get("torchrun")
    if not args.batch_invariant and torchrun and torchrun.equal and not torchrun.equal["identical_all"]:
        print("- torchrun's shards batch other images together than one process: batched kernels round differently "
              "(README, Determinism); --batch-invariant draws one image per network call and matches bytes")
    print("- workers seen: sip processes (not torchrun's agent) or Ray generator actors that ran; CPU s: every "
          "process of the launch (Ray: driver, GCS, raylet, actors)")
    print(f"- steady: images written after the first batch of each of the {p} lanes, over the time from that batch "
          f"to the last image; end-to-end includes interpreter start, imports, model loading (and Ray's start)")
    return summary
