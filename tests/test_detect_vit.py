"""A ViT backbone for detectors (issue 29): sip's SPT + LSA ViT through ViTDet's simple feature pyramid trains
on tiny scenes (forward / backward, one sip train epoch), has the pyramid's strides and channels, takes the
recipe's norm switch, refuses scene sizes it cannot take naming the key, and is distilled from a ResNet teacher
with feature imitation when the pyramids match (refused clearly when they do not)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from sip.detect.coco import SceneRecipe, run_scenes
from sip.detect.data import SceneImages, collate_scenes
from sip.detect.models import DetectorSection, build_detector
from sip.detect.scenes import ObjectsSection, SceneSection
from sip.detect.step import KDSection, check_teacher, make_detection_step

SIZE = 64
VIT = DetectorSection(backbone="sip_vit_spt_lsa_tiny", patch_size=8, fpn_channels=32, head_convs=1,
                      backbone_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})


@pytest.fixture(scope="module")
def scene_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit-scenes")
    sets = {}
    for name, count, seed, start, stop in (("train", 8, 0, 0, 400), ("test", 2, 2, 600, 800)):
        scenes = SceneSection(count=count, size=SIZE, max_objects=3, object_size=(14, 30), seed=seed)
        run_scenes(SceneRecipe(output=str(root / name), objects=ObjectsSection(start=start, stop=stop), scenes=scenes,
                               progress=False))
        sets[name] = str(root / name)
    return sets


def _batch(scene_sets, n: int = 4) -> dict:
    train = SceneImages(scene_sets["train"])
    return collate_scenes([train.item(i) for i in range(n)])


def test_vit_detector_trains_forward_and_backward_on_scenes(scene_sets):
    torch.manual_seed(0)
    model = build_detector(VIT, 10, SIZE).train()
    batch = _batch(scene_sets)
    targets = [{"boxes": b, "labels": y} for b, y in zip(batch["boxes"], batch["labels"])]
    losses = model(list(batch["image"]), targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    vit = model.backbone.vit
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0  # the loss reaches the ViT's patch tokenizer
    assert vit.pos_embed.shape[1] == vit.num_prefix_tokens + (SIZE // 8) ** 2  # made for the scene's token grid
    model.eval()
    with torch.no_grad():
        out = model(list(batch["image"][:2]))
    assert len(out) == 2 and out[0]["boxes"].shape[-1] == 4


@pytest.mark.parametrize("patch, strides", [(8, [4, 8, 16]), (16, [8, 16, 32])])
def test_pyramid_strides_and_channels(patch, strides):
    backbone = build_detector(replace(VIT, patch_size=patch), 3, SIZE).backbone
    assert backbone.strides == strides and backbone.out_channels == 32
    with torch.no_grad():
        levels = backbone(torch.rand(2, 3, SIZE, SIZE))
    assert [tuple(f.shape) for f in levels.values()] == [(2, 32, SIZE // s, SIZE // s) for s in strides]
    assert list(levels) == [f"p{s}" for s in strides]


def test_norm_switch_sets_the_pyramid_norm_layers():
    def norms(section):
        pyramid = build_detector(section, 3, SIZE).backbone.pyramid
        return [(type(m).__name__, getattr(m, "num_groups", None)) for m in pyramid.modules()
                if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]

    assert norms(VIT) == [("BatchNorm2d", None)] * 6  # a 1×1 and a 3×3 conv per level
    assert norms(replace(VIT, norm="group", gn_groups=4)) == [("GroupNorm", 4)] * 6
    vit = build_detector(replace(VIT, norm="group", gn_groups=4), 3, SIZE).backbone.vit
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in vit.modules())  # LayerNorms stay


def test_scene_sizes_and_settings_the_vit_cannot_take_are_refused():
    with pytest.raises(ValueError, match=r"scenes of 60 px do not fit detector.patch_size 8 .*scenes.size a multiple "
                                         r"of 16"):
        build_detector(VIT, 3, 60)
    with pytest.raises(ValueError, match=r"scenes of 48 px do not fit detector.patch_size 16"):  # the model's own
        build_detector(replace(VIT, patch_size=None), 3, 48)
    with pytest.raises(ValueError, match="detector.patch_size must be an even number"):
        replace(VIT, patch_size=5)
    with pytest.raises(ValueError, match="detector.patch_size is read by ViT backbones only"):
        DetectorSection(backbone="resnet10t", patch_size=16)
    with pytest.raises(ValueError, match="detector.backbone_kwargs may not set img_size"):
        replace(VIT, backbone_kwargs={"img_size": 64})
    with pytest.raises(ValueError, match="a timm ResNet .* or a ViT .* is needed"):
        DetectorSection(backbone="efficientnet_b0")
    with pytest.raises(ValueError, match="detector.backbone: unknown timm model 'sip_vit_nope'"):
        DetectorSection(backbone="sip_vit_nope")
    with pytest.raises(ValueError, match="detector.gn_groups 3 must divide detector.fpn_channels 32"):
        build_detector(replace(VIT, norm="group", gn_groups=3), 3, SIZE)


def test_vit_student_distils_from_a_resnet_teacher_with_feature_imitation(scene_sets):
    torch.manual_seed(0)
    teacher = build_detector(DetectorSection(backbone="test_resnet", fpn_channels=32, head_convs=1), 10, SIZE).eval()
    student = build_detector(replace(VIT, patch_size=16), 10, SIZE).train()  # strides 8, 16, 32 = the teacher's
    kd = KDSection(teacher="teacher", feat=1.0)
    check_teacher(kd, student, teacher)
    terms, _, _ = make_detection_step(kd, teacher, "cpu", SIZE, 0.0)(student, _batch(scene_sets, 2), 0, 0)
    assert {"kd_cls", "kd_box", "kd_feat"} <= set(terms) and all(math.isfinite(float(v.detach())) for v in terms.values())
    sum(terms.values()).backward()
    with pytest.raises(ValueError, match=r"kd.teacher's pyramid has strides \[8, 16, 32\], the student's \[4, 8, 16\]"
                                         r".*detector.patch_size 16"):
        check_teacher(kd, build_detector(VIT, 10, SIZE), teacher)
    wider = build_detector(replace(VIT, patch_size=16, fpn_channels=64), 10, SIZE)
    with pytest.raises(ValueError, match="kd.feat: feature imitation needs equal pyramids.*64 channels"):
        check_teacher(kd, wider, teacher)
    check_teacher(replace(kd, feat=0.0), wider, teacher)  # the other KD terms compare head outputs only


def test_one_sip_train_epoch_with_a_vit_detector(scene_sets, tmp_path):
    from typer.testing import CliRunner

    from sip.cli import app
    from sip.detect.models import load_detector

    recipe = tmp_path / "vit.yaml"
    recipe.write_text(Path("pipelines/fmnist_detect_vit.yaml").read_text())
    sets = [f"--set=data.{k}={v}" for k, v in (("train", scene_sets["train"]), ("test", scene_sets["test"]))]
    overrides = ["--set=data.val=null", "--set=kd.teacher=null", "--set=detector.patch_size=8",
                 "--set=detector.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
                 "--set=detector.fpn_channels=32", "--set=detector.gn_groups=4", "--set=detector.head_convs=1",
                 "--set=data.batch_size=4", "--set=data.eval_batch_size=2", "--set=optim.epochs=1",
                 "--set=run.device=cpu", "--set=run.precision=fp32", "--set=run.progress=false", "--set=run.threads=1"]
    res = CliRunner().invoke(app, ["train", str(recipe), "-o", str(tmp_path / "run"), *sets, *overrides])
    assert res.exit_code == 0, res.output
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["epoch"] == 1 and math.isfinite(line["train_loss"])
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert 0.0 <= final["test_map"] <= 100.0
    model, meta = load_detector(str(tmp_path / "run"))
    assert meta["detector"]["backbone"] == "sip_vit_spt_lsa_tiny" and model.backbone.strides == [4, 8, 16]
