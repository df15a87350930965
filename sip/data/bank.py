"""The augmented dataset on disk: written append-only, resumable, readable without sip.

This module is where the format is documented and imported from: the writer (:mod:`sip.data.writer`), the
readers (:func:`read_jsonl`, :func:`read_metadata`, :func:`read_metadata_since`, :func:`read_run_info`;
:mod:`sip.data.readers`), the resume check (:mod:`sip.data.resume`), the shard merge (:mod:`sip.data.merge`)
and the durable files under them (:mod:`sip.data.durable`) are re-exported here. Layout
(``datasets.load_dataset("imagefolder", data_dir=out)`` and
``torchvision.datasets.ImageFolder(out / "train")`` both read it)::

    out/run.json                     sip version, resolved config (paths resolved), models, seeds
    out/train/<label>/<id>.png       one file per image; <label> is a sanitised folder name
    out/train/metadata.jsonl         one JSON line per image (file_name, label, source, caption, ...)
    out/rejected.jsonl               variants the filter dropped (scores kept, image not written)

Guarantees (each has a test in ``tests/test_bank*.py``; ``scripts/fault_inject.py`` measures them):

- An image is written to a temporary name, fsynced and renamed, then its line is appended and fsynced,
  so a kill at any moment leaves no half-written image; a rerun skips every id that has a line.
- A torn last line (power loss, full disk) of a file the writer appends to is repaired when the writer
  opens it: the fragment is moved to ``.<name>.torn`` next to the file, with a warning naming the file,
  and never glued to the next row (:func:`repair_jsonl`; the caption cache calls it too).
- An image without its line (a kill between rename and append) is checked when its id is redone: the
  same bytes are adopted, different bytes are never overwritten silently (the old file is kept as
  ``.<id>.png.kept-<time>`` in its folder, with a warning naming it).
- A full disk raises :class:`DiskFullError` naming the folder; the half-written temp file or line is
  removed first, so rerunning after freeing space resumes.
- A shard (``--shard i/n``) writes ``train/metadata.shard-i-of-n.jsonl``; :func:`merge_shards` folds
  the shards into ``metadata.jsonl`` under a lock, one row per image however often it is rerun or
  wherever it was killed.

Test hooks (off unless the variable is set; used by ``scripts/fault_inject.py``):
``SIP_TEST_KILL_IN_MERGE=<point>`` SIGKILLs the process inside :func:`merge_shards` at ``replaced``
(after ``metadata.jsonl`` was replaced), ``marked`` (after the merge was recorded) or ``cleaning``
(after the first shard file was removed); ``SIP_TEST_ENOSPC_AFTER=<k>`` makes the writer's k-th file
write (images and lines, counted from 1) fail with ENOSPC half-way through.
"""

from __future__ import annotations

# The public names of the format, re-exported from the modules that implement them.
from sip.data.durable import DiskFullError, append_jsonl, atomic_write, read_jsonl, repair_jsonl
from sip.data.merge import merge_shards
from sip.data.readers import (
    METADATA,
    REJECTED,
    RUN_INFO,
    dataset_root,
    is_dataset,
    read_metadata,
    read_metadata_since,
    read_run_info,
)
from sip.data.resume import PATH_KEYS, VOLATILE_KEYS, config_differences, resolve_paths
from sip.data.writer import DatasetWriter, WriteSummary, label_folders

__all__ = ["METADATA", "PATH_KEYS", "REJECTED", "RUN_INFO", "VOLATILE_KEYS", "DatasetWriter", "DiskFullError",
           "WriteSummary", "append_jsonl", "atomic_write", "config_differences", "dataset_root", "is_dataset",
           "label_folders", "merge_shards", "read_jsonl", "read_metadata", "read_metadata_since", "read_run_info",
           "repair_jsonl", "resolve_paths"]
