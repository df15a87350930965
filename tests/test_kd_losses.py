"""Recipe keys reach the chosen KD loss or fail loudly (sip.distill.run.build_loss / loss_kwargs)."""
import pytest

from sip.config import load_config
from sip.distill.losses import DeiTHardKD, HintonKD, MultiTokenKD
from sip.distill.run import DistillRecipe, LossSection, build_loss, loss_kwargs, run_distillation

TEACHER = ["logits=/nonexistent/store"]  # a recipe needs teachers or a store; neither is read here


@pytest.mark.parametrize("name, key, value", [("deit_hard", "temperature", 2.0), ("hinton", "mode", "soft"),
                                              ("ce", "alpha", 0.3), ("deit_hard", "alpha", 0.9)])
def test_a_key_the_loss_does_not_take_is_an_error_naming_key_loss_and_accepted_keys(name, key, value):
    with pytest.raises(ValueError) as e:
        build_loss(LossSection(name=name, **{key: value}))
    msg = str(e.value)
    assert f"loss.{key}" in msg and repr(name) in msg
    if name == "hinton":  # lists what the loss does take
        assert "temperature" in msg and "alpha" in msg and "label_smoothing" in msg


def test_the_same_error_from_a_yaml_override(tmp_path):
    recipe = load_config(DistillRecipe, None, TEACHER + ["loss.name=deit_hard", "loss.temperature=2.0"])
    with pytest.raises(ValueError, match=r"loss\.temperature.*'deit_hard'"):
        loss_kwargs(recipe.loss)


def test_the_error_comes_before_training_starts(tmp_path):
    recipe = load_config(DistillRecipe, None, TEACHER + ["loss.name=hinton", "loss.mode=soft"])
    with pytest.raises(ValueError, match=r"loss\.mode.*'hinton'"):
        run_distillation(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no run folder, no data read, no step taken


def test_unset_keys_get_the_recipe_defaults_as_before():
    # behaviour unchanged: the recipe defaults (not each loss's own defaults) fill unset keys
    assert loss_kwargs(LossSection(name="hinton")) == {"temperature": 4.0, "alpha": 0.5, "label_smoothing": 0.0}
    assert loss_kwargs(LossSection(name="deit_soft")) == {"temperature": 4.0, "alpha": 0.5, "label_smoothing": 0.0}
    assert loss_kwargs(LossSection(name="deit_hard")) == {"label_smoothing": 0.0}
    hinton = build_loss(LossSection(name="hinton", temperature=2.0, alpha=0.9))
    assert isinstance(hinton, HintonKD) and hinton.temperature == 2.0 and hinton.alpha == 0.9
    assert isinstance(build_loss(LossSection(name="deit_hard", label_smoothing=0.1)), DeiTHardKD)
    token = build_loss(LossSection(name="multi_token", mode="soft"))
    assert isinstance(token, MultiTokenKD) and token.mode == "soft"


def test_data_free_still_needs_alpha_one():
    with pytest.raises(ValueError, match="use_labels"):
        build_loss(LossSection(name="hinton", use_labels=False))
    build_loss(LossSection(name="hinton", use_labels=False, alpha=1.0))
    build_loss(LossSection(name="deit_hard", use_labels=False))  # deit_hard has no alpha to check
