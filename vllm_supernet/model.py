"""`Apriel2ForCausalLM` for vLLM: the supernet with a placement per request.

Layout (modelled on vllm/model_executor/models/llama.py and qwen3_next.py): embeddings, decoder
blocks (pre-norm mixer, pre-norm gated MLP), final norm, LM head. Every decoder layer holds the
mixers that the allowed placements use (all of them unless the deployment is thinned, see
`placements.ServingPlacements`), each with its own vLLM cache.

Per step, the runner hook (`runner_hook.py`) hands `forward` a `SupernetBatch`: each request's
placement and the batch's token layout. Each layer then runs each mixer some request needs on
exactly those requests' tokens, and scatters the outputs back; a request's tokens never go
through a mixer its placement does not name, so its output does not depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.sequence import IntermediateTensors
from vllm.v1.kv_cache_interface import MambaSpec

from fast_llm_supernet.model.attention import stochastic_sub_mixer_configs
from fast_llm_supernet.model.checkpoint import read_upstream_mask_sharing
from fast_llm_supernet.model.supernet import MLP
from shared_spec import (
    Apriel2TextConfig,
    AttentionMixerConfig,
    BlockConfig,
    StochasticMixerConfig,
)
from vllm_supernet.mixers import StepRequests, build_vllm_mixer, state_specs
from vllm_supernet.norms import VllmRMSNorm
from vllm_supernet.packed_linear import PackedLinear, free_weights, pack_and_free
from vllm_supernet.placements import ServingPlacements, SupernetBatch


def _rms_norm(config, hidden_size: int, vllm_config: VllmConfig) -> VllmRMSNorm:
    if config.type != "rms_norm":
        raise ValueError(f"normalization type {config.type!r} is not supported; valid choices: rms_norm")
    return VllmRMSNorm(hidden_size, config.epsilon, vllm_config.device_config.device_type)


class VllmMLP(MLP):
    """The reference MLP (same parameters) with gate|up as one matmul, both matmuls `PackedLinear`s."""

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.input_linear = PackedLinear.stacked(
            [self.gate_proj, self.up_proj] if self.gated else [self.up_proj]
        )
        self.output_linear = PackedLinear.of(self.down_proj)

    def packed_linears(self) -> list[PackedLinear]:
        return [self.input_linear, self.output_linear]

    def free_packed_weights(self) -> None:
        """Called once `packed_linears` are packed: `forward` then multiplies only by the packed copies."""
        free_weights([self.up_proj, self.down_proj] + ([self.gate_proj] if self.gated else []))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        projected = self.input_linear(hidden_states)
        if self.gated:
            gate, up = projected.chunk(2, dim=-1)
            return self.output_linear(self.activation(gate) * up)
        return self.output_linear(self.activation(projected))


class SupernetStochasticMixer(nn.Module):
    """`mixer.mixers.{NAME}`: only the mixers some allowed placement uses are built."""

    def __init__(
        self,
        config: StochasticMixerConfig,
        names: list[str],
        hidden_size: int,
        vllm_config,
        prefix: str,
        upstream_mask_sharing: bool,
    ):
        super().__init__()
        # The config each sub-mixer computes with: the same function the PyTorch model uses (upstream
        # Fast-LLM gives every attention sub-mixer of a block one shared window/rotary).
        configs = stochastic_sub_mixer_configs(config, upstream_mask_sharing)
        self.mixers = nn.ModuleDict(
            {
                name: build_vllm_mixer(configs[name], hidden_size, vllm_config, f"{prefix}.mixers.{name}")
                for name in names
            }
        )


class SupernetDecoderBlock(nn.Module):
    def __init__(
        self,
        config: BlockConfig,
        names: list[str],
        hidden_size: int,
        vllm_config,
        prefix: str,
        upstream_mask_sharing: bool,
    ):
        super().__init__()
        self.input_layernorm = _rms_norm(config.normalization, hidden_size, vllm_config)
        self.post_attention_layernorm = _rms_norm(config.normalization, hidden_size, vllm_config)
        self.mlp = VllmMLP(config.mlp, hidden_size)
        self.is_stochastic = isinstance(config.mixer, StochasticMixerConfig)
        if self.is_stochastic:
            self.mixer = SupernetStochasticMixer(
                config.mixer, names, hidden_size, vllm_config, f"{prefix}.mixer", upstream_mask_sharing
            )
        else:
            self.mixer = build_vllm_mixer(config.mixer, hidden_size, vllm_config, f"{prefix}.mixer")

    def get_mixer(self, name: str) -> nn.Module:
        return self.mixer.mixers[name] if self.is_stochastic else self.mixer

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        groups: list[tuple[str, StepRequests]],
    ) -> torch.Tensor:
        """hidden_states [N, D]; groups: (mixer name, the requests that run it) covering the batch."""
        normed = self.input_layernorm(hidden_states)
        if len(groups) == 1 and groups[0][1].token_index is None:
            name, step = groups[0]
            mixer_output = self.get_mixer(name).run(normed, positions, step)
        else:
            mixer_output = torch.zeros_like(normed)
            for name, step in groups:
                rows = step.token_index
                mixer_input, mixer_positions = normed.index_select(0, rows), positions.index_select(0, rows)
                mixer_output.index_copy_(
                    0, rows, self.get_mixer(name).run(mixer_input, mixer_positions, step)
                )
        hidden_states = hidden_states + mixer_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class SupernetDecoder(nn.Module):
    def __init__(self, config: Apriel2TextConfig, serving: ServingPlacements, vllm_config, prefix: str):
        super().__init__()
        # How upstream exports compute stochastic attention masks (supernet_model.json; absent = upstream).
        upstream_mask_sharing = read_upstream_mask_sharing(vllm_config.model_config.model)
        self.blocks = nn.ModuleList(
            SupernetDecoderBlock(
                block,
                serving.layer_mixers[index],
                config.hidden_size,
                vllm_config,
                f"{prefix}.blocks.{index}",
                upstream_mask_sharing,
            )
            for index, block in enumerate(config.blocks_in_order())
        )


class SupernetModel(nn.Module):
    def __init__(
        self, config: Apriel2TextConfig, serving: ServingPlacements, vllm_config, prefix: str = "model"
    ):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.decoder = SupernetDecoder(config, serving, vllm_config, f"{prefix}.decoder")
        self.norm = _rms_norm(config.head.normalization, config.hidden_size, vllm_config)


class Apriel2ForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM model for Apriel2 text supernet checkpoints (`model_type: apriel2_text`)."""

    # The runner hook passes `supernet_batch` to forward only for models that set this.
    accepts_supernet_batch = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if (
            vllm_config.parallel_config.tensor_parallel_size != 1
            or vllm_config.parallel_config.pipeline_parallel_size != 1
        ):
            raise NotImplementedError(
                "Apriel2ForCausalLM (supernet) serves with tensor/pipeline parallel size 1 only"
            )
        if vllm_config.speculative_config is not None:
            # vLLM 0.32's draft_model method hands the drafter the target's KV group 0 (README.md,
            # "Speculative decoding"), and the GDN/KDA state pages here hold one state per request (no
            # per-draft-token slots).
            raise NotImplementedError("speculative decoding is not supported by the supernet plugin yet")
        hf_config = vllm_config.model_config.hf_config
        self.config = hf_config.apriel2()
        self.serving = ServingPlacements.from_vllm_config(vllm_config)
        self.model = SupernetModel(self.config, self.serving, vllm_config)
        self.lm_head = ParallelLMHead(self.config.vocab_size, self.config.hidden_size, prefix="lm_head")
        if self.config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(self.config.vocab_size)

        from vllm_supernet.runner_hook import install_runner_hook

        install_runner_hook()

    # ---- vLLM model interface --------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        supernet_batch: SupernetBatch | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = (
            inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        )  # [N, D]
        if supernet_batch is None:
            supernet_batch = SupernetBatch.empty()
        layer_groups = supernet_batch.layer_groups(self.serving, hidden_states.device)
        for block, groups in zip(self.model.decoder.blocks, layer_groups, strict=True):
            hidden_states = block(hidden_states, positions, groups)
        return self.model.norm(hidden_states)

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, run once the checkpoint is loaded: oneDNN packs (on CPU) the
        weights of every matmul a decode step runs, and the originals that nothing reads any more
        are freed (`packed_linear.py`)."""
        for module in self.modules():
            if hasattr(module, "packed_linears"):
                pack_and_free(module)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names are this module's parameter names (README.md, Layout of a checkpoint's tensors):
        `model.decoder.blocks.{i}.mixer.mixers.{NAME}.*` for supernet layers, `...mixer.*` for plain
        ones. Weights of mixers that this deployment does not serve are skipped on purpose."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # the head is the embedding
            if name not in params:
                if self.serving.is_thinned_out(name):
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in Apriel2ForCausalLM")
            param = params[name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            weight_loader(param, tensor)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(n for n in params if n not in loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
        return loaded

    # ---- hybrid-model hooks (vllm/platforms/interface.py: `_align_hybrid_block_size`) ---------

    @classmethod
    def get_mamba_specs_from_config(cls, vllm_config: VllmConfig) -> list[MambaSpec]:
        """One spec per kind of linear-mixer state served; vLLM pads all pages to the largest."""
        config = vllm_config.model_config.hf_config.apriel2()
        serving = ServingPlacements.from_vllm_config(vllm_config)
        specs = {}
        for block, names in zip(config.blocks_in_order(), serving.layer_mixers, strict=True):
            mixers = (
                block.mixer.mixers
                if isinstance(block.mixer, StochasticMixerConfig)
                else {names[0]: block.mixer}
            )
            for name in names:
                mixer = mixers[name]
                if isinstance(mixer, AttentionMixerConfig):
                    continue
                shapes, dtypes = state_specs(mixer, vllm_config)
                specs[(shapes, dtypes)] = MambaSpec(shapes=shapes, dtypes=dtypes, block_size=-1)
        return list(specs.values()) or [MambaSpec(shapes=(), dtypes=(), block_size=-1)]

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        spec = max(cls.get_mamba_specs_from_config(vllm_config), key=lambda s: s.page_size_bytes)
        return spec.shapes

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        spec = max(cls.get_mamba_specs_from_config(vllm_config), key=lambda s: s.page_size_bytes)
        return spec.dtypes

    @classmethod
    def get_mamba_state_copy_func(cls):
        # Whole-page copies of (conv, recurrent) for prefix caching's "align" mode.
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()
