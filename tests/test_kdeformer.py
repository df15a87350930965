"""sip.models.kdeformer: the KDE normaliser and the sampled attention (Zandieh et al., ICML 2023)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sip.models.kdeformer import (
    KDEformerConfig,
    estimate_normaliser,
    kde_attention_parts,
    kdeformer_attention,
)


def _peaked(n: int, d: int = 16, seed: int = 0):
    """Queries near keys (peaked attention, as in trained transformers) and random values."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, n, d, generator=g) * 1.5
    q = k[:, :, torch.randperm(n, generator=g)] + 0.3 * torch.randn(1, 2, n, d, generator=g)
    return q, k, torch.randn(1, 2, n, d, generator=g)


@pytest.mark.parametrize("stratified", [True, False])
def test_normaliser_is_unbiased_against_exact_softmax_sums(stratified):
    g = torch.Generator().manual_seed(1)
    q, k = 0.5 * torch.randn(1, 1, 200, 8, generator=g), 0.5 * torch.randn(1, 1, 200, 8, generator=g)
    exact = torch.exp(q @ k.transpose(-2, -1) / 8 ** 0.5).sum(-1)
    ests = torch.stack([estimate_normaliser(q, k, KDEformerConfig(num_samples=16, block_size=16, seed=s, min_tokens=0,
                                                                  stratified=stratified))
                        for s in range(400)])
    single = ((ests - exact).abs() / exact).mean()
    bias = ((ests.mean(0) - exact).abs() / exact).mean()
    assert bias < single / 5  # averaging 400 seeds shrinks the error: no systematic bias


def test_error_shrinks_as_the_budget_grows():
    q, k, v = _peaked(2048)
    exact = F.scaled_dot_product_attention(q, k, v)
    errs = []
    for s in (32, 256, 1536):
        cfg = KDEformerConfig(num_samples=s, block_size=64, min_tokens=0)
        errs.append(((kdeformer_attention(q, k, v, cfg) - exact).norm() / exact.norm()).item())
    assert errs[0] > errs[1] > errs[2]


def test_exact_when_the_budget_covers_every_column_or_the_sequence_is_short():
    q, k, v = _peaked(256)
    exact = F.scaled_dot_product_attention(q, k, v)
    covered = KDEformerConfig(num_samples=200, block_size=64, min_tokens=0)
    assert torch.allclose(kdeformer_attention(q, k, v, covered), exact, atol=1e-6)
    short = KDEformerConfig(num_samples=8, block_size=8, min_tokens=1024)
    assert torch.allclose(kdeformer_attention(q, k, v, short), exact, atol=1e-6)


def test_one_block_holding_every_key_is_exact_inside_the_estimator():
    q, k, v = _peaked(128)
    num, den, _ = kde_attention_parts(q, k, v, KDEformerConfig(num_samples=4, block_size=128, min_tokens=0))
    assert torch.allclose(num / den, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def _masked_exact(q, k, v, scale=None):
    n = q.shape[-2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~torch.eye(n, dtype=torch.bool), scale=scale)


def test_exclude_self_masks_the_diagonal_in_every_path():
    """Locality Self-Attention's diagonal mask: the exact fallback, the exact block part and the sampled
    part all leave out each query's own key, even when that key would dominate its row."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 128, 16, generator=g)
    q, v = 3.0 * k, torch.randn(1, 2, 128, 16, generator=g)  # self-scores ~ 3 * 16 / 4 = 12: dominant
    masked, unmasked = _masked_exact(q, k, v), F.scaled_dot_product_attention(q, k, v)
    covered = KDEformerConfig(num_samples=100, block_size=64, min_tokens=0)  # fallback
    assert torch.allclose(kdeformer_attention(q, k, v, covered, exclude_self=True), masked, atol=1e-5)
    num, den, _ = kde_attention_parts(q, k, v, KDEformerConfig(num_samples=4, block_size=128), exclude_self=True)
    assert torch.allclose(num / den, masked, atol=1e-5)  # one block holds every key
    sampled = KDEformerConfig(num_samples=20000, block_size=1, min_tokens=0)  # nearly all weight sampled
    num, den, _ = kde_attention_parts(q, k, v, sampled, exclude_self=True)
    err = lambda a: ((a - masked).norm() / masked.norm()).item()  # noqa: E731
    assert err(num / den) < 0.15 and err(unmasked) > 0.5
    num, den, _ = kde_attention_parts(q, k, v, sampled)  # the same samples without the mask: the diagonal leaks
    assert err(num / den) > 0.5
    with pytest.raises(ValueError, match="exclude_self needs self-attention"):
        kdeformer_attention(q, k[:, :, :64], v[:, :, :64], sampled, exclude_self=True)


def test_per_block_samples_spread_the_error_instead_of_stacking_it_in_one_direction():
    """Diffuse attention (i.i.d. q, k, v): one shared sample set gives every query the same error, a
    rank-one error matrix whose spectral norm is ~√(d/S)·‖V‖; independent samples per block shrink it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2048, 64, generator=g) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)

    def spectral_error(shared: bool) -> float:
        cfg = KDEformerConfig(num_samples=64, block_size=64, min_tokens=0, shared_samples=shared)
        diff = kdeformer_attention(q, k, v, cfg) - exact
        return (torch.linalg.matrix_norm(diff[0, 0], ord=2) / torch.linalg.matrix_norm(v[0, 0], ord=2)).item()

    shared, per_block = spectral_error(True), spectral_error(False)
    assert per_block < 0.5 * shared, (per_block, shared)


def test_stratified_draws_cut_the_error_on_structured_tokens():
    """Tokens of a few latent factors (as image patches are): keys sorted by LSH bucket sit near similar keys
    and values, so one draw per S-quantile of the sorted keys covers them evenly, where independent draws
    repeat some and miss others. Same cost, same seeds; the error over four seeds falls by more than half."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, 2048, 2, generator=g)
    q, k, v = (0.5 * z @ torch.randn(2, 32, generator=g) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)

    def error(stratified: bool) -> float:
        return sum(((kdeformer_attention(q, k, v, KDEformerConfig(num_samples=64, block_size=64, min_tokens=0, seed=s,
                                                                   stratified=stratified)) - exact).norm()
                    / exact.norm()).item() for s in range(4)) / 4

    iid, stratified = error(False), error(True)
    assert stratified < 0.6 * iid, (stratified, iid)


def test_deterministic_under_a_seed_and_another_seed_differs():
    q, k, v = _peaked(1024)
    cfg = KDEformerConfig(num_samples=64, block_size=64, min_tokens=0)
    a, b = kdeformer_attention(q, k, v, cfg), kdeformer_attention(q, k, v, cfg)
    c = kdeformer_attention(q, k, v, KDEformerConfig(num_samples=64, block_size=64, min_tokens=0, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_masked_keys_get_no_weight_and_shapes_follow_the_inputs():
    q, k, v = _peaked(512)
    k2, v2 = k.clone(), v.clone()
    v2[..., 400:, :] = 1e6  # huge values on masked keys would dominate if they leaked
    mask = torch.ones(1, 512, dtype=torch.bool)
    mask[:, 400:] = False
    cfg = KDEformerConfig(num_samples=64, block_size=32, min_tokens=0)
    out = kdeformer_attention(q, k2, v2, cfg, key_padding_mask=mask)
    assert out.shape == q.shape and out.abs().max() < 100
    kv = torch.randn(1, 2, 700, 16)
    assert kdeformer_attention(q, kv, kv, cfg).shape == (1, 2, 512, 16)  # cross-attention lengths


@pytest.mark.parametrize("field", ["num_samples", "block_size", "n_hashes"])
def test_bad_budgets_are_clear_errors(field):
    with pytest.raises(ValueError, match=field):
        KDEformerConfig(**{field: 0})


# ----------------------------------------------------------------------------------------------------
# in models: timm ViT attention layer, diffusers UNet processor
# ----------------------------------------------------------------------------------------------------

def test_vit_with_kdeformer_attention_equals_exact_below_the_threshold_and_differs_above():
    from sip.models.classifiers import create_model
    from sip.models.kdeformer_layers import use_kdeformer_in_vit

    torch.manual_seed(0)
    kw = dict(num_classes=5, img_size=32, patch_size=2, embed_dim=32, depth=2, num_heads=2)  # 256 + 1 tokens
    vit = create_model("vit_tiny_patch16_224", kw).eval()
    x = torch.randn(2, 3, 32, 32)
    exact = vit(x)
    assert use_kdeformer_in_vit(vit, KDEformerConfig(min_tokens=1024)) == 2
    assert torch.allclose(vit(x), exact, atol=1e-5)  # 257 tokens < min_tokens: exact
    use_kdeformer_in_vit(vit, KDEformerConfig(num_samples=32, block_size=32, min_tokens=0))
    approx = vit(x)
    assert approx.shape == exact.shape and torch.isfinite(approx).all() and not torch.allclose(approx, exact)


def test_unet_processor_only_touches_self_attention_and_is_exact_when_the_budget_covers(tiny_sd_txt2img):
    import copy

    from sip.models.kdeformer_layers import KDEformerAttnProcessor, use_kdeformer_in_unet

    unet = copy.deepcopy(tiny_sd_txt2img.unet).eval()
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = unet(sample, 10, encoder_hidden_states=text).sample
        n = use_kdeformer_in_unet(unet, KDEformerConfig(num_samples=4096, block_size=64, min_tokens=0))
        kinds = [type(p).__name__ for p in unet.attn_processors.values()]
        assert n == kinds.count("KDEformerAttnProcessor") > 0
        assert all(isinstance(p, KDEformerAttnProcessor) == k.endswith("attn1.processor")
                   for k, p in unet.attn_processors.items())
        assert torch.allclose(unet(sample, 10, encoder_hidden_states=text).sample, exact, atol=1e-4)
        use_kdeformer_in_unet(unet, KDEformerConfig(num_samples=16, block_size=16, min_tokens=0))
        approx = unet(sample, 10, encoder_hidden_states=text).sample
    assert torch.isfinite(approx).all() and not torch.allclose(approx, exact)


# ----------------------------------------------------------------------------------------------------
# training through the estimator: its backward
# ----------------------------------------------------------------------------------------------------

def _grads(loss_of, q, k, v) -> torch.Tensor:
    """d loss / d (q, k, v), flattened into one vector."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss_of(*leaves).backward()
    return torch.cat([t.grad.flatten() for t in leaves])


def test_backward_of_the_unnormalised_estimates_is_unbiased():
    """The numerator and normaliser are unbiased estimates of ``exp(q kᵀ s) v`` and ``exp(q kᵀ s) 1`` for any
    fixed draws' distribution, so their gradients averaged over seeds converge to the exact ones like
    ``1 / √draws`` (no floor): a quarter of the error at 16 times the draws."""
    g = torch.Generator().manual_seed(0)
    q, k, v, c = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(4))

    def exact(q, k, v):
        a = torch.exp(q @ k.transpose(-2, -1) * 8 ** -0.5)
        return (c * (a @ v)).sum() + a.sum()

    def sampled(seed):
        def loss(q, k, v):
            num, den, shift = kde_attention_parts(q, k, v, KDEformerConfig(num_samples=8, block_size=4, seed=seed))
            return (c * num * shift.exp()).sum() + (den * shift.exp()).sum()
        return loss

    want = _grads(exact, q, k, v)
    draws = [_grads(sampled(s), q, k, v) for s in range(800)]
    err = [((torch.stack(draws[:r]).mean(0) - want).norm() / want.norm()).item() for r in (50, 800)]
    single = ((draws[0] - want).norm() / want.norm()).item()
    assert err[1] < err[0] / 2.5 and err[1] < single / 10 and err[1] < 0.08


def test_backward_of_the_attention_matches_exact_attention_as_the_budget_grows():
    """The output ``num / den`` is a ratio of unbiased estimates; its gradient averaged over seeds approaches
    exact attention's (the ratio's bias shrinks with the budget), and with one block holding every key it is
    exact attention's gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v, c = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(4))
    want = _grads(lambda q, k, v: (c * F.scaled_dot_product_attention(q, k, v)).sum(), q, k, v)

    def mean_error(cfg: dict, seeds: int) -> float:
        def loss(seed):
            def f(q, k, v):
                num, den, _ = kde_attention_parts(q, k, v, KDEformerConfig(seed=seed, **cfg))
                return (c * num / den).sum()
            return f
        got = torch.stack([_grads(loss(s), q, k, v) for s in range(seeds)]).mean(0)
        return ((got - want).norm() / want.norm()).item()

    errs = [mean_error({"num_samples": s, "block_size": 4}, 100) for s in (4, 64, 256)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02
    assert mean_error({"num_samples": 4, "block_size": 32}, 1) < 1e-5


def test_a_vit_with_kdeformer_attention_trains(tmp_path):
    """``model.attention: kdeformer`` through ``sip train``: the estimator runs (17 tokens > min_tokens and
    > num_samples + block_size), gradients flow and the weights move (issue 31: an in-place exponential
    broke the backward)."""
    import json

    from safetensors.torch import load_file

    from conftest import tiny_train_recipe
    from sip.train.inputs import build_model, seed_everything
    from sip.train.run import run_training

    recipe = tiny_train_recipe("optim.epochs=1", "run.eval_max_samples=10", "model.attention=kdeformer",
                               "model.kdeformer={num_samples: 4, block_size: 4, min_tokens: 8}")
    metrics = run_training(recipe, tmp_path / "run")
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["steps"] == 6 and line["nonfinite_steps"] == 0 and line["train_loss"] > 0
    seed_everything(recipe.run.seed)  # the run's own initial weights
    start = build_model(recipe.model, 10, recipe.data.img_size)[0].state_dict()
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert set(start) == set(trained)
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], trained["blocks.0.attn.qkv.weight"])
