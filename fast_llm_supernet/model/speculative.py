"""`fast_llm_supernet.model.speculative`: self-speculative decoding with one checkpoint, in PyTorch.

A cheap draft placement proposes `k` tokens one at a time; the request's own (target) placement scores all of
them in one forward pass; the longest prefix the target agrees with is kept, plus one token of the target's own.
Every weight is shared: the draft runs the same modules with another placement, with caches of its own.

Verification (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"): greedy keeps a
drafted token while it is the target's argmax; sampling keeps drafted token d with probability
min(1, p(d) / q(d)) and, at the first rejection, draws from normalise(max(0, p - q)); when every drafted token is
kept, the next token is drawn from the target's distribution after them. Each emitted token then follows the
target's distribution exactly, and greedy output equals non-speculative greedy output.

Caches: no cache update in this model writes over what a cache already holds (attention keys and values are
written past the kept length or into new buffers, recurrent and convolution states reassigned), so a snapshot is
a shallow copy of a cache's fields and restoring it is free. After a partial acceptance, the target's and the draft's caches go back
to the snapshot taken before the round, and the kept tokens are fed again at the start of the next forward
(`pending`), never the prefix.

Sequences are decoded one at a time (acceptance lengths differ per sequence).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from fast_llm_supernet.model import generation


@dataclass
class SpeculationStats:
    """Drafted and accepted tokens; the acceptance rate is what a draft placement is chosen by."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward: accepted drafts plus the target's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def snapshot(layers: list) -> list:
    """A shallow copy of each layer's cache: what it holds now stays reachable however the cache moves on, since
    every update replaces tensors (a KV buffer that only appends past its length does too)."""
    saved = [copy.copy(layer) for layer in layers]
    for layer in saved:
        if hasattr(layer, "conv_states"):  # the dict is updated by key: keep the entries, not the dict
            layer.conv_states = dict(layer.conv_states)
    return saved


def restore(layers: list, saved: list) -> None:
    for layer, state in zip(layers, saved, strict=True):
        layer.__dict__.update(state.__dict__)
        if hasattr(state, "conv_states"):
            layer.conv_states = dict(state.conv_states)


def _probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def verify(
    target_logits: torch.Tensor,  # [k + 1, V]: the target's logits after the last kept token and after each draft
    drafted: torch.Tensor,  # [k]
    draft_probs: torch.Tensor | None,  # [k, V]: the draft's distributions the tokens were drawn from (sampling)
    do_sample: bool,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(number of drafted tokens kept, the next token after them)."""
    k = drafted.shape[0]
    if not do_sample:
        choices = target_logits.argmax(dim=-1)  # [k + 1]
        agree = (choices[:k] == drafted).long()
        accepted = int(agree.cumprod(0).sum().item())
        return accepted, int(choices[accepted].item())
    target_probs = _probabilities(target_logits, temperature)  # [k + 1, V]
    for i in range(k):
        token = int(drafted[i])
        ratio = target_probs[i, token] / draft_probs[i, token].clamp_min(1e-30)
        if torch.rand((), generator=generator, device=ratio.device) < ratio:
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        total = residual.sum()
        distribution = residual / total if total > 0 else target_probs[i]
        return i, int(torch.multinomial(distribution, 1, generator=generator).item())
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator).item())


@torch.no_grad()
def speculative_generate_one(
    model,
    prompt: torch.Tensor,  # [T]
    placement,
    draft_placement,
    num_speculative_tokens: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_ids: tuple[int, ...] = (),
    stats: SpeculationStats | None = None,
) -> list[int]:
    """The new tokens of one sequence (at most `max_new_tokens`, stopping after an EOS)."""
    stats = stats if stats is not None else SpeculationStats()
    k = num_speculative_tokens
    device = prompt.device
    target = model.new_caches(placement, 1, device=device)
    draft = model.new_caches(draft_placement, 1, device=device)

    def pick(logits: torch.Tensor) -> int:
        return int(generation.next_token(logits[None].float(), do_sample, temperature, generator=generator)[0])

    first_logits = model(prompt[None], caches=target)[0, -1]
    output = [pick(first_logits)]
    pending_target = [output[0]]  # kept tokens not yet in the target's caches
    pending_draft = prompt.tolist() + [output[0]]  # ... and not yet in the draft's
    while len(output) < max_new_tokens and output[-1] not in eos_ids:
        steps = min(k, max_new_tokens - len(output))
        # Draft: feed what it has not seen, then one token at a time.
        logits = model(torch.tensor([pending_draft], device=device), caches=draft)[0, -1]
        draft_snapshot = snapshot(draft.layers)
        drafted, draft_probs = [], []
        for i in range(steps):
            if do_sample:
                probs = _probabilities(logits, temperature)
                draft_probs.append(probs)
                drafted.append(int(torch.multinomial(probs, 1, generator=generator).item()))
            else:
                drafted.append(int(logits.argmax()))
            if i + 1 < steps:
                logits = model(torch.tensor([[drafted[-1]]], device=device), caches=draft)[0, -1]
        # Target: every pending token and every draft in one forward.
        target_snapshot = snapshot(target.layers)
        fed = pending_target + drafted
        target_logits = model(torch.tensor([fed], device=device), caches=target)[0, len(pending_target) - 1 :]
        accepted, next_token = verify(
            target_logits, torch.tensor(drafted, device=device), torch.stack(draft_probs) if do_sample else None,
            do_sample, temperature, generator,
        )
        stats.rounds += 1
        stats.drafted += steps
        stats.accepted += accepted
        stats.accepted_per_round.append(accepted)
        kept = drafted[:accepted]
        if accepted < steps:  # the target saw rejected drafts: back to before them, the kept ones fed next time
            restore(target.layers, target_snapshot)
            pending_target = pending_target + kept + [next_token]
        else:
            pending_target = [next_token]
        restore(draft.layers, draft_snapshot)
        pending_draft = kept + [next_token]
        emitted = kept + [next_token]
        stop = next((i for i, token in enumerate(emitted) if token in eos_ids), None)  # an EOS ends the sequence
        output += emitted if stop is None else emitted[: stop + 1]
    return output[:max_new_tokens]
