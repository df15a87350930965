"""scripts/eval_tiny_sd.py end to end on the tiny random Stable Diffusion, with tiny counts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_tiny_sd.py"


@pytest.fixture(scope="module")
def eval_script():
    spec = importlib.util.spec_from_file_location("eval_tiny_sd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fashion_mnist():
    from sip.data.sources import load_fashion_mnist_arrays

    try:
        load_fashion_mnist_arrays("test", download=False)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


TINY = ["--set", "judge_epochs=0.01", "--set", "judge_test_images=200", "--set", "vae_images=20",
        "--set", "steps=2", "--set", "txt2img_per_class=1", "--guidance", "3",
        "--set", "img2img_strengths=0.5,0.9", "--set", "fewshot_variants=1", "--set", "fewshot_txt2img_per_class=1",
        "--set", "fewshot_steps=3", "--set", "fewshot_batch=8", "--set", "fewshot_test_images=100",
        "--prompts", "label", "--no-progress", "--caption-cache", ""]


def test_quick_path_on_tiny_model(eval_script, fashion_mnist, tiny_sd_dir, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    argv = ["--model", str(tiny_sd_dir), "--quick", "--judge-cache", str(tmp_path / "judge"),
            "--out-json", str(out_json), *TINY]
    result = eval_script.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(last)
    assert printed == json.loads(out_json.read_text()) == json.loads(json.dumps(result))
    for key in ("judge_accuracy", "txt2img_fidelity", "img2img_preservation", "model_mb", "vae_recon_accuracy",
                "steering", "diversity", "fewshot"):
        assert printed[key] is not None, key
    assert 0.0 <= printed["judge_accuracy"] <= 1.0
    assert set(printed["img2img_preservation"]) == {"0.5", "0.9"}
    assert set(printed["txt2img_fidelity"]) == {"3"}
    assert printed["model_mb"] > 0
    assert set(printed["fewshot"]["arms"]) == set(eval_script.ARMS)
    arms = printed["fewshot"]["arms"]
    assert arms["img2img"]["train_images"] == arms["real"]["train_images"] == 100 + 100
    assert arms["txt2img"]["train_images"] == 100 + 10
    assert all(0.0 <= a["mean"] <= 1.0 and a["std"] == 0.0 for a in arms.values())
    # the judge is cached by its settings: a rerun loads it instead of training
    assert printed["judge"]["trained_now"]
    again = eval_script.main(argv + ["--sections", ""])
    assert not again["judge"]["trained_now"]
    assert again["judge_accuracy"] == printed["judge_accuracy"]


def test_missing_model_folder_names_it_and_the_training_script(eval_script, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit, match="train_tiny_sd.py") as err:
        eval_script.main(["--model", str(missing), "--quick"])
    assert str(missing) in str(err.value)


def test_bad_settings_fail_early(eval_script, tiny_sd_dir):
    with pytest.raises(ValueError, match="strengths must be in"):
        eval_script.main(["--model", str(tiny_sd_dir), "--set", "img2img_strengths=0.5,1.5"])
    with pytest.raises(SystemExit, match="field=value"):
        eval_script.main(["--model", str(tiny_sd_dir), "--set", "no_such_field=1"])
