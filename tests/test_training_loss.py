"""The distillation loss against hand-computed values."""

import math

import pytest
import torch
from pydantic import ValidationError

from fast_llm_supernet.training.loss import (
    IGNORE_INDEX,
    DistillLossConfig,
    LayerActivation,
    activation_distance,
    distillation_loss,
    forward_kl,
    masked_mean,
    reverse_kl,
    token_cross_entropy,
)


def hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def softmax(values, temperature=1.0):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_kl_matches_hand_computation():
    student = [0.5, -1.0, 2.0]
    teacher = [1.5, 0.0, -0.5]
    s, t = torch.tensor([student]), torch.tensor([teacher])
    assert forward_kl(s, t).item() == pytest.approx(hand_kl(softmax(teacher), softmax(student)), rel=1e-5)
    assert reverse_kl(s, t).item() == pytest.approx(hand_kl(softmax(student), softmax(teacher)), rel=1e-5)
    temperature = 2.0
    expected = temperature**2 * hand_kl(softmax(teacher, temperature), softmax(student, temperature))
    assert forward_kl(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)
    expected = temperature**2 * hand_kl(softmax(student, temperature), softmax(teacher, temperature))
    assert reverse_kl(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kl_matches_torch_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    reference = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(s, t), reference)
    reference = torch.nn.functional.kl_div(t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(reverse_kl(s, t), reference)


def test_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 13) * 5
    hidden = torch.randn(2, 7, 8)
    config = DistillLossConfig(reverse_kl=1, forward_kl=1, activation=1, temperature=1.5)
    out = distillation_loss(config, logits, logits.clone(), activations=[LayerActivation(0, "gdn", hidden, hidden.clone())])
    assert abs(out.total.item()) < 1e-6
    assert out.metrics["forward_kl"] == pytest.approx(0, abs=1e-6)
    assert out.metrics["reverse_kl"] == pytest.approx(0, abs=1e-6)
    assert out.metrics["activation"] == 0


def test_masks_and_cross_entropy():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])  # [1, 3, 3]
    labels = torch.tensor([[0, IGNORE_INDEX, 1]])
    per_token = token_cross_entropy(logits, labels)
    assert per_token[0, 1] == 0
    expected0 = -math.log(softmax([2, 0, 0])[0])
    expected2 = -math.log(softmax([0, 0, 1])[1])
    assert per_token[0, 0].item() == pytest.approx(expected0, rel=1e-6)
    config = DistillLossConfig(reverse_kl=0, forward_kl=0, activation=0, cross_entropy=1)
    out = distillation_loss(config, logits, labels=labels)
    assert out.total.item() == pytest.approx((expected0 + expected2) / 2, rel=1e-6)
    # The loss mask removes position 2 as well (e.g. a user turn in SFT).
    out = distillation_loss(config, logits, labels=labels, loss_mask=torch.tensor([[True, True, False]]))
    assert out.total.item() == pytest.approx(expected0, rel=1e-6)
    assert masked_mean(torch.tensor([1.0, 3.0]), torch.tensor([False, False])).item() == 0


def test_weights_combine_terms_and_metrics_per_layer_and_mixer():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    acts = [
        LayerActivation(0, "gdn", torch.zeros(2, 4, 3), torch.full((2, 4, 3), 2.0)),  # l2 = 2 * sqrt(3)
        LayerActivation(1, "kda", torch.zeros(2, 4, 3), torch.ones(2, 4, 3)),  # l2 = sqrt(3)
        LayerActivation(2, "gdn", torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)),
    ]
    config = DistillLossConfig(reverse_kl=0.5, forward_kl=2.0, activation=3.0, cross_entropy=0.25)
    out = distillation_loss(config, s, t, labels, activations=acts)
    expected = (
        0.5 * reverse_kl(s, t).mean() + 2.0 * forward_kl(s, t).mean() + 0.25 * token_cross_entropy(s, labels).mean()
        + 3.0 * math.sqrt(3)  # mean over the three layers of (2, 1, 0) * sqrt(3)
    )
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["act/layer_00.gdn"] == pytest.approx(2 * math.sqrt(3), rel=1e-6)
    assert out.metrics["act/mixer.gdn"] == pytest.approx(math.sqrt(3), rel=1e-6)
    assert out.metrics["act/mixer.kda"] == pytest.approx(math.sqrt(3), rel=1e-6)
    assert activation_distance(torch.zeros(3), torch.full((3,), 2.0), "mse").item() == pytest.approx(4.0)


def test_gradients_flow_to_student_only():
    s = torch.randn(1, 3, 5, requires_grad=True)
    t = torch.randn(1, 3, 5, requires_grad=True)
    out = distillation_loss(DistillLossConfig(), s, t.detach())
    out.total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_bad_loss_config_names_the_field():
    with pytest.raises(ValidationError, match="temperature"):
        DistillLossConfig(temperature=0)
    with pytest.raises(ValidationError, match="activation_distance"):
        DistillLossConfig(activation_distance="cosine")
    with pytest.raises(ValidationError, match="every loss weight"):
        DistillLossConfig(reverse_kl=0, forward_kl=0, activation=0)
    with pytest.raises(ValueError, match="no teacher logits"):
        distillation_loss(DistillLossConfig(), torch.randn(1, 2, 3))
