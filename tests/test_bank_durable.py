"""sip.data.durable under the writer: torn lines repaired on open (never glued to the next row), a full disk
named with nothing half-written left.

Every test drives :class:`sip.data.bank.DatasetWriter` directly with small PIL images (seconds)."""

from __future__ import annotations

import errno
import json
import logging

import pytest

from sip.data.bank import DiskFullError, read_jsonl, read_metadata, repair_jsonl

from conftest import BANK_LABELS, bank_load_counts, bank_meta, bank_sharded, bank_write, bank_writer


# --------------------------------------------------------------------------------------------------
# 1. torn lines
# --------------------------------------------------------------------------------------------------

def test_a_torn_last_line_is_moved_aside_and_the_rerun_loads(tmp_path, caplog):
    out = tmp_path / "out"
    bank_write(bank_writer(out), range(6))
    data = bank_meta(out).read_bytes()
    bank_meta(out).write_bytes(data[:-40])  # power loss: the last row cut mid-JSON
    with caplog.at_level(logging.WARNING, "sip.data.bank"):
        w = bank_writer(out)
    assert "metadata.jsonl" in caplog.text and "torn" in caplog.text
    assert w.summary.torn == 1 and not w.is_done("img5") and w.is_done("img4")
    bank_write(w, range(6))
    assert w.summary.written == 1
    assert (out / "train" / ".metadata.jsonl.torn").read_bytes() == data[data.rfind(b"\n", 0, -1) + 1:-40] + b"\n"
    assert bank_load_counts(out) == (6, 6, 6)


def test_a_row_glued_onto_a_fragment_by_an_older_sip_is_unglued(tmp_path):
    out = tmp_path / "out"
    bank_write(bank_writer(out), range(3))
    lines = bank_meta(out).read_text().splitlines()
    glued = lines[1][:-30] + lines[2]  # what 0.1.0 wrote: the redone row appended to the torn one
    bank_meta(out).write_text(lines[0] + "\n" + glued + "\n")
    w = bank_writer(out)
    assert w.is_done("img0") and w.is_done("img2") and not w.is_done("img1")
    bank_write(w, range(3))
    assert sorted(r["file_name"] for r in read_metadata(out)) == sorted(f"{BANK_LABELS[i % 2]}/img{i}.png"
                                                                       for i in range(3))
    assert bank_load_counts(out) == (3, 3, 3)


def test_every_file_the_writer_appends_to_is_repaired(tmp_path):
    out = tmp_path / "out"
    w = bank_writer(out, shard=(1, 2))
    bank_write(w, [0, 2])
    w.reject("img4", "Coat", {"scores": {"clip": 0.1}})
    for path in (w.metadata_path, w.rejected_path):
        path.write_bytes(path.read_bytes() + b'{"file_name": "Coat/img9.p')
    w = bank_writer(out, shard=(1, 2))
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
# 2. a full disk
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("at", [1, 2])  # the image bank_write, the line append
def test_a_full_disk_names_the_folder_leaves_nothing_half_written_and_resumes(tmp_path, monkeypatch, at):
    out = tmp_path / "out"
    bank_write(bank_writer(out), range(2))
    w = bank_writer(out)
    from sip.data import durable

    monkeypatch.setattr(durable, "_writes", 0)
    monkeypatch.setenv("SIP_TEST_ENOSPC_AFTER", str(at))
    with pytest.raises(DiskFullError) as info:
        bank_write(w, [2])
    assert info.value.errno == errno.ENOSPC and str(out) in str(info.value) and "rerun" in str(info.value)
    assert not list((out / "train").rglob("*.tmp")) and not (out / "train" / "Coat" / "img2.png").exists()
    assert bank_meta(out).read_text().endswith("\n") and len(read_jsonl(bank_meta(out))) == 2
    monkeypatch.delenv("SIP_TEST_ENOSPC_AFTER")
    w = bank_writer(out)
    bank_write(w, range(3))
    assert w.summary.written == 1 and w.summary.torn == 0 and bank_load_counts(out) == (3, 3, 3)


def test_the_cli_prints_a_full_disk_as_one_clear_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sip.cli import app

    out = tmp_path / "out"
    bank_sharded(out)
    (out / "train" / ".shard-2-of-2.done").touch()
    monkeypatch.setenv("SIP_TEST_ENOSPC_AFTER", "1")
    result = CliRunner().invoke(app, ["merge", str(out), "--shards", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no space left" in result.output and str(out) in result.output and "rerun" in result.output
