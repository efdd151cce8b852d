"""Self-speculative decoding in the PyTorch model: greedy output equals non-speculative greedy output for any
(target, draft) pair, a draft equal to its target is always accepted, and sampling follows the target."""

import numpy as np
import pytest
import torch

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.model.speculative import SpeculationStats, verify
from shared_spec import Apriel2TextConfig
from tests.test_training_trainer import TINY_SUPERNET

FOUR_LAYERS = {**TINY_SUPERNET, "decoder": {**TINY_SUPERNET["decoder"], "num_blocks": 4}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = SupernetForCausalLM(Apriel2TextConfig.model_validate(FOUR_LAYERS)).eval()
    with torch.no_grad():  # sharper distributions than a random init: fewer near-ties, more structure
        model.lm_head.weight.mul_(8)
    return model


PAIRS = [
    ("attention*", "gdn*"), ("attention*", "sliding_window*"), ("attention*", "kda*"), ("attention*", "attention*"),
    ("gdn,attention,kda,sliding_window", "gdn*"), ("kda*", "attention*"), ("gdn*", "gdn,gdn,kda,kda"),
]


@pytest.mark.parametrize(("target", "draft"), PAIRS)
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculation_equals_greedy(model, target, draft, k):
    prompt = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, placement=target, max_new_tokens=20)
    stats = SpeculationStats()
    got = model.generate(prompt, placement=target, max_new_tokens=20, draft_placement=draft,
                         num_speculative_tokens=k, speculation_stats=stats)
    assert torch.equal(got, expected)
    assert stats.drafted > 0 and stats.rounds > 0
    if target == draft:
        assert stats.acceptance_rate == 1.0


def test_eos_stops_like_generate(model):
    prompt = torch.randint(0, 320, (1, 5), generator=torch.Generator().manual_seed(2))
    plain = model.generate(prompt, placement="attention*", max_new_tokens=12)[0, 5:].tolist()
    eos = plain[4]  # a token greedy decoding emits: generation must stop right after it
    expected = model.generate(prompt, placement="attention*", max_new_tokens=12, eos_token_id=eos)
    got = model.generate(prompt, placement="attention*", max_new_tokens=12, eos_token_id=eos,
                         draft_placement="gdn*", num_speculative_tokens=3)
    assert torch.equal(got, expected)


def test_rejection_sampling_follows_the_target_distribution():
    """10,000 verifications on an 8-token vocabulary: the first emitted token is distributed as the target's p,
    whatever the draft's q (chi-square test)."""
    from scipy.stats import chisquare

    generator = torch.Generator().manual_seed(0)
    vocab, k, draws = 8, 3, 10_000
    target_logits = torch.randn(k + 1, vocab, generator=generator) * 1.5
    draft_logits = torch.randn(k, vocab, generator=generator) * 1.5
    draft_probs = torch.softmax(draft_logits, -1)
    counts = np.zeros(vocab)
    accepted_total = 0
    for _ in range(draws):
        drafted = torch.multinomial(draft_probs, 1, generator=generator)[:, 0]
        accepted, next_token = verify(target_logits, drafted, draft_probs, True, 1.0, generator)
        first = int(drafted[0]) if accepted > 0 else next_token
        counts[first] += 1
        accepted_total += accepted
    probabilities = torch.softmax(target_logits[0].double(), -1).numpy()
    expected = probabilities / probabilities.sum() * draws
    assert chisquare(counts, expected).pvalue > 0.001
    assert 0 < accepted_total < draws * k  # real drafting: some kept, some rejected


def test_sampled_speculation_runs_and_same_draft_is_accepted(model):
    prompt = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(3))
    stats = SpeculationStats()
    out = model.generate(prompt, placement="gdn*", max_new_tokens=16, do_sample=True, temperature=0.8,
                         generator=torch.Generator().manual_seed(0), draft_placement="gdn*",
                         num_speculative_tokens=4, speculation_stats=stats)
    assert out.shape == (1, 22)
    assert stats.acceptance_rate > 0.99
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        model.generate(prompt, draft_placement="gdn*", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, draft_placement="gdn*", top_k=5)
