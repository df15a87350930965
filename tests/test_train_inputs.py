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
