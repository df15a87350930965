"""The on-disk dataset under faults: torn lines repaired on open, an idempotent and atomic shard merge,
orphan images checked (never silently replaced), a full disk named, resume keyed on what changes outputs.

Every test drives :class:`sip.data.bank.DatasetWriter` directly with small PIL images (seconds)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sip.data.bank import (
    DatasetWriter,
    DiskFullError,
    config_differences,
    merge_shards,
    read_jsonl,
    read_metadata,
    read_run_info,
    repair_jsonl,
)

LABELS = ["Coat", "Bag"]
CONFIG = {"source": {"kind": "folder", "path": "IN"}, "generate": {"steps": 4, "seed": 0, "batch_size": 8},
          "output": "out"}


def image(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i * 20 % 256, 7, 200))


def writer(out: Path, shard=None, config=CONFIG, **kw) -> DatasetWriter:
    return DatasetWriter(out, {"sip_version": "test", "config": config}, LABELS, shard, **kw)


def write(w: DatasetWriter, ids, offset: int = 0) -> None:
    for i in ids:
        w.write(f"img{i}", image(i + offset), LABELS[i % 2], {"seed": i, "prompt": f"p{i}"})


def meta(out: Path) -> Path:
    return out / "train" / "metadata.jsonl"


def load_counts(out: Path) -> tuple[int, int, int]:
    """Rows in metadata.jsonl, rows datasets' imagefolder loads, images torchvision's ImageFolder finds."""
    import datasets
    from torchvision.datasets import ImageFolder

    rows = [json.loads(line) for line in meta(out).read_text().splitlines()]  # strict: a torn line fails here
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    return len(rows), len(ds), len(ImageFolder(str(out / "train")))


# --------------------------------------------------------------------------------------------------
# 1. torn lines
# --------------------------------------------------------------------------------------------------

def test_a_torn_last_line_is_moved_aside_and_the_rerun_loads(tmp_path, caplog):
    out = tmp_path / "out"
    write(writer(out), range(6))
    data = meta(out).read_bytes()
    meta(out).write_bytes(data[:-40])  # power loss: the last row cut mid-JSON
    with caplog.at_level(logging.WARNING, "sip.data.bank"):
        w = writer(out)
    assert "metadata.jsonl" in caplog.text and "torn" in caplog.text
    assert w.summary.torn == 1 and not w.is_done("img5") and w.is_done("img4")
    write(w, range(6))
    assert w.summary.written == 1
    assert (out / "train" / ".metadata.jsonl.torn").read_bytes() == data[data.rfind(b"\n", 0, -1) + 1:-40] + b"\n"
    assert load_counts(out) == (6, 6, 6)


def test_a_row_glued_onto_a_fragment_by_an_older_sip_is_unglued(tmp_path):
    out = tmp_path / "out"
    write(writer(out), range(3))
    lines = meta(out).read_text().splitlines()
    glued = lines[1][:-30] + lines[2]  # what 0.1.0 wrote: the redone row appended to the torn one
    meta(out).write_text(lines[0] + "\n" + glued + "\n")
    w = writer(out)
    assert w.is_done("img0") and w.is_done("img2") and not w.is_done("img1")
    write(w, range(3))
    assert sorted(r["file_name"] for r in read_metadata(out)) == sorted(f"{LABELS[i % 2]}/img{i}.png" for i in range(3))
    assert load_counts(out) == (3, 3, 3)


def test_every_file_the_writer_appends_to_is_repaired(tmp_path):
    out = tmp_path / "out"
    w = writer(out, shard=(1, 2))
    write(w, [0, 2])
    w.reject("img4", "Coat", {"scores": {"clip": 0.1}})
    for path in (w.metadata_path, w.rejected_path):
        path.write_bytes(path.read_bytes() + b'{"file_name": "Coat/img9.p')
    w = writer(out, shard=(1, 2))
    assert w.summary.torn == 2
    assert all(len(read_jsonl(p)) == len(p.read_text().splitlines()) for p in (w.metadata_path, w.rejected_path))


def test_repair_jsonl_keeps_a_whole_row_that_lost_its_newline(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"hash": "a", "caption": "x"}\n{"hash": "b", "caption": "y"}')
    assert repair_jsonl(path) == 0
    assert path.read_text().endswith('"y"}\n') and len(read_jsonl(path)) == 2
    assert repair_jsonl(tmp_path / "missing.jsonl") == 0


def test_the_caption_cache_repairs_its_file_on_open(tmp_path):
    from sip.augment.caption import CaptionCache

    path = tmp_path / "captions.jsonl"
    CaptionCache(path).put([("h1", "cap:v1", "a coat"), ("h2", "cap:v1", "a bag")])
    path.write_bytes(path.read_bytes()[:-12])
    cache = CaptionCache(path)
    cache.put([("h3", "cap:v1", "a shoe")])
    again = CaptionCache(path)
    assert again.get("h1", "cap:v1") == "a coat" and again.get("h3", "cap:v1") == "a shoe"
    assert all(json.loads(line) for line in path.read_text().splitlines())


# --------------------------------------------------------------------------------------------------
# 2. the shard merge
# --------------------------------------------------------------------------------------------------

def _sharded(out: Path) -> None:
    for i in (1, 2):
        w = writer(out, shard=(i, 2))
        write(w, range(i - 1, 8, 2))
        if i == 1:
            w.reject("img99", "Coat", {"scores": {}})
            assert not w.finish()


@pytest.mark.parametrize("point", ["replaced", "marked", "cleaning"])
def test_a_merge_killed_anywhere_then_rerun_gives_one_row_per_image(tmp_path, point):
    out = tmp_path / "out"
    _sharded(out)
    code = ("import sys; from sip.data.bank import DatasetWriter; "
            f"w = DatasetWriter({str(out)!r}, {{'config': {CONFIG!r}}}, {LABELS!r}, (2, 2)); w.finish()")
    proc = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "SIP_TEST_KILL_IN_MERGE": point})
    assert proc.returncode == -9  # killed inside the merge
    w = writer(out, shard=(2, 2))  # the rerun of shard 2: nothing left to do, merges again
    write(w, range(1, 8, 2))
    assert w.summary.written == 0 and w.finish()
    assert sorted(r["file_name"] for r in read_metadata(out)) == sorted(f"{LABELS[i % 2]}/img{i}.png" for i in range(8))
    assert load_counts(out) == (8, 8, 8)
    assert [r["id"] for r in read_jsonl(out / "rejected.jsonl")] == ["img99"]
    assert not list((out / "train").glob("metadata.shard-*")) and merge_shards(out, 2)
    assert len(meta(out).read_text().splitlines()) == 8


def test_merge_waits_for_every_shard_and_changes_nothing_before(tmp_path):
    out = tmp_path / "out"
    w = writer(out, shard=(1, 2))
    write(w, [0])
    assert not w.finish() and not merge_shards(out, 2) and not meta(out).exists()
    assert len(read_metadata(out)) == 1


# --------------------------------------------------------------------------------------------------
# 4. images without a metadata line
# --------------------------------------------------------------------------------------------------

def _orphan(out: Path) -> Path:
    """A folder whose last image lost its line (killed between rename and append)."""
    write(writer(out), range(3))
    lines = meta(out).read_text().splitlines()
    meta(out).write_text("\n".join(lines[:-1]) + "\n")
    return out / "train" / "Coat" / "img2.png"


def test_an_orphan_with_the_same_bytes_is_adopted_and_logged(tmp_path, caplog):
    out = tmp_path / "out"
    orphan = _orphan(out)
    before = orphan.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, "sip.data.bank"):
        w = writer(out)
        assert "img2" in w.orphans
        write(w, range(3))
    assert w.summary.adopted == 1 and w.summary.written == 1 and orphan.stat().st_mtime_ns == before
    assert "adopted" in caplog.text and "no metadata line" in caplog.text
    assert load_counts(out) == (3, 3, 3)


def test_an_orphan_with_other_bytes_is_never_overwritten_silently(tmp_path, caplog):
    out = tmp_path / "out"
    orphan = _orphan(out)
    old = orphan.read_bytes()
    with caplog.at_level(logging.WARNING, "sip.data.bank"):
        w = writer(out)
        write(w, [2], offset=1)  # now generated differently
    kept = list(orphan.parent.glob(".img2.png.kept-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == old and orphan.read_bytes() != old
    assert kept[0].name in caplog.text and w.summary.kept_aside == 1
    assert load_counts(out) == (3, 3, 3)  # the kept file is seen by neither reader


# --------------------------------------------------------------------------------------------------
# 5. a full disk
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("at", [1, 2])  # the image write, the line append
def test_a_full_disk_names_the_folder_leaves_nothing_half_written_and_resumes(tmp_path, monkeypatch, at):
    out = tmp_path / "out"
    write(writer(out), range(2))
    w = writer(out)
    from sip.data import durable

    monkeypatch.setattr(durable, "_writes", 0)
    monkeypatch.setenv("SIP_TEST_ENOSPC_AFTER", str(at))
    with pytest.raises(DiskFullError) as info:
        write(w, [2])
    assert info.value.errno == errno.ENOSPC and str(out) in str(info.value) and "rerun" in str(info.value)
    assert not list((out / "train").rglob("*.tmp")) and not (out / "train" / "Coat" / "img2.png").exists()
    assert meta(out).read_text().endswith("\n") and len(read_jsonl(meta(out))) == 2
    monkeypatch.delenv("SIP_TEST_ENOSPC_AFTER")
    w = writer(out)
    write(w, range(3))
    assert w.summary.written == 1 and w.summary.torn == 0 and load_counts(out) == (3, 3, 3)


def test_the_cli_prints_a_full_disk_as_one_clear_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sip.cli import app

    out = tmp_path / "out"
    _sharded(out)
    (out / "train" / ".shard-2-of-2.done").touch()
    monkeypatch.setenv("SIP_TEST_ENOSPC_AFTER", "1")
    result = CliRunner().invoke(app, ["merge", str(out), "--shards", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no space left" in result.output and str(out) in result.output and "rerun" in result.output


# --------------------------------------------------------------------------------------------------
# resume: only what changes outputs, defaults filled in, paths resolved
# --------------------------------------------------------------------------------------------------

def test_a_key_added_with_its_default_by_a_newer_sip_still_resumes(tmp_path):
    out = tmp_path / "out"
    write(writer(out), range(2))
    newer = {**CONFIG, "generate": {**CONFIG["generate"], "eta": 0.0}}
    defaults = {"generate": {"steps": 30, "seed": 0, "eta": 0.0}}
    assert writer(out, config=newer, defaults=defaults).is_done("img1")
    with pytest.raises(ValueError, match=r"generate\.eta: 0\.0 \(absent, the default\) in run\.json, 0\.5 now"):
        writer(out, config={**CONFIG, "generate": {**CONFIG["generate"], "eta": 0.5}}, defaults=defaults)


def test_a_relative_and_an_absolute_input_path_are_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").mkdir()
    out = tmp_path / "out"
    write(writer(out), range(2))
    assert read_run_info(out)["config"]["source"]["path"] == str((tmp_path / "IN").resolve())
    absolute = {**CONFIG, "source": {"kind": "folder", "path": str(tmp_path / "IN")}}
    assert writer(out, config=absolute).is_done("img0")


def test_a_refusal_names_every_differing_key_with_both_values_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    write(writer(out), range(2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = {**CONFIG, "generate": {"steps": 8, "seed": 1, "batch_size": 64}, "output": "elsewhere"}
    with pytest.raises(ValueError) as info:
        writer(out, config=other)
    message = str(info.value)
    assert "generate.steps: 4 in run.json, 8 now" in message and "generate.seed: 0 in run.json, 1 now" in message
    assert "batch_size" not in message and "output:" not in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_config_differences_ignores_where_and_how_fast():
    assert config_differences({"a": 1, "shard": "1/2", "x": {"device": "cpu", "chunk": 3}},
                              {"a": 1, "shard": None, "x": {"device": "cuda", "chunk": 9}}) == []
    assert config_differences({"a": 1}, {"a": 1, "b": 2}) == ["b: (absent) in run.json, 2 now"]
