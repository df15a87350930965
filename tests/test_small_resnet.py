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


# --------------------------------------------------------------------------------------------------
# sip_resnet50_small: the norm switch (batchnorm | groupnorm, gn_groups) and the input checks
# --------------------------------------------------------------------------------------------------

def _norms(model):
    bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    gn = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    return bn, gn


def test_norm_switch_changes_every_norm_layer():
    bn_model = create_model("sip_resnet50_small", {"num_classes": 10})
    gn_model = create_model("sip_resnet50_small", {"num_classes": 10, "norm_layer": "groupnorm"})
    gn16 = create_model("sip_resnet50_small", {"num_classes": 10, "norm_layer": "groupnorm", "gn_groups": 16})
    bn, gn = _norms(bn_model)
    assert len(bn) == 53 and not gn  # stem 1 + 16 bottlenecks x 3 + 4 downsample shortcuts
    bn, gn = _norms(gn_model)
    assert len(gn) == 53 and not bn
    assert {m.num_groups for m in gn} == {32}  # Wu & He's default
    assert {m.num_groups for m in _norms(gn16)[1]} == {16}
    assert isinstance(gn_model.layer1[0].downsample[1], torch.nn.GroupNorm)  # the shortcut's norm too
    assert sum(p.numel() for p in gn_model.parameters()) == sum(p.numel() for p in bn_model.parameters())
    assert isinstance(bn_model.maxpool, torch.nn.Identity)
    with torch.no_grad():
        assert bn_model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert bn_model.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 2  # last stage 2x2 at 32 px


def test_groupnorm_logits_do_not_depend_on_batch_mates():
    torch.manual_seed(0)
    image, mates_a, mates_b = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32), 3 * torch.randn(5, 3, 32, 32)
    for norm, independent in (("groupnorm", True), ("batchnorm", False)):
        torch.manual_seed(1)
        model = create_model("sip_resnet50_small", {"num_classes": 10, "norm_layer": norm}).train()
        with torch.no_grad():
            a = model(torch.cat([image, mates_a]))[0]
            b = model(torch.cat([image, mates_b]))[0]
        assert torch.allclose(a, b, atol=1e-5) is independent, norm


@pytest.mark.parametrize("kwargs, match", [
    ({"norm_layer": "groupnorm", "gn_groups": 24}, r"gn_groups=24 does not divide the 64 channels.*model\.kwargs\.gn_groups"),
    ({"norm_layer": "groupnorm", "gn_groups": 0}, r"model\.kwargs\.gn_groups must be a positive integer"),
    ({"gn_groups": 32}, r"model\.kwargs\.gn_groups=32 is set but norm_layer is batchnorm"),
    ({"norm_layer": "group_norm"}, r"model\.kwargs\.norm_layer must be one of batchnorm, groupnorm"),
])
def test_bad_norm_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("sip_resnet50_small", {"num_classes": 10, **kwargs})


def test_check_trainable_batch_one_and_image_size():
    from sip.models.input_checks import check_trainable, last_stage_input

    small = create_model("sip_resnet50_small", {"num_classes": 10})
    stock = create_model("resnet50", {"num_classes": 10})
    gn = create_model("sip_resnet50_small", {"num_classes": 10, "norm_layer": "groupnorm"})
    check_trainable(small, img_size=32, batch_size=2)
    check_trainable(gn, img_size=32, batch_size=1)  # GroupNorm trains one image at a time
    with pytest.raises(ValueError, match=r"data\.batch_size=1 .*BatchNorm.*student\.kwargs\.norm_layer: groupnorm"):
        check_trainable(small, img_size=32, batch_size=1, model_key="student")
    # stock ResNet-50: 16 px is 1x1 before layer4 (stride 2); 32 px is 2x2. The small one: 4x4 at 32 px.
    assert last_stage_input(stock, 16) == (1, 2, 16) and last_stage_input(stock, 32) == (2, 2, 16)
    assert last_stage_input(small, 32) == (4, 2, 8)
    check_trainable(stock, img_size=32, batch_size=8)
    with pytest.raises(ValueError, match=r"data\.img_size=16 is too small for resnet50.*at least 17"):
        check_trainable(stock, img_size=16, batch_size=8, name="resnet50")
    with pytest.raises(ValueError, match=r"data\.img_size=8 is too small"):
        check_trainable(small, img_size=8, batch_size=8)
    vit = create_model("test_vit", {"num_classes": 10, "img_size": 16, "patch_size": 4})
    assert last_stage_input(vit, 16) == (16, 4, 1)  # a ViT's blocks all run at the patch size: no strided stage


def test_train_refuses_bad_inputs_before_the_first_step(tmp_path):
    from conftest import tiny_train_recipe as tiny

    from sip.train.run import run_training

    resnet = ["model.name=test_resnet", "model.patch_size=null"]
    with pytest.raises(ValueError, match=r"data\.batch_size=1 with test_resnet"):
        run_training(tiny(*resnet, "model.kwargs={output_stride: 16}", "data.batch_size=1"), tmp_path / "b1")
    with pytest.raises(ValueError, match=r"data\.img_size=16 is too small for test_resnet.*model\.name"):
        run_training(tiny(*resnet, "model.kwargs={}"), tmp_path / "px")
    for run in ("b1", "px"):
        assert not (tmp_path / run / "metrics.jsonl").exists()  # refused before any step


def test_groupnorm_resnet50_trains_and_reloads_as_a_teacher(tmp_path):
    from conftest import tiny_train_recipe as tiny

    from sip.distill.teachers import TeacherSection, build_teacher
    from sip.train.run import run_training

    # the real factory with one bottleneck per stage (layers override) keeps this a few seconds
    kwargs = "model.kwargs={norm_layer: groupnorm, gn_groups: 16, layers: [1, 1, 1, 1]}"
    metrics = run_training(tiny("model.name=sip_resnet50_small", "model.patch_size=null", kwargs, "optim.epochs=1",
                                "data.batch_size=2"), tmp_path / "run")
    assert metrics["steps"] == 30  # 3 shots x 10 classes x repeat 2 / batch 2
    teacher = build_teacher(TeacherSection(checkpoint=str(tmp_path / "run")))
    bn, gn = _norms(teacher.model)
    assert not bn and len(gn) == 17 and {m.num_groups for m in gn} == {16}
