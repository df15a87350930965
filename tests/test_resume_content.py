"""Resume compares a local LoRA by its bytes, not its name (issue 26, finding 4): a LoRA file replaced under the
same path makes other images, so the folder holds another run."""

from __future__ import annotations

import pytest

from sip.data.bank import DatasetWriter
from sip.data.resume import config_differences, resolve_paths


def _config(lora: str) -> dict:
    return {"generate": {"model": "m", "lora": lora, "lora_scale": 1.0}}


def test_a_lora_replaced_under_the_same_name_is_another_run(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"first LoRA")
    stored = resolve_paths(_config(str(lora)))
    assert config_differences(stored, _config(str(lora))) == []  # the same file: resumable
    assert config_differences(stored, _config(str(tmp_path))) == []  # its folder names the same file
    lora.write_bytes(b"other LoRA")
    (difference,) = config_differences(stored, _config(str(lora)))
    assert difference.startswith("generate.lora: ") and "sha256:" in difference


def test_the_writer_refuses_to_resume_with_a_changed_lora(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"first LoRA")
    out = tmp_path / "out"
    DatasetWriter(out, {"config": _config(str(lora))}, ["a"])
    DatasetWriter(out, {"config": _config(str(lora))}, ["a"])  # unchanged: opens
    lora.write_bytes(b"other LoRA")
    with pytest.raises(ValueError, match="different config .* generate.lora: "):
        DatasetWriter(out, {"config": _config(str(lora))}, ["a"])


def test_a_hub_lora_compares_by_its_id():
    hub = "latent-consistency/lcm-lora-sdv1-5"
    assert resolve_paths(_config(hub)) == _config(hub)
    assert config_differences(_config(hub), _config("latent-consistency/lcm-lora-sdxl"))
