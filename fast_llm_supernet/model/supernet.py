"""`fast_llm_supernet.model.supernet`: `SupernetForCausalLM`, the PyTorch supernet, the numerical reference
for every placement; its blocks, norms and MLP; `build_mixer`.

Module tree = checkpoint names (Fast-LLM's Apriel2 text export):

    model.embed_tokens
    model.decoder.blocks.{i}.input_layernorm
    model.decoder.blocks.{i}.mixer.mixers.{NAME}.*   (supernet block: one module per mixer)
    model.decoder.blocks.{i}.mixer.*                 (plain block: the mixer itself)
    model.decoder.blocks.{i}.post_attention_layernorm
    model.decoder.blocks.{i}.mlp.{gate,up,down}_proj
    model.norm
    lm_head                                          (absent from the file when tied)

A placement names one mixer per layer; one forward runs one placement for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fast_llm_supernet.model import checkpoint, generation, speculative
from fast_llm_supernet.model.attention import Attention, linear_bias_enabled, stochastic_sub_mixer_configs
from fast_llm_supernet.model.gdn import GatedDeltaNet
from fast_llm_supernet.model.kda import KimiDeltaAttention
from shared_spec import (
    Apriel2TextConfig,
    AttentionMixerConfig,
    BlockConfig,
    GDNMixerConfig,
    KDAMixerConfig,
    MLPConfig,
    Placement,
    PlacementError,
    PresetsFile,
    StochasticMixerConfig,
    SupernetSpec,
)

PlacementLike = Placement | str | Sequence[str] | None

# Fast-LLM's activations by the names its Apriel2 exporter writes (`ActivationType.hf_name`, plus
# the Fast-LLM spellings); Fast-LLM's gelu is the tanh approximation.
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.pow(F.relu(x), 2),
    "squared_relu": lambda x: torch.pow(F.relu(x), 2),
    "identity": lambda x: x,
    "sigmoid": torch.sigmoid,
}


def rms_norm_epsilon(config) -> float:
    """A block or head `normalization` config's epsilon, or a ValueError for a norm this project does not compute."""
    if config.type != "rms_norm":
        raise ValueError(f"normalization type {config.type!r} is not supported; valid choices: rms_norm")
    return config.epsilon


def mlp_activation(config: MLPConfig):
    """The activation of an `mlp` config (by the name Fast-LLM's Apriel2 exporter writes), or a ValueError
    naming what is supported."""
    if config.type != "mlp":
        raise ValueError(f"mlp type {config.type!r} is not supported; valid choices: mlp")
    if config.activation not in _ACTIVATIONS:
        raise ValueError(
            f"mlp activation {config.activation!r} is not supported; valid choices: {', '.join(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[config.activation]


def build_mixer(config: AttentionMixerConfig | GDNMixerConfig | KDAMixerConfig, hidden_size: int) -> nn.Module:
    """The mixer module for one (non-stochastic) mixer config; parameter names match the checkpoint.

    Every mixer has the same interface: `forward(hidden_states [B, T, D], cache=None) -> [B, T, D]` and
    `new_cache(batch_size, device, dtype, max_length=None)`; with a cache the input continues the cached sequence and the
    cache is updated in place.
    """
    if isinstance(config, AttentionMixerConfig):
        return Attention(config, hidden_size)
    if isinstance(config, GDNMixerConfig):
        return GatedDeltaNet(config, hidden_size)
    if isinstance(config, KDAMixerConfig):
        return KimiDeltaAttention(config, hidden_size)
    raise TypeError(
        f"no mixer for config type {type(config).__name__} (type {getattr(config, 'type', '?')!r}); "
        "valid mixer types: attention, gdn, kda"
    )


class RMSNorm(nn.Module):
    """Fast-LLM's torch RMSNorm (`torch.rms_norm`), computed in float32 and cast back."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden_states.float(), self.weight.shape, self.weight.float(), self.eps)
        return normed.to(hidden_states.dtype)


def _norm(config, hidden_size: int) -> RMSNorm:
    return RMSNorm(hidden_size, rms_norm_epsilon(config))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); ungated: down(act(up(x)))."""

    def __init__(self, config: MLPConfig, hidden_size: int):
        super().__init__()
        self.activation = mlp_activation(config)
        self.gated = config.gated
        # Fast-LLM's layer_1 is gate|up (split on export), layer_2 is down.
        in_bias, out_bias = linear_bias_enabled(config, "layer_1"), linear_bias_enabled(config, "layer_2")
        if self.gated:
            self.gate_proj = nn.Linear(hidden_size, config.intermediate_size, bias=in_bias)
        self.up_proj = nn.Linear(hidden_size, config.intermediate_size, bias=in_bias)
        self.down_proj = nn.Linear(config.intermediate_size, hidden_size, bias=out_bias)
        for linear in self.children():
            nn.init.normal_(linear.weight, std=hidden_size**-0.5)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.activation(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return self.down_proj(self.activation(self.up_proj(hidden_states)))


class StochasticMixer(nn.Module):
    """A supernet layer's mixers by their checkpoint names; the placement picks which one runs.

    With `upstream_mask_sharing` the attention sub-mixers use the window and rotary of the block's
    last attention sub-mixer, as upstream Fast-LLM computes them (see `effective_attention_configs`);
    without it (the default) each uses its own config.
    """

    def __init__(self, config: StochasticMixerConfig, hidden_size: int, upstream_mask_sharing: bool = False):
        super().__init__()
        for name in config.mixers:
            if "." in name or not name:
                raise ValueError(f"mixer name {name!r} cannot be a module name (no dots, not empty)")
        mixer_configs = stochastic_sub_mixer_configs(config, upstream_mask_sharing)
        self.mixers = nn.ModuleDict({name: build_mixer(sub, hidden_size) for name, sub in mixer_configs.items()})
        self.main_mixer_name = config.main_mixer_name


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: BlockConfig, hidden_size: int, upstream_mask_sharing: bool = False):
        super().__init__()
        self.input_layernorm = _norm(config.normalization, hidden_size)
        if isinstance(config.mixer, StochasticMixerConfig):
            self.mixer = StochasticMixer(config.mixer, hidden_size, upstream_mask_sharing)
            self.is_stochastic = True
        else:
            self.mixer = build_mixer(config.mixer, hidden_size)
            self.is_stochastic = False
        self.post_attention_layernorm = _norm(config.normalization, hidden_size)
        self.mlp = MLP(config.mlp, hidden_size)

    def get_mixer(self, name: str) -> nn.Module:
        """The mixer `name` (a validated placement entry) of this block."""
        return self.mixer.mixers[name] if self.is_stochastic else self.mixer

    def forward(
        self, hidden_states: torch.Tensor, mixer_name: str, cache: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, mixer output) both [B, T, D]."""
        mixer_output = self.get_mixer(mixer_name)(self.input_layernorm(hidden_states), cache=cache)
        hidden_states = hidden_states + mixer_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, mixer_output


class Decoder(nn.Module):
    def __init__(self, config: Apriel2TextConfig, upstream_mask_sharing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            DecoderBlock(block, config.hidden_size, upstream_mask_sharing) for block in config.blocks_in_order()
        )


class SupernetModel(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, decoder, final norm."""

    def __init__(self, config: Apriel2TextConfig, upstream_mask_sharing: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.decoder = Decoder(config, upstream_mask_sharing)
        self.norm = _norm(config.head.normalization, config.hidden_size)


@dataclass
class SupernetCaches:
    """One cache per decoder layer, made for one placement and one batch."""

    placement: Placement
    layers: list[Any]

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen_tokens if self.layers and hasattr(self.layers[0], "seen_tokens") else 0


@dataclass
class SupernetOutput:
    """Forward output when per-layer mixer outputs are asked for."""

    logits: torch.Tensor  # [B, T, V]
    mixer_outputs: list[torch.Tensor]  # per layer, [B, T, D]: what the layer's mixer added to the residual
    placement: Placement


class SupernetForCausalLM(nn.Module):
    """Apriel2 text supernet: shared embeddings, norms, MLPs and head; several mixers per layer.

    Attention masks inside a supernet block: upstream Fast-LLM (dense-SDPA path: CPU, and CUDA
    without flash-attn) gives every attention sub-mixer of a block the mask (window) and rotary of
    the block's last attention sub-mixer (`effective_attention_configs`), so its FA sub-mixer is
    windowed when an SWA sibling comes after it. `upstream_mask_sharing=True` computes exactly
    that; False (the default for new models) gives each attention sub-mixer its own window.
    `from_pretrained` reads the choice from `supernet_model.json`, which `save_pretrained` writes;
    a checkpoint without it is an upstream export and gets upstream's computation.
    """

    def __init__(
        self, config: Apriel2TextConfig, presets: PresetsFile | None = None, *, upstream_mask_sharing: bool = False
    ):
        super().__init__()
        self.config = config
        self.upstream_mask_sharing = upstream_mask_sharing
        self.spec = SupernetSpec.from_config(config)
        if presets is not None:
            presets.validate_against(self.spec)
        self.presets = presets
        self.model = SupernetModel(config, upstream_mask_sharing)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Fast-LLM's default init for embeddings and head: normal(0, hidden_size ** -0.5).
        nn.init.normal_(self.model.embed_tokens.weight, std=config.hidden_size**-0.5)
        nn.init.normal_(self.lm_head.weight, std=config.hidden_size**-0.5)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- placements and caches -------------------------------------------------------------

    def resolve_placement(self, placement: PlacementLike = None) -> Placement:
        """Any accepted spelling (list, compact string, preset name, None = default) -> Placement."""
        return Placement.parse(placement, self.spec, self.presets)

    def new_caches(
        self,
        placement: PlacementLike,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
    ) -> SupernetCaches:
        """Empty per-layer caches for incremental decoding with `placement`; `max_length` (tokens per sequence,
        prompt included), when known, lets attention caches allocate once."""
        placement = self.resolve_placement(placement)
        device = device if device is not None else self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        layers = [
            block.get_mixer(name).new_cache(batch_size, device, dtype, max_length=max_length)
            for block, name in zip(self.model.decoder.blocks, placement.mixers, strict=True)
        ]
        return SupernetCaches(placement=placement, layers=layers)

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        placement: PlacementLike = None,
        caches: SupernetCaches | None = None,
        return_mixer_outputs: bool = False,
        last_logits_only: bool = False,
    ) -> torch.Tensor | SupernetOutput:
        """Logits [B, T, V] for input_ids [B, T] under one placement ([B, 1, V]: the last position's, with
        `last_logits_only`, which is all decoding needs: the head over a 16k-token prompt would be [B, 16k, V]).

        With `caches`, input_ids continues the cached sequences and the caches are updated in
        place; the placement defaults to the caches' and must equal it if given.
        """
        if caches is not None:
            if placement is not None and self.resolve_placement(placement) != caches.placement:
                raise PlacementError(
                    f"placement {self.resolve_placement(placement).canonical!r} differs from the one the caches "
                    f"were made for ({caches.placement.canonical!r})"
                )
            resolved = caches.placement
        else:
            resolved = self.resolve_placement(placement)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")

        hidden_states = self.model.embed_tokens(input_ids)  # [B, T, D]
        mixer_outputs = []
        for index, (block, name) in enumerate(zip(self.model.decoder.blocks, resolved.mixers, strict=True)):
            cache = caches.layers[index] if caches is not None else None
            hidden_states, mixer_output = block(hidden_states, name, cache)
            if return_mixer_outputs:
                mixer_outputs.append(mixer_output)
        if last_logits_only:
            hidden_states = hidden_states[:, -1:]
        logits = self.lm_head(self.model.norm(hidden_states))  # [B, T, V]
        if return_mixer_outputs:
            return SupernetOutput(logits=logits, mixer_outputs=mixer_outputs, placement=resolved)
        return logits

    # ---- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        placement: PlacementLike = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        draft_placement: PlacementLike = None,
        num_speculative_tokens: int = 4,
        speculation_stats: speculative.SpeculationStats | None = None,
    ) -> torch.Tensor:
        """Prompt plus up to `max_new_tokens` tokens, [B, T + new] (or [T + new] for a 1-D prompt).

        Prefills the caches once, then decodes one token per step. Sequences that emitted an EOS
        keep emitting it until every sequence has finished (or the budget is spent).

        With `draft_placement`, self-speculative decoding (`model/speculative.py`): the draft placement
        proposes `num_speculative_tokens` tokens, `placement` verifies them in one forward; the output
        follows `placement` exactly (greedy: the same tokens). `speculation_stats` collects acceptance.
        """
        eos_ids = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        if draft_placement is not None:
            return self._speculative_generate(
                input_ids, placement, draft_placement, num_speculative_tokens, max_new_tokens, do_sample, temperature,
                top_k, top_p, generator, eos_ids, speculation_stats,
            )
        squeeze = input_ids.dim() == 1
        if squeeze:
            input_ids = input_ids[None]
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        eos = torch.tensor(eos_ids, device=input_ids.device, dtype=input_ids.dtype)

        # Caches and the output sized once for the whole budget: a step writes its token, it copies nothing.
        batch_size, prompt_length = input_ids.shape
        caches = self.new_caches(
            placement, batch_size, device=input_ids.device, max_length=prompt_length + max_new_tokens
        )
        sequences = input_ids.new_empty(batch_size, prompt_length + max_new_tokens)
        sequences[:, :prompt_length] = input_ids
        length = prompt_length
        finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
        next_input = input_ids
        for _ in range(max_new_tokens):
            logits = self(next_input, caches=caches, last_logits_only=True)[:, -1].float()  # [B, V]
            next_token = generation.next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if len(eos_ids):
                next_token = torch.where(finished, eos[0], next_token)
                finished |= torch.isin(next_token, eos)
            sequences[:, length] = next_token
            length += 1
            if len(eos_ids) and bool(finished.all()):
                break
            next_input = sequences[:, length - 1 : length]
        sequences = sequences[:, :length]
        return sequences[0] if squeeze else sequences

    def _speculative_generate(
        self, input_ids, placement, draft_placement, num_speculative_tokens, max_new_tokens, do_sample, temperature,
        top_k, top_p, generator, eos_ids, stats,
    ) -> torch.Tensor:
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if top_k is not None or top_p is not None:
            raise ValueError("speculative decoding samples with temperature only (top_k / top_p are not supported)")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        target, draft = self.resolve_placement(placement), self.resolve_placement(draft_placement)
        squeeze = input_ids.dim() == 1
        rows = input_ids[None] if squeeze else input_ids
        outputs = [
            speculative.speculative_generate_one(
                self, row, target, draft, num_speculative_tokens, max_new_tokens, do_sample, temperature, generator,
                eos_ids, stats,
            )
            for row in rows
        ]
        # Rows that stopped early are padded with their EOS, as `generate` does.
        width = max(len(tokens) for tokens in outputs)
        padded = [tokens + [tokens[-1]] * (width - len(tokens)) for tokens in outputs]
        sequences = torch.cat([rows, torch.tensor(padded, dtype=rows.dtype, device=rows.device)], dim=1)
        return sequences[0] if squeeze else sequences

    # ---- checkpoints -------------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors as the checkpoint names them (a tied head is stored once, as the embedding)."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        upstream_mask_sharing: bool | None = None,
    ) -> SupernetForCausalLM:
        """Load config.json, the safetensors weights (cast to `dtype`) and supernet_presets.json if present.

        `upstream_mask_sharing` None: as the checkpoint's `supernet_model.json` says (upstream
        exports, which lack it, are computed as upstream Fast-LLM computes them).
        """
        loaded = checkpoint.read_checkpoint(path, dtype=dtype, upstream_mask_sharing=upstream_mask_sharing)
        model = cls(loaded.config, presets=loaded.presets, upstream_mask_sharing=loaded.upstream_mask_sharing)
        checkpoint.load_weights(model, loaded, str(path))
        model.to(dtype=dtype)
        if device is not None:
            model.to(device)
        model.eval()
        return model

    def save_pretrained(self, path: str | Path, presets: PresetsFile | None = None) -> Path:
        """Write config.json, model.safetensors, supernet_model.json and (if any) supernet_presets.json, atomically."""
        presets = presets if presets is not None else self.presets
        if presets is not None:
            presets.validate_against(self.spec)
        return checkpoint.write_checkpoint(
            path, self.checkpoint_state_dict(), self.config, presets, self.upstream_mask_sharing
        )
