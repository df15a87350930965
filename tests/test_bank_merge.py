"""sip.data.merge: the shard merge is idempotent and atomic, and waits for every shard.

Every test drives :class:`sip.data.bank.DatasetWriter` directly with small PIL images (seconds)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sip.data.bank import merge_shards, read_jsonl, read_metadata

from conftest import (
    BANK_CONFIG,
    BANK_LABELS,
    bank_load_counts,
    bank_meta,
    bank_sharded,
    bank_write,
    bank_writer,
)


@pytest.mark.parametrize("point", ["replaced", "marked", "cleaning"])
def test_a_merge_killed_anywhere_then_rerun_gives_one_row_per_image(tmp_path, point):
    out = tmp_path / "out"
    bank_sharded(out)
    code = ("import sys; from sip.data.bank import DatasetWriter; "
            f"w = DatasetWriter({str(out)!r}, {{'config': {BANK_CONFIG!r}}}, {BANK_LABELS!r}, (2, 2)); "
            "w.finish()")
    proc = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "SIP_TEST_KILL_IN_MERGE": point})
    assert proc.returncode == -9  # killed inside the merge
    w = bank_writer(out, shard=(2, 2))  # the rerun of shard 2: nothing left to do, merges again
    bank_write(w, range(1, 8, 2))
    assert w.summary.written == 0 and w.finish()
    assert sorted(r["file_name"] for r in read_metadata(out)) == sorted(f"{BANK_LABELS[i % 2]}/img{i}.png"
                                                                       for i in range(8))
    assert bank_load_counts(out) == (8, 8, 8)
    assert [r["id"] for r in read_jsonl(out / "rejected.jsonl")] == ["img99"]
    assert not list((out / "train").glob("metadata.shard-*")) and merge_shards(out, 2)
    assert len(bank_meta(out).read_text().splitlines()) == 8


def test_merge_waits_for_every_shard_and_changes_nothing_before(tmp_path):
    out = tmp_path / "out"
    w = bank_writer(out, shard=(1, 2))
    bank_write(w, [0])
    assert not w.finish() and not merge_shards(out, 2) and not bank_meta(out).exists()
    assert len(read_metadata(out)) == 1
