"""A dataset folder written by the previous release (sip 0.1.0, commit 49734ae) resumes under today's code.

``tests/fixtures/bank_v0_1_0/{synth,augment}`` were written by 0.1.0's own CLI on the shipped model
(see the README there). Its ``run.json`` records 0.1.0's install path of the shipped model and lacks
nothing today's config needs; a resume must accept it, skip every finished id and redo only what a
killed run left out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sip.augment.run import AugmentRecipe, SynthRecipe, run_augment, run_synth
from sip.config import load_config
from sip.data.bank import read_metadata, read_run_info

FIXTURES = Path(__file__).parent / "fixtures" / "bank_v0_1_0"


def killed_copy(name: str, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the fixture whose last image and line are gone (as if killed just before writing them)."""
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    meta = out / "train" / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    last = json.loads(lines[-1])["file_name"]
    meta.write_text("\n".join(lines[:-1]) + "\n")
    (out / "train" / last).unlink()
    return out, last


def test_the_fixture_was_written_by_the_previous_release():
    for name in ("synth", "augment"):
        info = read_run_info(FIXTURES / name)
        assert info["sip_version"] == "0.1.0" and "/sip/models/fmnist-tiny-sd" in info["config"]["generate"]["model"]
        assert len(read_metadata(FIXTURES / name)) == 20


@pytest.mark.parametrize("name", ["synth", "augment"])
def test_todays_code_resumes_a_folder_of_the_previous_release(tmp_path, name):
    out, redone = killed_copy(name, tmp_path)
    if name == "synth":
        recipe = load_config(SynthRecipe, None, [f'output="{out}"', "generate.per_class=2", "generate.steps=4",
                                                 "progress=false"])
        summary = run_synth(recipe)
    else:
        recipe = load_config(AugmentRecipe, None, [f'output="{out}"', "generate.per_image=2", "generate.steps=4",
                                                   "source.shots=1", "progress=false"])
        summary = run_augment(recipe)
    assert (summary.written, summary.skipped) == (1, 19)
    rows = read_metadata(out)
    assert len(rows) == 20 and len({r["file_name"] for r in rows}) == 20 and (out / "train" / redone).is_file()
    assert read_run_info(out)["sip_version"] == "0.1.0"  # the folder's record is kept as it was
