"""sip.data.writer: an image without its metadata line is checked when its id is redone, never silently
replaced.

Every test drives :class:`sip.data.bank.DatasetWriter` directly with small PIL images (seconds)."""

from __future__ import annotations

import logging
from pathlib import Path

from conftest import bank_load_counts, bank_meta, bank_write, bank_writer


def _orphan(out: Path) -> Path:
    """A folder whose last image lost its line (killed between rename and append)."""
    bank_write(bank_writer(out), range(3))
    lines = bank_meta(out).read_text().splitlines()
    bank_meta(out).write_text("\n".join(lines[:-1]) + "\n")
    return out / "train" / "Coat" / "img2.png"


def test_an_orphan_with_the_same_bytes_is_adopted_and_logged(tmp_path, caplog):
    out = tmp_path / "out"
    orphan = _orphan(out)
    before = orphan.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, "sip.data.bank"):
        w = bank_writer(out)
        assert "img2" in w.orphans
        bank_write(w, range(3))
    assert w.summary.adopted == 1 and w.summary.written == 1 and orphan.stat().st_mtime_ns == before
    assert "adopted" in caplog.text and "no metadata line" in caplog.text
    assert bank_load_counts(out) == (3, 3, 3)


def test_an_orphan_with_other_bytes_is_never_overwritten_silently(tmp_path, caplog):
    out = tmp_path / "out"
    orphan = _orphan(out)
    old = orphan.read_bytes()
    with caplog.at_level(logging.WARNING, "sip.data.bank"):
        w = bank_writer(out)
        bank_write(w, [2], offset=1)  # now generated differently
    kept = list(orphan.parent.glob(".img2.png.kept-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == old and orphan.read_bytes() != old
    assert kept[0].name in caplog.text and w.summary.kept_aside == 1
    assert bank_load_counts(out) == (3, 3, 3)  # the kept file is seen by neither reader
