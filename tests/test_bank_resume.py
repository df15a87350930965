"""sip.data.resume: a folder resumes only when what changes the images is the same; defaults filled in,
paths resolved, and a refusal names every differing key."""

from __future__ import annotations

import pytest

from sip.data.bank import config_differences, read_run_info

from conftest import BANK_CONFIG, bank_write, bank_writer


def test_a_key_added_with_its_default_by_a_newer_sip_still_resumes(tmp_path):
    out = tmp_path / "out"
    bank_write(bank_writer(out), range(2))
    newer = {**BANK_CONFIG, "generate": {**BANK_CONFIG["generate"], "eta": 0.0}}
    defaults = {"generate": {"steps": 30, "seed": 0, "eta": 0.0}}
    assert bank_writer(out, config=newer, defaults=defaults).is_done("img1")
    with pytest.raises(ValueError, match=r"generate\.eta: 0\.0 \(absent, the default\) in run\.json, 0\.5 now"):
        bank_writer(out, config={**BANK_CONFIG, "generate": {**BANK_CONFIG["generate"], "eta": 0.5}}, defaults=defaults)


def test_a_relative_and_an_absolute_input_path_are_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").mkdir()
    out = tmp_path / "out"
    bank_write(bank_writer(out), range(2))
    assert read_run_info(out)["config"]["source"]["path"] == str((tmp_path / "IN").resolve())
    absolute = {**BANK_CONFIG, "source": {"kind": "folder", "path": str(tmp_path / "IN")}}
    assert bank_writer(out, config=absolute).is_done("img0")


def test_a_refusal_names_every_differing_key_with_both_values_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    bank_write(bank_writer(out), range(2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = {**BANK_CONFIG, "generate": {"steps": 8, "seed": 1, "batch_size": 64}, "output": "elsewhere"}
    with pytest.raises(ValueError) as info:
        bank_writer(out, config=other)
    message = str(info.value)
    assert "generate.steps: 4 in run.json, 8 now" in message and "generate.seed: 0 in run.json, 1 now" in message
    assert "batch_size" not in message and "output:" not in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_config_differences_ignores_where_and_how_fast():
    assert config_differences({"a": 1, "shard": "1/2", "x": {"device": "cpu", "chunk": 3}},
                              {"a": 1, "shard": None, "x": {"device": "cuda", "chunk": 9}}) == []
    assert config_differences({"a": 1}, {"a": 1, "b": 2}) == ["b: (absent) in run.json, 2 now"]
