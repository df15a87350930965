"""One run per output folder (sip.data.run_lock): a second run on a folder (or on the same shard) refuses at once
naming the first; a lock a dead process left is taken over, said once; distinct shards of one launch share the
folder. And an output folder inside (or equal to, or holding) its input folder is refused naming both."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe, SynthRecipe, run_augment, run_synth
from sip.cli import app
from sip.data.run_lock import LOCK_NAME, OutputBusyError, hold_output, lock_name
from sip.data.sources import SourceConfig

GEN = {"steps": 2, "per_class": 2, "batch_size": 2, "device": "cpu"}


def holder(out: Path, shard: str = "None") -> subprocess.Popen:
    """Another process that holds ``out`` (as a running sip run does) until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from sip.data.run_lock import hold_output
        with hold_output({str(out)!r}, {shard}):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def synth(tiny_sd_txt2img, tiny_sd_dir):
    def run(out: Path, **kw):
        cfg = GenerateConfig(**{**GEN, "model": str(tiny_sd_dir)})
        recipe = SynthRecipe(classes=["cat", "dog"], generate=cfg, output=str(out), progress=False, **kw)
        return run_synth(recipe, DiffusionGenerator(tiny_sd_txt2img, cfg, model_id=str(tiny_sd_dir)))
    return run


def test_a_second_run_on_a_held_folder_refuses_naming_the_first_then_takes_over_when_it_died(synth, tmp_path,
                                                                                            caplog):
    out = tmp_path / "out"
    first = holder(out)
    try:
        with pytest.raises(OutputBusyError) as refused:
            synth(out)
        text = str(refused.value)
        assert f"pid {first.pid} on host {socket.gethostname()}" in text and "started 20" in text
        assert "Wait for that run to finish" in text and str(out / LOCK_NAME) in text
        assert not (out / "train").exists()  # refused before any model or writer touched the folder
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: no code of it runs any more
        first.wait()
    assert (out / LOCK_NAME).is_file()
    with caplog.at_level(logging.WARNING, logger="sip.data.run_lock"):
        summary = synth(out)
    assert summary.written == 4
    takeovers = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(takeovers) == 1 and f"pid {first.pid}" in takeovers[0]
    assert not (out / LOCK_NAME).exists()  # released at the end of the run


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), hold_output(out):
        raise RuntimeError("boom")
    assert not out.exists()  # created by the run, still empty: removed again
    with hold_output(out):  # and free for the next run
        pass


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid() + 10**6, "host": "other-machine.invalid",
                                             "started": "2026-01-01T00:00:00+00:00", "command": "sip synth"}))
    with pytest.raises(OutputBusyError, match=r"pid \d+ on host other-machine.invalid.*delete .*\.sip-run\.lock"):
        with hold_output(out):
            pass


def test_shards_of_one_launch_share_the_folder_and_nothing_else_does(tmp_path):
    out = tmp_path / "out"
    with hold_output(out, (1, 2)), hold_output(out, (2, 2)):  # the two ranks of one launch
        for other in (None, (1, 2), (1, 3)):  # the whole folder, the same shard, an overlapping count
            with pytest.raises(OutputBusyError, match=lock_name((1, 2)).replace(".", r"\.")):
                with hold_output(out, other):
                    pass
    with hold_output(out):
        with pytest.raises(OutputBusyError, match=r"\.sip-run\.lock"):
            with hold_output(out, (2, 2)):
                pass


def test_cli_refuses_a_held_folder_in_one_line_with_exit_code_2(tmp_path):
    out = tmp_path / "out"
    first = holder(out)
    try:
        result = CliRunner().invoke(app, ["synth", "-o", str(out), "--model", str(tmp_path / "no-model"),
                                          "--set", 'classes=["cat"]'])
    finally:
        first.kill()
        first.wait()
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use by another sip run" in lines[0]


# --------------------------------------------------------------------------------------------------
# an output folder inside its input folder
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["in/aug", "in", "."])
def test_augment_output_inside_equal_to_or_holding_the_input_is_refused_naming_both(image_folder, tmp_path,
                                                                                   where):
    source = tmp_path / "in"
    shutil.copytree(image_folder, source)
    out = tmp_path / where
    recipe = AugmentRecipe(source=SourceConfig(kind="folder", path=str(source)), output=str(out), progress=False,
                           generate=GenerateConfig(model=str(tmp_path / "no-model"), device="cpu"))
    with pytest.raises(ValueError, match="input folder") as refused:
        run_augment(recipe)
    assert str(out) in str(refused.value) and str(source) in str(refused.value)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in Path(image_folder).iterdir())


def test_synth_output_inside_the_folder_its_classes_come_from_is_refused(image_folder, tmp_path):
    recipe = SynthRecipe(source=SourceConfig(kind="folder", path=str(image_folder)),
                         output=str(Path(image_folder) / "synth"), progress=False)
    with pytest.raises(ValueError, match="is inside the input folder"):
        run_synth(recipe)
    assert not (Path(image_folder) / "synth").exists()


def test_cli_augment_into_its_input_says_so_in_one_line(image_folder, tmp_path):
    source = tmp_path / "in"
    shutil.copytree(image_folder, source)
    result = CliRunner().invoke(app, ["augment", "-i", str(source), "-o", str(source / "aug"), "--model",
                                      str(tmp_path / "no-model")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{source / 'aug'} is inside the input folder {source}" in lines[0]
    assert not (source / "aug").exists()
