"""scripts/eval (``python -m scripts.eval``) end to end on the tiny random Stable Diffusion, with tiny counts;
its overrides; its images are the ones sip's generator makes for the same ids and seeds."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _import(name: str):
    if str(REPO) not in sys.path:  # `python -m scripts.eval` runs from the repo root, which is on the path
        sys.path.insert(0, str(REPO))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def eval_run():
    return _import("scripts.eval.run")


@pytest.fixture(scope="module")
def fashion_mnist():
    from sip.data.fashion_mnist import load_fashion_mnist_arrays

    try:
        load_fashion_mnist_arrays("test", download=False)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


TINY = ["--set", "judge_epochs=0.01", "--set", "judge_test_images=200", "--set", "vae_images=20",
        "--set", "steps=2", "--set", "txt2img_per_class=1", "--guidance", "3",
        "--set", "img2img_strengths=0.5,0.9", "--set", "fewshot_variants=1", "--set", "fewshot_txt2img_per_class=1",
        "--set", "fewshot_steps=3", "--set", "fewshot_batch=8", "--set", "fewshot_test_images=100",
        "--prompts", "label", "--no-progress", "--caption-cache", ""]


def test_quick_path_on_tiny_model(eval_run, fashion_mnist, tiny_sd_dir, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    argv = ["--model", str(tiny_sd_dir), "--quick", "--judge-cache", str(tmp_path / "judge"),
            "--out-json", str(out_json), *TINY]
    result = eval_run.main(argv)
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
    assert set(printed["fewshot"]["arms"]) == set(_import("scripts.eval.config").ARMS)
    arms = printed["fewshot"]["arms"]
    assert arms["img2img"]["train_images"] == arms["real"]["train_images"] == 100 + 100
    assert arms["txt2img"]["train_images"] == 100 + 10
    assert all(0.0 <= a["mean"] <= 1.0 and a["std"] == 0.0 for a in arms.values())
    # txt2img 10 + img2img 10 sources × 2 variants × 2 strengths + steering 10 + few-shot 100 + 10
    assert printed["generated_images"] == 10 + 40 + 10 + 110
    # the judge is cached by its settings: a rerun loads it instead of training
    assert printed["judge"]["trained_now"]
    again = eval_run.main(argv + ["--sections", ""])
    assert not again["judge"]["trained_now"]
    assert again["judge_accuracy"] == printed["judge_accuracy"]


def test_generation_is_sips_for_the_same_ids_and_seeds(tiny_sd_img2img):
    """Images come from sip's generator, with the prompts and per-image seeds ``sip augment`` /
    ``sip synth`` give the same source id / class and variant, whatever the batch grid."""
    from PIL import Image

    from sip.ids import image_seed

    config, generation = _import("scripts.eval.config"), _import("scripts.eval.generation")
    cfg = config.EvalConfig(steps=2, batch_size=3)
    gen = generation.SipGeneration(tiny_sd_img2img, "tiny", cfg, progress=False)
    rgb, labels = gen.text2img(1, 3.0, 7, "t")
    assert rgb.shape == (10, 32, 32, 3) and labels.tolist() == list(range(10))
    label = config.CLASSES[4]
    alone = gen.generator.text2img([gen.builder(label, None, 0)], [image_seed(7, f"txt2img:{label}", 0)],
                                   guidance_scale=3.0)[0]
    assert np.abs(np.asarray(alone, dtype=np.int16) - rgb[4].astype(np.int16)).max() <= 4  # batch rounding only
    sources = [Image.new("RGB", (32, 32), (40 * i, 90, 200)) for i in range(2)]
    out = gen.img2img(sources, [0, 9], None, ["fmnist/test/1", "fmnist/test/2"], 2, 0.5, 4.0, 7, "i")
    assert out.shape == (4, 32, 32, 3)
    again = gen.img2img(sources, [0, 9], None, ["fmnist/test/1", "fmnist/test/2"], 2, 0.5, 4.0, 7, "i")
    assert np.array_equal(out, again)
    assert gen.images == 10 + 4 + 4 and gen.seconds > 0


def test_overrides_take_comma_lists_and_check_types():
    config = _import("scripts.eval.config")
    cfg = config.build_config({}, ["img2img_strengths=0.5,0.9", "fewshot_arms=none,real", "txt2img_guidance=3",
                                   "judge_epochs=1", "precision=fp32"])
    assert cfg.img2img_strengths == (0.5, 0.9) and cfg.fewshot_arms == ("none", "real")
    assert cfg.txt2img_guidance == (3.0,) and cfg.judge_epochs == 1.0 and cfg.precision == "fp32"
    with pytest.raises(ValueError, match="steps"):
        config.build_config({}, ["steps=many"])
    with pytest.raises(ValueError, match="unknown few-shot arms"):
        config.build_config({}, ["fewshot_arms=none,bogus"])


def test_missing_model_folder_names_it_and_the_training_script(eval_run, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit, match="train_tiny_sd.py") as err:
        eval_run.main(["--model", str(missing), "--quick"])
    assert str(missing) in str(err.value)


def test_bad_settings_fail_early(eval_run, tiny_sd_dir):
    with pytest.raises(ValueError, match="strengths must be in"):
        eval_run.main(["--model", str(tiny_sd_dir), "--set", "img2img_strengths=0.5,1.5"])
    with pytest.raises(SystemExit, match="field=value"):
        eval_run.main(["--model", str(tiny_sd_dir), "--set", "no_such_field=1"])
    with pytest.raises(SystemExit, match="unknown sections"):
        eval_run.main(["--model", str(tiny_sd_dir), "--sections", "vae,bogus"])
