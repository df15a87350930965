"""sip.models.small_resnet: timm ResNets without the stem max-pool, for 28-64 px images."""

from __future__ import annotations

import pytest
import torch

from sip.models.classifiers import create_model


@pytest.mark.parametrize("name", ["sip_resnet10t_small", "sip_resnet18_small"])
def test_first_stage_runs_at_half_the_input_size(name):
    model = create_model(name, {"num_classes": 10}).eval()
    stock = create_model(name.replace("sip_", "").replace("_small", ""), {"num_classes": 10}).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        # the stock timm model's first stage sees 7x7 at 28 px; this one 14x14
        assert model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x))))).shape[-1] == 14
        assert stock.layer1(stock.maxpool(stock.act1(stock.bn1(stock.conv1(x))))).shape[-1] == 7
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())


def test_groupnorm_variant_for_small_batches_and_no_pretrained_weights():
    model = create_model("sip_resnet10t_small", {"num_classes": 3, "norm_layer": "groupnorm1"})
    assert isinstance(model.bn1, torch.nn.GroupNorm)
    model.train()(torch.randn(1, 3, 28, 28)).sum().backward()  # one image per batch is fine with GroupNorm
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("sip_resnet10t_small", {"num_classes": 3}, pretrained=True)
