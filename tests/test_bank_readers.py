"""sip.data.readers: reading a bank, and an online cache's new lines as another process appends them."""

from __future__ import annotations

from sip.data.bank import dataset_root, read_metadata, read_metadata_since

from conftest import (  # the shared bank fakes
    bank_meta,
    bank_write,
    bank_writer,
)


def test_read_metadata_since_reads_only_new_whole_lines(tmp_path):
    out = tmp_path / "out"
    assert read_metadata_since(out, 0) == ([], 0)  # no file yet
    w = bank_writer(out)
    bank_write(w, range(2))
    rows, offset = read_metadata_since(out, 0)
    assert rows == read_metadata(out) and offset == bank_meta(out).stat().st_size
    assert read_metadata_since(out / "train", offset) == ([], offset)  # OUT/train names OUT, nothing new
    bank_write(w, [2])
    half = b'{"file_name": "Coat/img9.png", "lab'
    with bank_meta(out).open("ab") as f:
        f.write(half)  # a line another process is still writing
    rows, after = read_metadata_since(out, offset)
    assert [r["file_name"] for r in rows] == ["Coat/img2.png"] and after == bank_meta(out).stat().st_size - len(half)
    with bank_meta(out).open("ab") as f:
        f.write(b'el": "Coat"}\nnot json\n')
    rows, end = read_metadata_since(out, after)
    assert rows == [{"file_name": "Coat/img9.png", "label": "Coat"}] and end == bank_meta(out).stat().st_size
    assert dataset_root(out / "train") == out
