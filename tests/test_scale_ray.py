"""sip.scale.ray_engine: ``--engine ray`` writes what one process writes (same ids, bytes, metadata), survives a
killed generator actor with nothing lost or written twice, resumes a folder a local run started; recipe
checks and the error without Ray need no cluster."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe, SynthRecipe, run_synth
from sip.config import ConfigError, load_config
from sip.data.bank import read_run_info
from sip.data.resume import config_differences
from sip.data.sources import FashionMNISTSource, ImageFolderSource, SourceConfig
from sip.scale.ray_config import RayConfig

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "bird"]
GEN = {"steps": 3, "per_class": 4, "batch_size": 3, "device": "cpu"}


def digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "train").rglob("*.png"))}


def rows(out: Path) -> list[dict]:
    lines = (out / "train" / "metadata.jsonl").read_text().splitlines()
    return sorted(({k: v for k, v in json.loads(line).items() if k != "created"} for line in lines),
                  key=lambda r: r["file_name"])


# --------------------------------------------------------------------------------------------------
# no cluster needed
# --------------------------------------------------------------------------------------------------

def test_engine_ray_with_a_shard_or_an_unknown_engine_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="drop shard 1/2"):
        SynthRecipe(classes=CLASSES, engine="ray", shard="1/2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("engine: spark\n")
    with pytest.raises(ConfigError, match="engine must be one of local, ray"):
        load_config(SynthRecipe, recipe)
    with pytest.raises(ValueError, match="ray.workers"):
        RayConfig(workers=0)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    from sip.scale import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'sip\[ray\]'"):
        ray_engine.require_ray()


def test_engine_and_ray_settings_do_not_stop_a_folder_from_resuming():
    local = {"output": "o", "generate": {"steps": 3}, "engine": "local", "ray": {"workers": 2}}
    ray = {"output": "o", "generate": {"steps": 3}, "engine": "ray", "ray": {"workers": 8, "address": "auto"}}
    assert config_differences(local, ray) == []
    assert config_differences(local, {**ray, "generate": {"steps": 4}}) == ["generate.steps: 3 in run.json, 4 now"]


def test_a_source_subset_decodes_the_samples_a_full_pass_decodes(image_folder):
    for source in (ImageFolderSource(image_folder), FashionMNISTSource("train", shots=2, start=50000)):
        ids, every = list(source.source_ids()), {s.source_id: s for s in source}
        positions = [p for p in (7, 0, 5, 2) if ids[p] in every][:3]  # positions count unreadable files too
        got = list(source.subset(positions))
        assert [s.source_id for s in got] == [ids[p] for p in positions]
        assert all(a.image.tobytes() == every[a.source_id].image.tobytes()
                   and a.label == every[a.source_id].label for a in got)
        assert list(source.source_ids()) == ids  # the source itself is untouched


# --------------------------------------------------------------------------------------------------
# a local Ray (2 CPUs): equal to one process, a killed actor, resume
# --------------------------------------------------------------------------------------------------

def _ray_or_skip():
    pytest.importorskip("ray", reason="pip install 'sip[ray]'")


def synth_recipe(out: Path, model: Path, gen: dict | None = None, **kw) -> SynthRecipe:
    return SynthRecipe(classes=CLASSES, generate=GenerateConfig(**{**GEN, "model": str(model), **(gen or {})}),
                       output=str(out), progress=False, **kw)


# A local Ray cluster talks over localhost TCP (pytest-socket blocks it by default) and starts in ~10 s; each
# actor imports torch and diffusers and loads the model.
def ray_test(fn):
    for mark in (pytest.mark.slow, pytest.mark.enable_socket, pytest.mark.timeout(900)):
        fn = mark(fn)
    return fn


@ray_test
def test_ray_synth_equals_one_process_and_resumes_a_local_run(tiny_sd_dir, tiny_sd_txt2img, tmp_path):
    _ray_or_skip()
    one, out = tmp_path / "one", tmp_path / "ray"
    # no batch_invariant: a shard takes whole batches of the one-process grid, as Ray's rows are
    cfg = GenerateConfig(**{**GEN, "model": str(tiny_sd_dir)})
    run_synth(synth_recipe(one, tiny_sd_dir), DiffusionGenerator(tiny_sd_txt2img, cfg, model_id=str(tiny_sd_dir)))
    # a local run did half the ids (shard 1 of 2) and stopped; the Ray engine finishes the folder
    local = run_synth(SynthRecipe(classes=CLASSES, generate=cfg, output=str(out), progress=False, shard="1/2"),
                      DiffusionGenerator(tiny_sd_txt2img, cfg, model_id=str(tiny_sd_dir)))
    total = len(CLASSES) * GEN["per_class"]
    assert 0 < local.written < total and not local.complete
    summary = run_synth(synth_recipe(out, tiny_sd_dir, engine="ray", ray=RayConfig(workers=2)))
    assert summary.complete and summary.failed == 0
    assert summary.written == total - local.written and summary.skipped == local.written
    assert digests(out) == digests(one)
    assert rows(out) == rows(one)
    info = read_run_info(out)
    assert (info["processes"], info["launcher"]) == (2, "ray")


@ray_test
def test_ray_augment_equals_one_process(tiny_sd_dir, image_folder, tmp_path):
    _ray_or_skip()
    from sip.augment.caption import CaptionConfig
    from sip.augment.run import run_augment

    def recipe(out: Path, engine: str) -> AugmentRecipe:
        return AugmentRecipe(source=SourceConfig(kind="folder", path=str(image_folder)),
                             caption=CaptionConfig(image_size=64, device="cpu"),
                             # the folder holds an unreadable file: both engines build the grid from the listed
                             # positions (the batch holding it draws the others), so no batch_invariant is needed
                             generate=GenerateConfig(steps=3, per_image=2, batch_size=3, strength=0.6, device="cpu",
                                                     model=str(tiny_sd_dir)),
                             output=str(out), chunk=4, progress=False, engine=engine,
                             ray=RayConfig(workers=2, caption_workers=1))

    one = run_augment(recipe(tmp_path / "one", "local"))
    two = run_augment(recipe(tmp_path / "ray", "ray"))
    assert two.written == one.written > 0 and two.failed == one.failed == 1  # bird/broken.png, named in both
    assert [u.split(":")[0] for u in two.unreadable] == [u.split(":")[0] for u in one.unreadable]
    assert digests(tmp_path / "ray") == digests(tmp_path / "one")
    assert rows(tmp_path / "ray") == rows(tmp_path / "one")
    captions = lambda out: sorted((out / "captions.jsonl").read_text().splitlines())
    assert captions(tmp_path / "ray") == captions(tmp_path / "one")


def _generator_actors() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in ps if "_Generate" in line and "ray::" in line]


@ray_test
def test_ray_survives_a_killed_generator_actor(tiny_sd_dir, tiny_sd_txt2img, tmp_path):
    _ray_or_skip()
    one, out = tmp_path / "one", tmp_path / "ray"
    per_class = 8
    cfg = GenerateConfig(**{**GEN, "per_class": per_class, "batch_size": 2, "model": str(tiny_sd_dir)})
    run_synth(SynthRecipe(classes=CLASSES, generate=cfg, output=str(one), progress=False),
              DiffusionGenerator(tiny_sd_txt2img, cfg, model_id=str(tiny_sd_dir)))
    flags = ["synth", "-o", str(out), "--model", str(tiny_sd_dir), "--per-class", str(per_class), "--steps", "3",
             "--engine", "ray", "--set", f"classes={json.dumps(CLASSES)}", "--set", "generate.device=cpu",
             "--set", "generate.batch_size=2", "--set", "progress=false", "--set", "ray.workers=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sip", *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline and killed is None:
        if len(list((out / "train").rglob("*.png"))) >= 2 and (actors := _generator_actors()):
            os.kill(actors[0], signal.SIGKILL)  # mid-run: a worker dies with batches in flight
            killed = actors[0]
        time.sleep(0.2)
    output = proc.communicate(timeout=300)[0]
    assert killed is not None, "the run ended before a generator actor could be killed:\n" + output
    assert proc.returncode == 0, output
    assert digests(out) == digests(one)  # nothing lost, nothing written twice, same bytes
    assert rows(out) == rows(one)


@ray_test
def test_ray_writes_the_local_engines_bytes_at_the_drivers_thread_count(tiny_sd_dir, tiny_sd_txt2img, tmp_path):
    """Torch's CPU sums depend on the thread count (2 of these 60 images differ between 1 and 2 threads), so the
    actors run with the driver's threads, not ray.num_cpus (1): the Ray run equals the local one byte for byte."""
    _ray_or_skip()
    import torch

    gen = {"per_class": 20, "batch_size": 8}
    cfg = GenerateConfig(**{**GEN, **gen, "model": str(tiny_sd_dir)})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_synth(synth_recipe(tmp_path / "one", tiny_sd_dir, gen),
                  DiffusionGenerator(tiny_sd_txt2img, cfg, model_id=str(tiny_sd_dir)))
        summary = run_synth(synth_recipe(tmp_path / "ray", tiny_sd_dir, gen, engine="ray",
                                         ray=RayConfig(workers=1, num_cpus=1)))
    finally:
        torch.set_num_threads(threads)
    assert summary.written == 60
    assert digests(tmp_path / "ray") == digests(tmp_path / "one")


def _ray_processes_of(pid: int) -> dict[int, str]:
    import psutil

    found = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(m in line for m in ("ray::", "raylet", "gcs_server", "dashboard", "runtime_env")):
            found[child.pid] = line[:80]
    return found


def _alive(pids) -> dict[int, str]:
    import psutil

    alive = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive[pid] = " ".join(proc.cmdline())[:80]
        except psutil.Error:
            continue
    return alive


@ray_test
def test_a_killed_ray_driver_leaves_no_process_behind_and_a_local_run_finishes_its_folder_byte_identically(
        tiny_sd_dir, tiny_sd_txt2img, tmp_path):
    """A driver killed outright (SIGKILL) leaves no Ray process behind (DashboardAgent, RuntimeEnvAgent, raylet,
    workers) within seconds; the lock it left is taken over, and a local run at the driver's thread count
    finishes the folder with the bytes of an uninterrupted local run."""
    _ray_or_skip()
    import torch

    one, out = tmp_path / "one", tmp_path / "ray"
    gen = {"per_class": 20, "batch_size": 8}
    cfg = GenerateConfig(**{**GEN, **gen, "model": str(tiny_sd_dir)})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what the driver below runs with (OMP_NUM_THREADS=2)
    try:
        run_synth(synth_recipe(one, tiny_sd_dir, gen), DiffusionGenerator(tiny_sd_txt2img, cfg,
                                                                          model_id=str(tiny_sd_dir)))
        flags = ["synth", "-o", str(out), "--model", str(tiny_sd_dir), "--per-class", "20", "--steps", "3",
                 "--engine", "ray", "--set", f"classes={json.dumps(CLASSES)}", "--set", "generate.device=cpu",
                 "--set", "generate.batch_size=8", "--set", "progress=false", "--set", "ray.workers=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "sip", *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        ray_procs, deadline = {}, time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            ray_procs.update(_ray_processes_of(proc.pid))
            if len(list((out / "train").rglob("*.png"))) >= 16:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0]
        ray_procs.update(_ray_processes_of(proc.pid))
        assert any("DashboardAgent" in v or "dashboard" in v for v in ray_procs.values()), ray_procs
        proc.kill()  # SIGKILL: the driver runs no more code
        proc.communicate(timeout=60)
        left, until = _alive(ray_procs), time.time() + 10
        while left and time.time() < until:
            time.sleep(0.5)
            left = _alive(ray_procs)
        assert left == {}, f"Ray processes outlived the killed driver by 10 s: {left}"
        written = rows(out)
        assert 0 < len(written) < 60
        assert {r["file_name"]: digests(out)["train/" + r["file_name"]] for r in written} == \
            {r["file_name"]: digests(one)["train/" + r["file_name"]] for r in written}  # Ray's bytes = local's
        resumed = run_synth(synth_recipe(out, tiny_sd_dir, gen), DiffusionGenerator(tiny_sd_txt2img, cfg,
                                                                                    model_id=str(tiny_sd_dir)))
    finally:
        torch.set_num_threads(threads)
    assert resumed.written == 60 - len(written) and resumed.complete
    assert digests(out) == digests(one) and rows(out) == rows(one)
