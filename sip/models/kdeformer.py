"""KDEformer attention: softmax attention in sub-quadratic time (Zandieh, Han, Daliri, Karbasi, ICML 2023).

Exact attention is ``D⁻¹ A V`` with ``A = exp(Q Kᵀ / √d)`` and ``D = diag(A 1)``: ``O(N²d)``. KDEformer
observes that ``D`` is a kernel density estimate (each ``D_i`` is a sum of exponential kernels between
``q_i`` and all keys) and that ``D⁻¹ A V`` is well approximated by a few columns of ``A`` picked by
importance sampling, once the few *heavy* entries of ``A`` are handled exactly. Written from the paper
(the authors' code was not consulted for this implementation), in two parts:

1. **Heavy entries by locality-sensitive hashing.** Queries and keys are hashed with angular LSH
   (signs of ``n_hashes`` shared random projections, read as a Gray code so neighbouring buckets get
   neighbouring codes) and sorted by bucket; attention inside each block of ``block_size`` sorted
   queries × the matching block of sorted keys is computed exactly. Large ``q·k`` fall mostly in
   these blocks.
2. **The rest by importance sampling.** Each block of queries draws its own ``num_samples`` keys with
   replacement with probability ``p_j ∝ ‖v_j‖² + mean ‖v‖²`` (value-norm sampling mixed with uniform, so
   every column has a chance, as the paper's column-norm sampling requires); each sampled entry outside
   the query's own block is weighted ``1 / (num_samples · p_j)``. Numerator and normaliser share the
   same samples and weights, so both are unbiased estimates of the exact sums (tested) and the output is
   their ratio. A shared per-query maximum keeps the exponentials finite. Drawing per block rather than
   once for all queries costs the same but makes the blocks' errors independent: with one shared set
   the error matrix is nearly rank one and its spectral norm grows like ``√(d / S)·‖V‖`` (measured 0.51
   at S = 256, d = 64, 16k tokens), per block like ``(1 + √(d / blocks)) / √S · ‖V‖`` (0.13).
   The draws are stratified (``stratified``, the default): draw ``j`` of a block comes from the ``j``-th
   ``S``-quantile of the sampling distribution over the LSH-sorted keys, so neighbouring (similar) keys are
   covered evenly instead of some drawn twice and others missed — still unbiased, never a larger variance.

Cost per head: ``O(N · (block_size + num_samples) · d)`` plus an ``O(N log N)`` sort, against ``O(N² d)``.
When ``block_size + num_samples`` reaches ``N`` the estimator would do no less work than exact
attention, so exact attention is used (``exact result when the budget covers every column``).

This module is the estimator (:func:`kdeformer_attention`); :mod:`sip.models.kdeformer_layers` puts it in
timm ViTs (``model.attention: kdeformer``) and diffusers UNets (``generate.attention: kdeformer``). Exact
attention stays the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sip.ids import stable_seed


@dataclass(frozen=True)
class KDEformerConfig:
    """Budget and hashing of the estimator.

    Attributes:
        num_samples: keys sampled per head for the non-heavy part; more = lower error, more time.
        block_size: sorted queries per exact block (and keys it sees); the heavy part's width.
        n_hashes: random projections of the angular LSH (bits of the bucket code).
        seed: seeds projections and samples, so the same inputs give the same output.
        min_tokens: shorter sequences use exact attention (the estimator only pays for long ones).
        shared_samples: one sample set for all queries (the first version: same cost, larger spectral error)
            instead of one per query block.
        stratified: each group's S draws are stratified along the LSH-sorted keys (draw j from the j-th S-quantile
            of the sampling distribution, so similar keys are not drawn twice while others are missed): still
            unbiased, never a larger variance than independent draws (false: independent draws).
    """

    num_samples: int = 256
    block_size: int = 128
    n_hashes: int = 8
    seed: int = 0
    min_tokens: int = 1024
    shared_samples: bool = False
    stratified: bool = True

    def __post_init__(self):
        for name in ("num_samples", "block_size", "n_hashes"):
            if getattr(self, name) < 1:
                raise ValueError(f"kdeformer.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_hashes > 30:
            raise ValueError(f"kdeformer.n_hashes must be <= 30, got {self.n_hashes}")


ATTENTION_CHOICES = ("exact", "kdeformer")


def kdeformer_config(attention: str, settings: dict | None, where: str) -> KDEformerConfig | None:
    """The :class:`KDEformerConfig` a recipe asks for, or None for exact attention.

    Args:
        attention (str): ``exact`` or ``kdeformer`` (the recipe's ``<where>.attention``).
        settings (dict, optional): the recipe's ``<where>.kdeformer``: any :class:`KDEformerConfig` field
            (num_samples, block_size, n_hashes, seed, min_tokens, shared_samples, stratified); empty = defaults.
        where (str): the recipe section, named in errors (``generate``, ``model``, ``student``).
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"{where}.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    settings = dict(settings or {})
    if attention == "exact":
        if settings:
            raise ValueError(f"{where}.kdeformer is set but {where}.attention is exact; set "
                             f"{where}.attention: kdeformer or remove {where}.kdeformer")
        return None
    known = set(KDEformerConfig.__dataclass_fields__)
    if unknown := sorted(set(settings) - known):
        raise ValueError(f"{where}.kdeformer has unknown keys {unknown}; known: {sorted(known)}")
    from sip.config import from_dict  # typed like a recipe section: an integer key given 1.5 or NaN names itself

    return from_dict(KDEformerConfig, settings, prefix=f"{where}.kdeformer")


def _gray_to_rank(bits: torch.Tensor) -> torch.Tensor:
    """Bits (…, n) read as a Gray code → its rank, so adjacent ranks differ in one hyperplane."""
    n = bits.shape[-1]
    binary = torch.cumsum(bits.long(), dim=-1) % 2  # gray → binary: b_i = g_0 xor … xor g_i
    weights = 2 ** torch.arange(n - 1, -1, -1, device=bits.device)
    return (binary * weights).sum(-1)


def lsh_order(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Permutation sorting the rows of ``x`` (…, N, d) by their angular-LSH bucket."""
    bits = (x @ projections) > 0
    return torch.argsort(_gray_to_rank(bits), dim=-1, stable=True)


def _generator(config: KDEformerConfig, device: torch.device, salt: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stable_seed("kdeformer", config.seed, salt))
    return g


def _take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, h, idx[b, h, j]]`` for ``t (B, H, M, D)``, ``idx (B, H, K)`` → ``(B, H, K, D)``: one
    ``index_select`` of whole rows (much faster on CPU than ``gather`` with an expanded index)."""
    b, h, m, dd = t.shape
    offsets = (torch.arange(b * h, device=t.device) * m).view(b, h, 1)
    return t.reshape(b * h * m, dd).index_select(0, (idx + offsets).reshape(-1)).view(b, h, -1, dd)


def _combine(s_block: torch.Tensor, vbk: torch.Tensor, s_smp: torch.Tensor, v_smp: torch.Tensor, grad: bool):
    """``(exp(s_block − shift) @ vbk + exp(s_smp − shift) @ v_smp, shift)`` with one shift per query (its row
    maximum). The shift cancels in num / den (and den · exp(shift)), so it is a constant for autograd; under
    autograd (``grad``) the exponentials are taken out of place: exp's backward reads its output, which an
    in-place subtraction or exponential would overwrite."""
    shift = torch.maximum(s_block.amax(-1), s_smp.amax(-1)).unsqueeze(-1).detach()  # (B, H, nb, bs, 1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    if grad:
        e_block, e_smp = (s_block - shift).exp(), (s_smp - shift).exp()
    else:  # inference: reuse the score buffers
        e_block, e_smp = s_block.sub_(shift).exp_(), s_smp.sub_(shift).exp_()
    return e_block @ vbk + e_smp @ v_smp, shift


def kde_attention_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KDEformerConfig,
                        key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                        exclude_self: bool = False):
    """The estimator's numerator, normaliser and per-query shift, in the queries' original order.

    ``out = num / den``; ``den · exp(shift)`` estimates ``D_i = Σ_j exp(q_i·k_j · scale)``.

    Args:
        q, k, v (torch.Tensor): ``(B, H, N, d)`` (keys and values may have another length ``M``).
        config (KDEformerConfig): budget, hashing, seed.
        key_padding_mask (torch.Tensor, optional): ``(B, M)`` bool, True for keys to keep.
        scale (float, optional): score scale. Defaults to ``d ** -0.5``.
        exclude_self (bool): self-attention with the diagonal masked (query ``i`` never sees key ``i``, as
            in Locality Self-Attention); needs ``N == M``.

    Returns:
        tuple: ``num (B, H, N, d_v)``, ``den (B, H, N, 1)``, ``shift (B, H, N, 1)``.
    """
    b, h, n, d = q.shape
    m = k.shape[-2]
    scale = d ** -0.5 if scale is None else scale
    dev, dtype = q.device, q.dtype
    bs = min(config.block_size, n, m)
    nb = math.ceil(n / bs)
    # 1. sort queries and keys by LSH bucket (shared projections so similar q and k land together)
    proj = torch.randn(d, config.n_hashes, generator=_generator(config, dev, "proj"), device=dev).to(dtype)
    qo, ko = lsh_order(q, proj), lsh_order(k, proj)
    dv = v.shape[-1]
    qs = _take_rows(q * scale, qo)  # the scale folded into the queries once
    # keys, values and a ones column side by side: one gather, and one matmul gives numerator and normaliser
    kv = _take_rows(torch.cat([k, v, torch.ones_like(v[..., :1])], -1), ko)
    valid = torch.ones(b, 1, m, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask[:, None]
    valid_s = valid.expand(b, h, m).gather(2, ko)
    # 2. exact block-diagonal part: query block i × key block i (keys split into nb equal-as-possible blocks)
    kb = math.ceil(m / nb)
    pad_q, pad_k = nb * bs - n, nb * kb - m
    qb = F.pad(qs, (0, 0, 0, pad_q)).view(b, h, nb, bs, d)
    kvb = F.pad(kv, (0, 0, 0, pad_k)).view(b, h, nb, kb, d + dv + 1)
    kbk, vbk = kvb[..., :d], kvb[..., d:]
    vmask = F.pad(valid_s, (0, pad_k), value=False).view(b, h, nb, 1, kb)
    s_block = qb @ kbk.transpose(-2, -1)
    if key_padding_mask is not None or pad_k:
        s_block = s_block.masked_fill(~vmask, float("-inf"))
    q_id = F.pad(qo, (0, pad_q), value=-1).view(b, h, nb, bs, 1)  # original index of each sorted query
    if exclude_self:  # the diagonal: sorted query and sorted key with the same original index
        k_id = F.pad(ko, (0, pad_k), value=-2).view(b, h, nb, 1, kb)
        s_block = s_block.masked_fill(q_id == k_id, float("-inf"))
    # 3. sampled part: keys by value norm mixed with uniform, over valid keys only. Each query block draws its
    #    own keys (G = nb groups): the blocks' errors are then independent, so they do not add up along one
    #    direction (with one shared sample set, G = 1, the spectral error grows like √(d / S) instead of 1 / √S)
    # the sampling distribution is a choice, not a function to differentiate: for any fixed one the estimates
    # are unbiased, so their gradients (with the draws held fixed) are unbiased too
    vn = kv[..., d:d + dv].detach().float().pow(2).sum(-1)
    probs = (vn + vn.mean(-1, keepdim=True)).masked_fill(~valid_s, 0.0)
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
    groups, s = (1 if config.shared_samples else nb), config.num_samples
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[..., -1:].clamp_min(1e-300)  # ends at exactly 1: u < 1 never runs past the last valid key
    u = torch.rand(b, h, groups * s, generator=_generator(config, dev, f"samples-{n}-{m}"), device=dev,
                   dtype=torch.float64)
    if config.stratified:  # draw j of each group from [j / S, (j + 1) / S) of the CDF over LSH-sorted keys
        u = (u.view(b, h, groups, s) + torch.arange(s, device=dev, dtype=torch.float64)).div_(s).view(b, h, -1)
    idx = torch.searchsorted(cdf, u, right=True).clamp_max_(m - 1)  # inverse-CDF draws, with replacement
    kv_smp = _take_rows(kv, idx).view(b, h, groups, s, d + dv + 1)
    w_smp = (1.0 / (s * probs.gather(2, idx))).view(b, h, groups, s, 1)
    # a sample inside the query's own block is already counted exactly: weight 0 (its score is also in that
    # block, so it may stay in the shift's maximum); the weights scale the values and the ones column
    inside = (idx.view(b, h, groups, s, 1) // kb) == torch.arange(nb, device=dev).view(nb, 1, 1)
    v_smp = kv_smp[..., d:] * w_smp.masked_fill(inside, 0.0).to(dtype)  # (B, H, nb, S, dv + 1)
    s_smp = qb @ kv_smp[..., :d].transpose(-2, -1)  # (B, H, nb, bs, S)
    if exclude_self:  # the query's own key must not even enter the maximum (it may dominate its row)
        s_smp = s_smp.masked_fill(q_id == ko.gather(2, idx).view(b, h, groups, 1, s), float("-inf"))
    # 4. combine with one shift per query
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    both, shift = _combine(s_block, vbk, s_smp, v_smp, grad)  # (…, dv + 1): num | den
    # 5. back to the queries' original order (one row gather for numerator, normaliser and shift)
    out = _take_rows(torch.cat([both, shift], -1).reshape(b, h, nb * bs, dv + 2)[:, :, :n],
                     torch.argsort(qo, dim=-1))
    return out[..., :dv], out[..., dv:dv + 1], out[..., dv + 1:]


def estimate_normaliser(q: torch.Tensor, k: torch.Tensor, config: KDEformerConfig, scale: float | None = None,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The KDE estimate of ``D_i = Σ_j exp(q_i·k_j · scale)``, shape ``(B, H, N)``."""
    v = torch.ones_like(k[..., :1])
    _, den, shift = kde_attention_parts(q, k, v, config, key_padding_mask, scale)
    return (den * shift.exp()).squeeze(-1)


def kdeformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KDEformerConfig = KDEformerConfig(),
                        key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                        exclude_self: bool = False) -> torch.Tensor:
    """Approximate ``softmax(q kᵀ · scale) v`` for ``(B, H, N, d)`` tensors (exact below the budget).

    Args:
        q, k, v (torch.Tensor): queries ``(B, H, N, d)``, keys and values ``(B, H, M, d)``.
        config (KDEformerConfig): sample budget, block size, hashing, seed. Defaults to the defaults.
        key_padding_mask (torch.Tensor, optional): ``(B, M)`` bool, True where a key may be attended.
        scale (float, optional): defaults to ``d ** -0.5``.
        exclude_self (bool): mask the diagonal (query ``i`` never attends key ``i``; Locality Self-Attention).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (batch, heads, tokens, dim), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    n, m = q.shape[-2], k.shape[-2]
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs self-attention (as many queries as keys), got {n} queries, {m} keys")
    if n < config.min_tokens or config.num_samples + config.block_size >= m:
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        if exclude_self:
            eye = torch.eye(n, dtype=torch.bool, device=q.device)
            mask = ~eye if mask is None else mask & ~eye
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    num, den, _ = kde_attention_parts(q, k, v, config, key_padding_mask, scale, exclude_self)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)
