"""sip.distill.logits: the teacher-logits store's layout, replay of a stored view (the same logits again),
teacher lookup by identity, and a build that resumes by shard.

The ``teachers`` and ``store`` fixtures are in tests/conftest.py (built once per session)."""

from __future__ import annotations

import pytest
import torch

from sip.distill.logits import StoreMismatchError, TeacherLogitsStore
from sip.distill.run import run_logits
from sip.distill.teachers import TeacherSection, build_teacher
from sip.distill.views import view_input
from sip.models.checkpoints import input_transform

from conftest import logits_recipe


def test_store_layout_and_replay_gives_the_same_logits(store, teachers):
    s = TeacherLogitsStore(store)
    assert len(s) == 30 and s.logits.shape == (30, 3, 2, 10) and s.views.shape == (30, 3, 5)
    assert len(s.manifest["shards"]) == 3  # 12 + 12 + 6
    assert [t["name"] for t in s.teachers] == ["test_resnet", "sip_rednet_tiny"]
    ids = {k: build_teacher(TeacherSection(checkpoint=str(teachers[k]))).identity for k in teachers}
    assert s.teacher_indices([ids["sip_rednet_tiny"]]) == [1]
    assert s.teacher_indices([ids["sip_rednet_tiny"], ids["test_resnet"]]) == [1, 0]
    with pytest.raises(StoreMismatchError, match="other teachers"):
        s.teacher_indices([ids["other_resnet"]])
    assert s.views[:, 0].tolist() == [[0, 0, 32, 32, 0]] * 30  # view 0: the whole (32 px) image
    assert len({tuple(v) for v in s.views[:, 1:].reshape(-1, 5).tolist()}) > 20  # the other views differ
    # replay: the stored view of a sample, run through each teacher again, gives the stored logits
    from sip.train.inputs import build_train_images, class_names

    data = logits_recipe([teachers["test_resnet"]]).data
    real = build_train_images(data, class_names(data), seed=0).real
    for name, k in (("test_resnet", 0), ("sip_rednet_tiny", 1)):
        teacher = build_teacher(TeacherSection(checkpoint=str(teachers[name])))
        for i in (0, 17, 29):
            sid = real.sample_id(i)
            for v in range(3):
                view, logits = s.get(sid, v)
                x = view_input(real[i][0], view, teacher.input_config, input_transform(teacher.input_config))
                with torch.no_grad():
                    again = teacher.model(x[None])[0]
                torch.testing.assert_close(again, logits[k], atol=1e-4, rtol=1e-4)


def test_store_build_resumes_by_shard(store, teachers, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / "store.json").unlink()
    last = max(copy.glob("logits-*.safetensors"))
    last.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("logits-*.safetensors")}
    run_logits(logits_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], "store.dtype=float32",
                             "store.shard_size=12"), copy)
    after = {p.name: p.stat().st_mtime_ns for p in copy.glob("logits-*.safetensors")}
    assert all(after[n] == before[n] for n in before) and last.name in after  # kept two, rebuilt one
    a, b = TeacherLogitsStore(store), TeacherLogitsStore(copy)
    assert torch.equal(a.logits, b.logits) and a.ids == b.ids


def test_two_processes_build_the_one_process_store_and_the_last_writes_the_manifest(store, teachers, tmp_path,
                                                                                     monkeypatch):
    import json

    out = tmp_path / "two"
    recipe = logits_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], "store.dtype=float32",
                           "store.shard_size=12")
    results = []
    for rank in (1, 0):  # rank 2 of 2 finishes first and leaves store.json to the other
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        results.append(run_logits(recipe, out))
        if rank == 1:
            assert sorted(p.name for p in out.glob("logits-*")) == ["logits-00001-of-00003.safetensors"]
            assert not (out / "store.json").exists()
    assert [r["complete"] for r in results] == [False, True]
    files = sorted(p.name for p in store.glob("logits-*.safetensors"))
    assert sorted(p.name for p in out.glob("logits-*.safetensors")) == files
    for f in files:  # the same tensors and metadata (safetensors writes its header keys in no fixed order)
        assert _content(out / f) == _content(store / f)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("build_time_s", "created")}
    assert strip(json.loads((out / "store.json").read_text())) == strip(json.loads((store / "store.json").read_text()))


def _content(path) -> tuple:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}
