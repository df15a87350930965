"""sip.distill.teachers: a teacher's checkpoint must be safe to load, and its name must be known."""

from __future__ import annotations

import pytest
import torch

from sip.distill.teachers import TeacherSection, build_teacher


def test_teacher_checkpoint_must_be_safe(tmp_path):
    import argparse

    evil = tmp_path / "teacher.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace()}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        build_teacher(TeacherSection(checkpoint=str(evil), name="test_resnet"))
    with pytest.raises(ValueError, match="random weights"):
        TeacherSection(name="resnet50")
    with pytest.raises(ValueError, match="Close matches"):
        build_teacher(TeacherSection(name="resnet_50", pretrained=True))
