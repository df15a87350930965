"""Export a dataset written by sip (``sip augment`` / ``sip synth`` / an online ``SIPAugment`` cache) to
Hugging Face ``datasets``.

The export is a :class:`datasets.DatasetDict` with one ``"train"`` split and these features:

==================  ====================  ===========================================================
column              feature               from
==================  ====================  ===========================================================
``image``           ``Image()``           ``train/<file_name>`` (bytes embedded by ``save_to_disk``)
``label``           ``ClassLabel``        the run's labels, in the source's class order (run.json)
``caption``         ``string``            the caption the prompt was built from (None for txt2img)
``prompt``          ``string``            the prompt the image was generated with
``source``          ``string``            id of the real image it varies (None for txt2img)
``source_hash``     ``string``            content hash of that real image (``sip.transforms``)
``seed``            ``int64``             the image's own generator seed
``strength``        ``float64``           img2img strength (None for txt2img)
``guidance_scale``  ``float64``           classifier-free guidance
``steps``           ``int32``             denoising steps
``variant``         ``int32``             variant index of the source (or image index of the class)
``model``           ``string``            model id or folder
``file_name``       ``string``            path inside ``train/``
==================  ====================  ===========================================================

The run's ``run.json`` is kept as the dataset's description. Saved with ``save_to_disk`` the folder is
self-contained (image bytes inside the Arrow files) and ``datasets.load_from_disk`` reads it back;
``sip.data.sources.HFDatasetSource`` reads it as a source too.

Pushing to the Hub is one call for users with network and a token (``huggingface-cli login``)::

    from sip.export import push_to_hub
    push_to_hub("runs/aug", "your-name/fmnist-sip", private=True)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sip.data.bank import dataset_root, read_metadata, read_run_info

# (column, datasets Value dtype, metadata key) for every column but image and label.
TEXT_COLUMNS = (
    ("caption", "string", "caption"),
    ("prompt", "string", "prompt"),
    ("source", "string", "source"),
    ("source_hash", "string", "source_hash"),
    ("seed", "int64", "seed"),
    ("strength", "float64", "strength"),
    ("guidance_scale", "float64", "guidance_scale"),
    ("steps", "int32", "steps"),
    ("variant", "int32", "variant"),
    ("model", "string", "model"),
    ("file_name", "string", "file_name"),
)


def dataset_classes(root: str | Path, rows: list[dict[str, Any]] | None = None) -> list[str]:
    """The label names of a written dataset in class-index order: the order the run declared them in
    (``run.json`` ``label_folders``, i.e. the source's classes), then any other label seen, sorted."""
    root = Path(root)
    rows = read_metadata(root) if rows is None else rows
    declared = list(read_run_info(root).get("label_folders", {}))
    seen = {str(r["label"]) for r in rows if "label" in r}
    return declared + sorted(seen - set(declared))


def features(classes: list[str]):
    """The :class:`datasets.Features` of an export (see the module docstring)."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(classes)),
        **{name: datasets.Value(dtype) for name, dtype, _ in TEXT_COLUMNS},
    })


def export_dataset(out_dir: str | Path, dest: str | Path | None = None, overwrite: bool = False):
    """Convert a written sip dataset to a ``datasets.DatasetDict`` (split ``"train"``).

    Args:
        out_dir (str | Path): the dataset folder (holding ``train/metadata.jsonl``; ``.../train`` works too).
        dest (str | Path, optional): save it here with ``save_to_disk`` (image bytes embedded) and return
            the saved copy as ``datasets.load_from_disk`` reads it. Defaults to None: return an in-memory
            dataset whose images are read from ``out_dir`` on access.
        overwrite (bool, optional): replace an existing ``dest``. Defaults to False (an existing,
            non-empty ``dest`` is an error).

    Returns:
        datasets.DatasetDict: ``{"train": Dataset}`` with the features of :func:`features`.

    Raises:
        FileNotFoundError: ``out_dir`` lists no images, or images it lists are missing.
        FileExistsError: ``dest`` exists and is not empty, without ``overwrite``.
    """
    import datasets

    # 1. check inputs
    root = dataset_root(out_dir)
    # merged file and unmerged shard files, one row per file_name
    rows = [row for row in read_metadata(root) if "file_name" in row and "label" in row]
    if not rows:
        raise FileNotFoundError(f"{root} is not a sip dataset (or an empty one): {root / 'train' / 'metadata.jsonl'} "
                                "lists no images (write one with `sip augment` or `sip synth`)")
    missing = [r["file_name"] for r in rows if not (root / "train" / r["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{root / 'train'}: {len(missing)} images listed in the metadata are missing "
                                f"(e.g. {missing[:3]})")
    if dest is not None:
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()) and not overwrite:
            raise FileExistsError(f"{dest} exists and is not empty; pass overwrite=True (--overwrite) or pick "
                                  "another destination")
    # 2. columns
    classes = dataset_classes(root, rows)
    index = {name: i for i, name in enumerate(classes)}
    columns: dict[str, list[Any]] = {
        "image": [str((root / "train" / r["file_name"]).resolve()) for r in rows],
        "label": [index[str(r["label"])] for r in rows],
    }
    for name, dtype, key in TEXT_COLUMNS:
        values = [r.get(key) for r in rows]
        if dtype == "string":
            values = [None if v is None else str(v) for v in values]
        columns[name] = values
    feats = features(classes)
    info = datasets.DatasetInfo(description=json.dumps(read_run_info(root), ensure_ascii=False), features=feats)
    train = datasets.Dataset.from_dict(columns, features=feats, info=info, split="train")
    result = datasets.DatasetDict({"train": train})
    # 3. save (through a temp folder: a failed save never leaves half a dataset at dest)
    if dest is None:
        return result
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    result.save_to_disk(str(tmp))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return datasets.load_from_disk(str(dest))


def push_to_hub(out_dir: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                **kwargs: Any):
    """Export ``out_dir`` (:func:`export_dataset`) and push it to the Hugging Face Hub as ``repo_id``.

    Needs network and a token (``huggingface-cli login``, ``HF_TOKEN`` or ``token=``). Image bytes are
    embedded in the uploaded Parquet files. Extra keyword arguments go to
    ``datasets.DatasetDict.push_to_hub`` (e.g. ``max_shard_size="500MB"``, ``commit_message=...``).

    Returns:
        What ``DatasetDict.push_to_hub`` returns (a ``huggingface_hub.CommitInfo``).
    """
    return export_dataset(out_dir).push_to_hub(repo_id, private=private, token=token, **kwargs)
