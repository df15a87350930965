"""Detection KD losses (issue 29): each term is zero when the student's outputs equal the teacher's, positive
and differentiable when they differ; the KD terms on a real tiny detector's outputs."""

from __future__ import annotations

import pytest
import torch

from sip.detect.kd_losses import (
    ClassScoreKD,
    FeatureImitation,
    LocalizationDistillation,
    box_mask,
    edge_distribution,
)
from sip.detect.models import DetectorSection, build_detector
from sip.detect.step import dense_forward


@pytest.fixture(scope="module")
def outputs():
    torch.manual_seed(0)
    model = build_detector(DetectorSection(backbone="test_resnet", fpn_channels=32, head_convs=1), 3, 64).eval()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    with torch.no_grad():
        _, head, feats = dense_forward(model, images, None)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0]]), torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 8.0, 8.0]])]
    return head, feats, boxes


def test_terms_are_zero_when_student_equals_teacher(outputs):
    head, feats, boxes = outputs
    logits, reg = head["cls_logits"], head["bbox_regression"]
    assert ClassScoreKD(2.0)(logits, logits.clone()).abs().item() < 1e-6
    edges = edge_distribution(reg, 0.0, 8.0, 16, 1.0)
    assert LocalizationDistillation(10.0)(edges, edges.clone(), torch.sigmoid(logits).amax(-1)).abs().item() < 1e-6
    assert FeatureImitation(1.0, 0.5)(feats, [f.clone() for f in feats], boxes, 64).item() == 0.0


def test_terms_are_positive_and_differentiable_when_they_differ(outputs):
    head, feats, boxes = outputs
    logits = head["cls_logits"].clone().requires_grad_(True)
    loss = ClassScoreKD()(logits, head["cls_logits"] + torch.randn_like(logits))
    loss.backward()
    assert loss.item() > 0 and logits.grad.abs().sum() > 0
    reg = head["bbox_regression"].clone().requires_grad_(True)
    ld = LocalizationDistillation(10.0)(edge_distribution(reg, 0, 8, 16, 1.0),
                                        edge_distribution(head["bbox_regression"] + 1.0, 0, 8, 16, 1.0))
    ld.backward()
    assert ld.item() > 0 and reg.grad.abs().sum() > 0
    moved = [f + 0.1 for f in feats]
    fg_only = FeatureImitation(1.0, 0.0)(moved, feats, boxes, 64)
    both = FeatureImitation(1.0, 0.5)(moved, feats, boxes, 64)
    assert 0 < fg_only < both


def test_box_mask_covers_boxes_at_each_level():
    mask = box_mask([torch.tensor([[8.0, 16.0, 24.0, 32.0]])], (8, 8), 64)
    assert mask[0].nonzero().tolist() == [[r, c] for r in (2, 3) for c in (1, 2)]


def test_feature_imitation_refuses_other_pyramid_shapes(outputs):
    _, feats, boxes = outputs
    with pytest.raises(ValueError, match="same detector.fpn_channels"):
        FeatureImitation()(feats, [f[:, :16] for f in feats], boxes, 64)


def test_bad_temperatures_are_refused():
    with pytest.raises(ValueError, match="kd.temperature must be positive"):
        ClassScoreKD(0)
    with pytest.raises(ValueError, match="kd.box_temperature must be positive"):
        LocalizationDistillation(-1)
