"""sip.scale.launch: rank and world from the launcher's environment, the shard each process generates, the
warning when a launcher came up with fewer processes than asked, and real multi-process runs under torchrun
(CPU processes stand in for GPUs) that equal a one-process run and resume under another process count."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import SynthRecipe, run_synth
from sip.data.bank import read_metadata, read_run_info
from sip.scale.launch import Launch, detect_launch, generation_shard, process_device, warn_if_alone

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "bird"]
# no batch_invariant: each process takes whole batches of the one-process grid, so every image is drawn in the
# batch it has in one process and batched float kernels round the same way.
GEN = {"steps": 3, "per_class": 4, "batch_size": 4, "device": "cpu", "batch_invariant": False}

TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3", "TORCHELASTIC_RUN_ID": "x",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
ACCELERATE_ONE = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "29500"}


# --------------------------------------------------------------------------------------------------
# rank / world / launcher from the environment
# --------------------------------------------------------------------------------------------------

def test_no_launcher_is_one_process():
    assert detect_launch({}, parent_argv=[]) == Launch(0, 1, 0, "none", None)
    assert Launch().shard is None and Launch().record() == {"processes": 1, "launcher": "none"}


def test_torchrun_environment_gives_rank_world_and_local_rank():
    launch = detect_launch(TORCHRUN_ENV)
    assert (launch.rank, launch.world, launch.local_rank, launch.launcher) == (1, 3, 1, "torchrun")
    assert launch.shard == (2, 3) and launch.record() == {"processes": 3, "launcher": "torchrun"}
    assert launch.describe() == "rank 2/3 (torchrun)"


def test_accelerate_and_mpirun_environments_are_named():
    accelerate = detect_launch({**TORCHRUN_ENV, "ACCELERATE_MIXED_PRECISION": "no"})
    assert (accelerate.launcher, accelerate.world, accelerate.shortfall) == ("accelerate", 3, None)
    mpi = detect_launch({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (mpi.rank, mpi.world, mpi.launcher) == (0, 2, "mpirun")


@pytest.mark.parametrize("env, match", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "two", "WORLD_SIZE": "2"}, "RANK='two' in the environment is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
])
def test_a_broken_launch_environment_is_an_error_naming_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        detect_launch(env)


# --------------------------------------------------------------------------------------------------
# a launcher that asked for N processes but started one
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, asked", [
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "sip", "synth"],
     "2"),
    (["/venv/bin/accelerate", "launch", "--num-processes=4", "-m", "sip", "augment"], "4"),
    (["/venv/bin/python", "-m", "accelerate.commands.launch", "--num_processes", "3", "sip"], "3"),
])
def test_accelerate_starting_one_of_n_processes_warns_once(argv, asked, caplog):
    launch = detect_launch(ACCELERATE_ONE, parent_argv=argv)
    assert (launch.world, launch.launcher) == (1, "accelerate")
    with caplog.at_level(logging.WARNING, logger="sip.scale.launch"):
        message = warn_if_alone(launch)
    assert [r.getMessage() for r in caplog.records] == [message]
    assert f"asked for {asked} processes" in message and "only this one came up" in message and "\n" not in message


def test_accelerate_asked_for_several_without_saying_how_many_still_warns():
    launch = detect_launch(ACCELERATE_ONE, parent_argv=["/bin/bash"])
    assert "more than one process" in warn_if_alone(launch)


@pytest.mark.parametrize("env, argv", [
    ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}, ["accelerate", "launch", "-m", "sip"]),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, ["accelerate", "launch", "--num_processes", "1", "-m", "sip"]),
    ({"MASTER_ADDR": "10.0.0.1"}, ["python", "-m", "sip"]),  # plain sip in a job script that exports MASTER_ADDR
    (TORCHRUN_ENV, ["torchrun", "--nproc_per_node", "3"]),
])
def test_no_warning_when_every_process_asked_for_came_up(env, argv, caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_if_alone(detect_launch(env, parent_argv=argv)) is None
    assert not caplog.records


# --------------------------------------------------------------------------------------------------
# the shard and device of each process
# --------------------------------------------------------------------------------------------------

def test_each_process_takes_the_shard_of_its_rank_and_shard_flag_works_alone():
    assert generation_shard(None, Launch(0, 1)) is None
    assert generation_shard("2/4", Launch(0, 1)) == (2, 4)
    assert [generation_shard(None, Launch(r, 3, launcher="torchrun")) for r in range(3)] == [(1, 3), (2, 3), (3, 3)]


def test_shard_flag_under_a_multi_process_launch_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"--shard 1/2 .*2-process torchrun launch \(WORLD_SIZE=2\)"):
        generation_shard("1/2", Launch(0, 2, launcher="torchrun"))


def test_cli_refuses_shard_under_torchrun_before_any_model_loads(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sip.cli import app

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["synth", "--shard", "1/2", "--output", str(out),
                                      "--model", str(tmp_path / "none"), "--set", 'classes=["cat"]'])
    assert result.exit_code == 2
    assert "--shard 1/2" in result.output and "2-process torchrun launch" in result.output
    assert not out.exists()


def test_each_process_of_a_machine_gets_its_own_gpu():
    assert process_device("auto", Launch(3, 4, 1, "torchrun"), cuda_devices=2) == "cuda:1"
    assert process_device("cuda", Launch(2, 4, 2, "torchrun"), cuda_devices=2) == "cuda:0"
    assert process_device("cuda:1", Launch(0, 2, 0, "torchrun"), cuda_devices=2) == "cuda:1"  # explicit: kept
    assert process_device("auto", Launch(0, 2, 0, "torchrun"), cuda_devices=0) == "auto"  # CPU processes
    assert process_device("auto", Launch(), cuda_devices=2) == "auto"


# --------------------------------------------------------------------------------------------------
# processes in one test process (each run is one rank): resume under another process count
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_in_process(tiny_sd_txt2img, tiny_sd_dir):
    def run(out: Path, launch: Launch):
        cfg = GenerateConfig(**{**GEN, "model": str(tiny_sd_dir)})
        recipe = SynthRecipe(classes=CLASSES, generate=cfg, output=str(out), progress=False)
        return run_synth(recipe, DiffusionGenerator(tiny_sd_txt2img, cfg, model_id=str(tiny_sd_dir)), launch=launch)
    return run


def digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "train").rglob("*.png"))}


def merged_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in [*(out / "train").glob("*shard-*"), *(out / "train").glob(".shard-*"),
                                   *out.glob("rejected.shard-*")])


@pytest.mark.parametrize("then", [3, 1])
def test_a_launch_killed_under_two_processes_resumes_under_another_count(synth_in_process, tmp_path, then):
    one, out = tmp_path / "one", tmp_path / "out"
    synth_in_process(one, Launch())
    first = synth_in_process(out, Launch(0, 2, 0, "torchrun"))  # rank 2 of 2 died before writing anything
    assert not first.complete and 0 < first.written < len(digests(one))
    assert [p for p in shard_files(out) if p.startswith("metadata.")] == ["metadata.shard-1-of-2.jsonl"]
    later = [synth_in_process(out, Launch(r, then, r, "torchrun" if then > 1 else "none")) for r in range(then)]
    assert sum(s.written for s in later) == len(digests(one)) - first.written
    assert sum(s.skipped for s in later) == first.written  # every id done under 2 is recognised under `then`
    assert later[-1].complete
    rows = merged_rows(out)
    assert len(rows) == len({r["file_name"] for r in rows}) == len(digests(one)) == len(read_metadata(out))
    assert digests(out) == digests(one) and shard_files(out) == []
    info = read_run_info(out)
    assert (info["processes"], info["launcher"]) == (then, "torchrun" if then > 1 else "none")


# --------------------------------------------------------------------------------------------------
# real processes under torchrun
# --------------------------------------------------------------------------------------------------

def sip_synth(out: Path, model: Path, processes: int) -> subprocess.CompletedProcess:
    flags = ["synth", "--output", str(out), "--model", str(model), "--per-class", str(GEN["per_class"]),
             "--steps", str(GEN["steps"]), "--set", f"classes={json.dumps(CLASSES)}", "--set", "generate.device=cpu",
             "--set", f"generate.batch_size={GEN['batch_size']}",
             "--set", "progress=false"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([*launcher, "-m", "sip", *flags], capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO)


@pytest.mark.slow  # two launches of 2 and 3 processes: ~90 s here (each process imports torch and diffusers)
def test_torchrun_two_processes_equal_one_and_a_relaunch_under_three_adds_nothing(synth_in_process, tiny_sd_dir,
                                                                                 tmp_path):
    one, out = tmp_path / "one", tmp_path / "out"
    synth_in_process(one, Launch())
    two = sip_synth(out, tiny_sd_dir, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [line for line in two.stdout.splitlines() if line.startswith("rank ")]
    assert sorted(line.split(":")[0] for line in lines) == ["rank 1/2 (torchrun)", "rank 2/2 (torchrun)"]
    assert sum(int(line.split("written ")[1].split(",")[0]) for line in lines) == len(digests(one))
    assert digests(out) == digests(one)  # the same ids, the same bytes
    rows = merged_rows(out)
    assert sorted(r["file_name"] for r in rows) == sorted(p.split("/", 1)[1] for p in digests(one))
    strip = lambda rs: sorted((json.dumps({k: v for k, v in r.items() if k != "created"}, sort_keys=True) for r in rs))
    assert strip(rows) == strip(merged_rows(one))  # the same metadata apart from timestamps
    assert shard_files(out) == [] and (out / "config.yaml").is_file()
    assert {k: read_run_info(out)[k] for k in ("processes", "launcher")} == {"processes": 2, "launcher": "torchrun"}

    three = sip_synth(out, tiny_sd_dir, 3)  # relaunch, another process count, nothing left to do
    assert three.returncode == 0, three.stderr[-3000:]
    assert three.stdout.count("written 0,") == 3
    assert merged_rows(out) == rows and digests(out) == digests(one) and shard_files(out) == []
    assert read_run_info(out)["processes"] == 3


# --------------------------------------------------------------------------------------------------
# whole batches of the one-process grid: the bytes of one process whatever the count
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def nine_sources(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "nine"
    for k in range(9):
        (root / CLASSES[k % 3]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24 + k, 20), (20 * k, 255 - 25 * k, 90)).save(root / CLASSES[k % 3] / f"{k}.png")
    return root


def recorded(generator: DiffusionGenerator, calls: list) -> DiffusionGenerator:
    """The generator, noting the seeds of every batch it draws (one tuple per network call)."""
    real = generator.img2img

    def img2img(images, prompts, seeds, negative):
        calls.append(tuple(seeds))
        return real(images, prompts, seeds, negative)
    generator.img2img = img2img
    return generator


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_draws_whole_batches_of_the_one_process_grid_and_writes_its_bytes(
        nine_sources, tiny_sd_img2img, fixed_captioner, tmp_path, world):
    """9 sources x 2 variants in batches of 4 and chunks of 5 sources: a grid (4, 4, 2 | 4, 4) no process count
    divides evenly. Without batch_invariant, the processes together draw exactly the one-process batches."""
    from sip.augment.run import AugmentRecipe, run_augment
    from sip.data.sources import SourceConfig

    cfg = GenerateConfig(steps=3, per_image=2, batch_size=4, strength=0.6, device="cpu", batch_invariant=False)

    def run(out: Path, launch: Launch, calls: list):
        recipe = AugmentRecipe(source=SourceConfig(kind="folder", path=str(nine_sources)), generate=cfg,
                               output=str(out), chunk=5, progress=False)
        generator = recorded(DiffusionGenerator(tiny_sd_img2img, cfg, model_id="tiny"), calls)
        return run_augment(recipe, generator, fixed_captioner, launch=launch)

    one_calls, many_calls = [], []
    run(tmp_path / "one", Launch(), one_calls)
    assert [len(c) for c in one_calls] == [4, 4, 2, 4, 4]
    summaries = [run(tmp_path / "many", Launch(r, world, r, "torchrun"), many_calls) for r in range(world)]
    assert sorted(many_calls) == sorted(one_calls)  # the same batches, split whole between the processes
    assert sum(s.written for s in summaries) == 18 and summaries[-1].complete
    assert digests(tmp_path / "many") == digests(tmp_path / "one")
    strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "created"}, sort_keys=True) for r in rs)
    assert strip(merged_rows(tmp_path / "many")) == strip(merged_rows(tmp_path / "one"))


def test_opening_a_writer_keeps_the_temp_files_of_live_processes(tmp_path):
    """Processes of a launch open their writers at different times: one must not delete the temp file another
    is about to rename. A dead process's temp file is still removed (its id has no line and is redone)."""
    from sip.data.bank import DatasetWriter

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "out" / "train" / "cat"
    folder.mkdir(parents=True)
    live_tmp, dead_tmp = folder / f".a.png.{os.getppid()}.tmp", folder / f".b.png.{int(dead.stdout)}.tmp"
    live_tmp.write_bytes(b"x")
    dead_tmp.write_bytes(b"x")
    DatasetWriter(tmp_path / "out", {"config": {}}, ["cat"], shard=(1, 2))
    assert live_tmp.exists() and not dead_tmp.exists()
