"""sip.distill.losses: each KD loss against values computed by hand (plain Python math), and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from sip.distill.losses import KD_LOSSES, build_kd_loss, register_kd_loss

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]  # student logits, B=2, C=3
T1 = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.5]]  # teacher 1
T2 = [[0.0, 3.0, 1.0], [1.0, 0.0, 0.0]]  # teacher 2
Y = [1, 2]


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def ce(z, y):
    return -math.log(softmax(z)[y])


def kl(p, q):  # KL(p ‖ q)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def mean(xs):
    return sum(xs) / len(xs)


def tt(x):
    return torch.tensor(x, dtype=torch.float32)


def close(value: torch.Tensor, expected: float):
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_known_constants():
    """KL of equal distributions is 0; CE of uniform logits is ln C."""
    z = tt([[0.0, 0.0, 0.0]])
    close(build_kd_loss("hinton", temperature=3.0, alpha=1.0)(z, z, None), 0.0)
    close(build_kd_loss("ce")(z, None, torch.tensor([2])), math.log(3))


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0)])
def test_hinton(temperature, alpha):
    expected = mean([(1 - alpha) * ce(S[b], Y[b])
                     + alpha * temperature**2 * kl(softmax(T1[b], temperature), softmax(S[b], temperature))
                     for b in range(2)])
    loss = build_kd_loss("hinton", temperature=temperature, alpha=alpha)
    close(loss(tt(S), tt(T1), torch.tensor(Y)), expected)


def test_hinton_without_labels_needs_alpha_one():
    loss = build_kd_loss("hinton", temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha=1"):
        loss(tt(S), tt(T1), None)


def test_deit_soft():
    t, a = 3.0, 0.1
    cls_logits, dist_logits = S, T2  # any two heads
    expected = mean([(1 - a) * ce(cls_logits[b], Y[b])
                     + a * t**2 * kl(softmax(T1[b], t), softmax(dist_logits[b], t)) for b in range(2)])
    close(build_kd_loss("deit_soft", temperature=t, alpha=a)((tt(cls_logits), tt(dist_logits)), tt(T1), torch.tensor(Y)),
          expected)


def test_deit_hard():
    teacher_labels = [max(range(3), key=lambda c: T1[b][c]) for b in range(2)]  # [0, 2]
    expected = mean([0.5 * ce(S[b], Y[b]) + 0.5 * ce(T2[b], teacher_labels[b]) for b in range(2)])
    loss = build_kd_loss("deit_hard")
    close(loss((tt(S), tt(T2)), tt(T1), torch.tensor(Y)), expected)
    close(loss((tt(S), tt(T2)), tt(T1), None), mean([ce(T2[b], teacher_labels[b]) for b in range(2)]))
    with pytest.raises(ValueError, match="distillation token"):
        loss(tt(S), tt(T1), torch.tensor(Y))


def test_multi_teacher_weighted_soft_targets():
    t, a, w = 2.0, 0.7, [1.0, 3.0]
    expected = []
    for b in range(2):
        p1, p2 = softmax(T1[b], t), softmax(T2[b], t)
        p = [(w[0] * x + w[1] * y) / sum(w) for x, y in zip(p1, p2)]
        expected.append((1 - a) * ce(S[b], Y[b]) + a * t**2 * kl(p, softmax(S[b], t)))
    loss = build_kd_loss("multi_teacher", temperature=t, alpha=a, weights=w)
    close(loss(tt(S), torch.stack([tt(T1), tt(T2)]), torch.tensor(Y)), mean(expected))
    close(loss(tt(S), [tt(T1), tt(T2)], torch.tensor(Y)), mean(expected))  # a list of teachers works too


def test_multi_token_hard_and_soft():
    a, w, t = 0.5, [2.0, 1.0], 3.0
    d1, d2 = T2, S  # the two distillation heads
    hard1 = mean([ce(d1[b], max(range(3), key=lambda c: T1[b][c])) for b in range(2)])
    hard2 = mean([ce(d2[b], max(range(3), key=lambda c: T2[b][c])) for b in range(2)])
    cls_term = mean([ce(S[b], Y[b]) for b in range(2)])
    expected = (1 - a) * cls_term + a * (2 / 3 * hard1 + 1 / 3 * hard2)
    out = (tt(S), tt(d1), tt(d2))
    teachers = torch.stack([tt(T1), tt(T2)])
    close(build_kd_loss("multi_token", mode="hard", alpha=a, weights=w)(out, teachers, torch.tensor(Y)), expected)
    soft1 = mean([t**2 * kl(softmax(T1[b], t), softmax(d1[b], t)) for b in range(2)])
    soft2 = mean([t**2 * kl(softmax(T2[b], t), softmax(d2[b], t)) for b in range(2)])
    expected = (1 - a) * cls_term + a * (2 / 3 * soft1 + 1 / 3 * soft2)
    close(build_kd_loss("multi_token", mode="soft", temperature=t, alpha=a, weights=w)(out, teachers, torch.tensor(Y)),
          expected)
    with pytest.raises(ValueError, match="2 distillation tokens but there are 1 teachers"):
        build_kd_loss("multi_token")(out, tt(T1), torch.tensor(Y))


def test_loss_errors_and_registry():
    with pytest.raises(ValueError, match="Did you mean 'hinton'"):
        build_kd_loss("hintn")
    with pytest.raises(ValueError, match="temperature must be positive"):
        build_kd_loss("hinton", temperature=0)
    with pytest.raises(ValueError, match="takes"):
        build_kd_loss("deit_hard", temperature=2.0)
    with pytest.raises(ValueError, match="student predicts 3 classes but the teacher 4"):
        build_kd_loss("hinton")(tt(S), torch.zeros(2, 4), torch.tensor(Y))

    @register_kd_loss("test_l1_logits", overwrite=True)
    class L1Logits(torch.nn.Module):
        def forward(self, student_out, teacher_out, targets):
            return (student_out - teacher_out).abs().mean()

    close(build_kd_loss("test_l1_logits")(tt(S), tt(T1), None),
          mean([abs(s - t) for rs, rt in zip(S, T1) for s, t in zip(rs, rt)]))
    assert "test_l1_logits" in KD_LOSSES.names()
