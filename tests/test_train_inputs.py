"""sip.train.inputs: training items are seeded by (seed, epoch, position), so DataLoader workers change
nothing."""

from __future__ import annotations

import torch

import sip.train.inputs as inputs_mod

from conftest import tiny_train_recipe as tiny  # the shared tiny recipe, under the name this test was written with


def test_dataloader_workers_give_the_same_batches(tmp_path):
    """Items are seeded by (seed, epoch, position): workers change nothing."""
    recipe = tiny()
    classes = inputs_mod.class_names(recipe.data)
    images = inputs_mod.build_train_images(recipe.data, classes, 0)
    model, _ = inputs_mod.build_model(recipe.model, 10, 16)
    tf, _ = inputs_mod.build_transforms(inputs_mod.resolve_input_config(model, recipe.data), recipe.data)
    view = inputs_mod.EpochView(images, lambda ds, i, rng: {"image": tf(ds[i][0]), "label": ds[i][1]}, seed=0, repeat=2)
    view.set_epoch(1)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(view, batch_size=10, num_workers=workers)
        batches.append(torch.cat([b["image"] for b in loader]))
    assert torch.equal(batches[0], batches[1])
    view.set_epoch(2)
    assert not torch.equal(torch.cat([b["image"] for b in torch.utils.data.DataLoader(view, batch_size=10)]),
                           batches[0])


def _record(ds, index, rng):
    return {"index": index, "draw": rng.random(), "torch": float(torch.rand(()))}


def test_processes_split_the_epoch_and_a_resume_under_another_count_loses_and_repeats_nothing():
    """Items are numbered by their place in the epoch's global order: two processes take alternate places with
    the augmentation one process would give them; after k steps of 2 processes (2·k·batch items), one process
    resumes at that global offset and the epoch ends with every item exactly once, each as in a one-process run."""
    images, batch = list(range(23)), 3
    one = inputs_mod.EpochView(images, _record, seed=5, repeat=2)
    one.set_epoch(4)
    reference = {int(one.positions[k]): one[k] for k in range(len(one))}
    assert len(reference) == 46 and sorted(r["index"] for r in reference.values()) == sorted(images * 2)

    ranks = [inputs_mod.EpochView(images, _record, seed=5, repeat=2, rank=r, world=2) for r in (0, 1)]
    for v in ranks:
        v.set_epoch(4)
    assert [v.epoch_length for v in ranks] == [23, 23] and len(ranks[0]) == len(ranks[1])
    k = 2  # steps each process took before the kill
    taken = [v.positions[k_] for v in ranks for k_ in range(k * batch)]
    assert sorted(taken) == list(range(2 * k * batch))  # together, the first 2·k·batch places
    for v in ranks:
        for k_ in range(k * batch):
            assert v[k_] == reference[int(v.positions[k_])]  # the one-process augmentation of that place

    one.set_epoch(4, start=2 * k * batch)  # the resume, one process
    rest = [int(p) for p in one.positions]
    assert sorted(taken + rest) == list(range(46))  # nothing lost, nothing repeated
    assert all(one[j] == reference[p] for j, p in enumerate(rest))

    odd = inputs_mod.EpochView(list(range(7)), _record, seed=5, world=2, rank=1)
    assert odd.epoch_length == 3 and len(odd) == 3  # the tail cut to a multiple of the process count


def test_items_draw_the_streams_seed_everything_gives_so_older_runs_resume_unchanged():
    """Items seed Python, NumPy and torch's CPU generator only (cheap); the draws equal what the earlier
    per-item ``seed_everything`` gave, so a run checkpointed before the change resumes with the same views."""
    import random

    import numpy as np

    def draws(ds, index, rng):
        return {"py": random.random(), "np": float(np.random.rand()), "torch": float(torch.rand(())),
                "rng": rng.random()}

    view = inputs_mod.EpochView(list(range(5)), draws, seed=3)
    view.set_epoch(2)
    for k in range(len(view)):
        s = inputs_mod.stable_seed("item", 3, 2, 0, int(view.positions[k]))
        inputs_mod.seed_everything(s)
        expected = {"py": random.random(), "np": float(np.random.rand()), "torch": float(torch.rand(())),
                    "rng": random.Random(s).random()}
        assert view[k] == expected
    assert len({view[k]["torch"] for k in range(len(view))}) == len(view)  # each item its own stream
