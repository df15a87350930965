"""sip.train.recipe: a training recipe's bad values and unknown keys fail when it is loaded."""

from __future__ import annotations

import pytest

from sip.config import ConfigError, load_config
from sip.train.recipe import TrainRecipe


def test_recipe_validation():
    with pytest.raises(ConfigError, match="scale"):
        load_config(TrainRecipe, overrides=["data.scale=[0.5, 0.1]"])
    with pytest.raises(ConfigError, match="unknown key data.img_sz"):
        load_config(TrainRecipe, overrides=["data.img_sz=3"])
    with pytest.raises(ConfigError, match="model.<key>"):
        load_config(TrainRecipe, overrides=["model.kwargs={num_classes: 3}"])
