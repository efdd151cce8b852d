"""`Apriel2ForCausalLM` for vLLM: the supernet with a placement per request, on vLLM's parallel layers.

Laid out as vLLM's `llama.py` and `qwen3_next.py`: embeddings, decoder blocks (pre-norm mixer,
pre-norm gated MLP, residuals through vLLM's fused add-norm), final norm, LM head; module names are
the checkpoint's (`model.decoder.blocks.{i}.mixer.mixers.{NAME}.*`), and `load_weights` maps the
checkpoint tensors that vLLM stacks into one parameter through each module's `stacked_params`.
Every decoder layer holds the mixers that the served placements use (all of them unless the
deployment is thinned, `placements.ServingPlacements`), each with its own vLLM cache and its heads
split over tensor-parallel ranks: `attention.py`, `gdn.py`, `kda.py`.

Per step, `forward` gets a `SupernetBatch` (`batch.py`, through the runner patch in `patches.py`)
and each layer runs each mixer some request needs on exactly those requests' tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.sequence import IntermediateTensors
from vllm.v1.kv_cache_interface import MambaSpec

from fast_llm_supernet.model.attention import linear_bias_enabled, stochastic_sub_mixer_configs
from fast_llm_supernet.model.checkpoint import read_upstream_mask_sharing
from fast_llm_supernet.model.supernet import mlp_activation, rms_norm_epsilon
from shared_spec import (
    Apriel2TextConfig,
    AttentionMixerConfig,
    BlockConfig,
    GDNMixerConfig,
    KDAMixerConfig,
    MLPConfig,
    StochasticMixerConfig,
)
from vllm_supernet import page_layout
from vllm_supernet.attention import SupernetAttention
from vllm_supernet.batch import StepRequests, SupernetBatch
from vllm_supernet.footprint import CacheFootprints
from vllm_supernet.gdn import SupernetGatedDeltaNet
from vllm_supernet.kda import SupernetKimiDeltaAttention
from vllm_supernet.linear_mixer import state_dtypes
from vllm_supernet.load_policy import load_policy_of
from vllm_supernet.placements import ServingPlacements

MIXER_LAYERS = {
    AttentionMixerConfig: SupernetAttention,
    GDNMixerConfig: SupernetGatedDeltaNet,
    KDAMixerConfig: SupernetKimiDeltaAttention,
}


def mixer_layer(config) -> type[nn.Module]:
    for config_type, layer in MIXER_LAYERS.items():
        if isinstance(config, config_type):
            return layer
    raise TypeError(f"no vLLM mixer for {type(config).__name__}; valid mixer types: attention, gdn, kda")


class SupernetRMSNorm(RMSNorm):
    """vLLM's `RMSNorm`, which on CPU runs vLLM's own C++ kernels (`_C::rms_norm`,
    `_C::fused_add_rms_norm`, built into the CPU wheel).

    vLLM 0.32's IR dispatch registers those kernels for GPU-like devices only, so on CPU its
    `RMSNorm` (and every vLLM model with it) computes the norm in eight or so PyTorch ops; measured
    in-process (bench supernet, all-GDN, batch 4, ctx 512), the kernels take a decode step from 4.7
    to 3.7 ms. They round the normalised value to the model dtype before the weight multiplies it,
    as vLLM's GPU kernels do (bf16: one ulp off the reference; float32: within 5e-7)."""

    def forward_cpu(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        from vllm import _custom_ops as vllm_ops

        if x.dtype != self.weight.dtype:
            return self.forward_native(x, residual)
        if residual is None:
            out = torch.empty_like(x)
            vllm_ops.rms_norm(out, x.contiguous(), self.weight.data, self.variance_epsilon)
            return out
        vllm_ops.fused_add_rms_norm(x, residual, self.weight.data, self.variance_epsilon)  # both in place
        return x, residual


def rms_norm(config, hidden_size: int) -> SupernetRMSNorm:
    return SupernetRMSNorm(hidden_size, eps=rms_norm_epsilon(config))


class SupernetMLP(nn.Module):
    """down(act(gate(x)) * up(x)) (ungated: down(act(up(x)))), intermediate channels split over ranks."""

    def __init__(self, config: MLPConfig, hidden_size: int, prefix: str):
        super().__init__()
        self.activation_function = mlp_activation(config)  # the reference's; also checks the config
        self.gated = config.gated
        # Checkpoint name -> (parameter, shard) of the stacked gate|up projection (load_stacked_weights).
        self.stacked_params = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)} if self.gated else {}
        in_bias, out_bias = linear_bias_enabled(config, "layer_1"), linear_bias_enabled(config, "layer_2")
        size = config.intermediate_size
        if self.gated:
            self.gate_up_proj = MergedColumnParallelLinear(
                hidden_size, [size, size], bias=in_bias, prefix=f"{prefix}.gate_up_proj"
            )
            self.activation = SiluAndMul() if config.activation == "silu" else None
        else:
            self.up_proj = ColumnParallelLinear(hidden_size, size, bias=in_bias, prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(
            size, hidden_size, bias=out_bias, input_is_parallel=True, prefix=f"{prefix}.down_proj"
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            up, _ = self.up_proj(hidden_states)
            output, _ = self.down_proj(self.activation_function(up))
            return output
        gate_up, _ = self.gate_up_proj(hidden_states)
        if self.activation is not None:  # vLLM's fused SiLU-and-multiply
            intermediate = self.activation(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            intermediate = self.activation_function(gate) * up
        output, _ = self.down_proj(intermediate)
        return output


class SupernetStochasticMixer(nn.Module):
    """`mixer.mixers.{NAME}`: only the mixers some served placement uses are built."""

    def __init__(self, configs: dict, names: list[str], hidden_size: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.mixers = nn.ModuleDict(
            {
                name: mixer_layer(configs[name])(configs[name], hidden_size, vllm_config, f"{prefix}.mixers.{name}")
                for name in names
            }
        )


class SupernetDecoderBlock(nn.Module):
    def __init__(self, config: BlockConfig, names: list[str], hidden_size: int, vllm_config, prefix: str, upstream_mask_sharing: bool):
        super().__init__()
        self.input_layernorm = rms_norm(config.normalization, hidden_size)
        self.post_attention_layernorm = rms_norm(config.normalization, hidden_size)
        self.mlp = SupernetMLP(config.mlp, hidden_size, f"{prefix}.mlp")
        self.is_stochastic = isinstance(config.mixer, StochasticMixerConfig)
        if self.is_stochastic:
            # The config each sub-mixer computes with: the same function the PyTorch model uses.
            configs = stochastic_sub_mixer_configs(config.mixer, upstream_mask_sharing)
            self.mixer = SupernetStochasticMixer(configs, names, hidden_size, vllm_config, f"{prefix}.mixer")
        else:
            self.mixer = mixer_layer(config.mixer)(config.mixer, hidden_size, vllm_config, f"{prefix}.mixer")

    def get_mixer(self, name: str) -> nn.Module:
        return self.mixer.mixers[name] if self.is_stochastic else self.mixer

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None, mix: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [N, D] (the previous block's output, not yet added to `residual`); `mix` runs
        the mixers on the normed input [N, D] -> [N, D] (`mix_groups`, or the draft's `forward_on_cache`: `speculative.py`)."""
        if residual is None:
            residual, normed = hidden_states, self.input_layernorm(hidden_states)
        else:
            normed, residual = self.input_layernorm(hidden_states, residual)
        normed, residual = self.post_attention_layernorm(mix(normed), residual)
        return self.mlp(normed), residual

    def mix_groups(self, normed: torch.Tensor, positions: torch.Tensor, groups: list[tuple[str, StepRequests]]):
        """A step's mixers: groups are (mixer name, the requests that run it), covering the batch."""
        if len(groups) == 1 and groups[0][1].token_index is None:
            name, step = groups[0]
            return self.get_mixer(name).run(normed, positions, step)
        mixer_output = torch.zeros_like(normed)
        for name, step in groups:
            rows = step.token_index
            mixer_input, mixer_positions = normed.index_select(0, rows), positions.index_select(0, rows)
            mixer_output.index_copy_(0, rows, self.get_mixer(name).run(mixer_input, mixer_positions, step))
        return mixer_output


class SupernetDecoder(nn.Module):
    def __init__(self, config: Apriel2TextConfig, serving: ServingPlacements, vllm_config, prefix: str):
        super().__init__()
        # How upstream exports compute stochastic attention masks (supernet_model.json; absent = upstream).
        upstream_mask_sharing = read_upstream_mask_sharing(vllm_config.model_config.model)
        self.blocks = nn.ModuleList(
            SupernetDecoderBlock(
                block, serving.layer_mixers[index], config.hidden_size, vllm_config, f"{prefix}.blocks.{index}", upstream_mask_sharing
            )
            for index, block in enumerate(config.blocks_in_order())
        )


class Apriel2Model(nn.Module):
    """The checkpoint's `model.` prefix: embeddings, decoder, final norm."""

    def __init__(self, config: Apriel2TextConfig, serving: ServingPlacements, vllm_config, prefix: str = "model"):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.decoder = SupernetDecoder(config, serving, vllm_config, f"{prefix}.decoder")
        self.norm = rms_norm(config.head.normalization, config.hidden_size)


def served_mixer_configs(config: Apriel2TextConfig, serving: ServingPlacements):
    """(layer index, mixer name, mixer config) of every mixer this deployment builds."""
    for index, (block, names) in enumerate(zip(config.blocks_in_order(), serving.layer_mixers, strict=True)):
        mixers = block.mixer.mixers if isinstance(block.mixer, StochasticMixerConfig) else {names[0]: block.mixer}
        for name in names:
            yield index, name, mixers[name]


def deployment_mixer_configs(model_config) -> list:
    """The config of every mixer a deployment (its vLLM model config) builds."""
    served = served_mixer_configs(model_config.hf_config.apriel2(), ServingPlacements.from_model_config(model_config))
    return [mixer for _, _, mixer in served]


def holds_attention_and_states(model_config) -> bool:
    """Whether the deployment builds attention and linear mixers both: KV pages and state pages in one pool."""
    attention = [isinstance(mixer, AttentionMixerConfig) for mixer in deployment_mixer_configs(model_config)]
    return any(attention) and not all(attention)


def attention_head_sizes(model_config) -> list[int]:
    """The head sizes of the deployment's attention mixers (FA, SWA), each once."""
    mixers = deployment_mixer_configs(model_config)
    return sorted({mixer.head_size for mixer in mixers if isinstance(mixer, AttentionMixerConfig)})


def check_parallel(config: Apriel2TextConfig, serving: ServingPlacements, vllm_config: VllmConfig) -> None:
    """Refuse, before any weight is loaded, what the served mixers cannot be split into."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise NotImplementedError(
            "Apriel2ForCausalLM (supernet) does not support pipeline parallelism "
            f"(pipeline_parallel_size={parallel.pipeline_parallel_size}); use tensor_parallel_size instead"
        )
    tp_size = parallel.tensor_parallel_size
    for index, name, mixer in served_mixer_configs(config, serving):
        where = f"layer {index} mixer {name!r}"
        if isinstance(mixer, AttentionMixerConfig):
            SupernetAttention.check_parallel(mixer, tp_size, where)
        else:
            mixer_layer(mixer).page_shapes(mixer, tp_size, where)  # raises on heads that do not divide
    for index, block in enumerate(config.blocks_in_order()):
        if block.mlp.intermediate_size % tp_size:
            raise ValueError(
                f"layer {index} mlp: intermediate_size = {block.mlp.intermediate_size} does not divide by "
                f"tensor_parallel_size={tp_size}"
            )


def check_speculative_config(vllm_config: VllmConfig) -> None:
    """Speculative decoding serves with this project's self-speculator only: vLLM's own draft methods
    load a second model, which cannot hold a supernet's recurrent layers (vLLM issue 49112)."""
    speculative = vllm_config.speculative_config
    if speculative is None:
        return
    from vllm_supernet.speculative import SELF_SPECULATOR

    if speculative.method != "custom_class" or speculative.model != SELF_SPECULATOR:
        raise ValueError(
            f"Apriel2ForCausalLM (supernet) speculates with its own placements only: use speculative_config "
            f'{{"method": "custom_class", "model": "{SELF_SPECULATOR}", "num_speculative_tokens": K}} '
            f"(got method {speculative.method!r}, model {speculative.model!r})"
        )
    from vllm.triton_utils import HAS_TRITON

    if vllm_config.cache_config.enable_prefix_caching and not HAS_TRITON:
        # vLLM 0.32 keeps hybrid models' states for prefix caching with a Triton kernel when it speculates
        # (mamba_utils.precopy_mamba_align_fused_kernel), which has no CPU stand-in.
        raise ValueError(
            "speculative decoding with prefix caching needs Triton for the linear mixers' states (vLLM 0.32); "
            "on CPU start the engine with --no-enable-prefix-caching (offline: enable_prefix_caching=False)"
        )


class Apriel2ForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM model for Apriel2 text supernet checkpoints (`model_type: apriel2_text`)."""

    # The runner patch passes `supernet_batch` to forward only for models that set this.
    accepts_supernet_batch = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.vllm_config = vllm_config
        check_speculative_config(vllm_config)
        self.config = vllm_config.model_config.hf_config.apriel2()
        self.serving = ServingPlacements.from_model_config(vllm_config.model_config)
        check_parallel(self.config, self.serving, vllm_config)
        load_policy_of(self.serving, vllm_config.model_config.hf_config)  # the API server's; a bad one fails here
        self.model = Apriel2Model(self.config, self.serving, vllm_config)
        self.lm_head = ParallelLMHead(self.config.vocab_size, self.config.hidden_size, prefix="lm_head")
        if self.config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(self.config.vocab_size)

        from vllm_supernet.patches import install_runner_patch

        install_runner_patch()

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
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)  # [N, D]
        batch = supernet_batch if supernet_batch is not None else SupernetBatch.empty()
        blocks = self.model.decoder.blocks
        layer_groups = batch.layer_groups(self.serving.default, len(blocks), hidden_states.device)
        mixes = [partial(block.mix_groups, positions=positions, groups=groups) for block, groups in zip(blocks, layer_groups, strict=True)]
        return self.run_blocks(hidden_states, mixes)

    def run_blocks(self, hidden_states: torch.Tensor, mixes: list[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """Embedded tokens [N, D] through every decoder block (block i mixing with `mixes[i]`) and the final norm."""
        residual = None
        for block, mix in zip(self.model.decoder.blocks, mixes, strict=True):
            hidden_states, residual = block(hidden_states, residual, mix)
        hidden_states, _ = self.model.norm(hidden_states, residual)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint tensors into this model; tensors of mixers this deployment does not serve are
        skipped on purpose, and a tied head is the embedding."""
        tied = self.config.tie_word_embeddings
        loaded = load_stacked_weights(
            self,
            weights,
            skip=lambda name: (tied and name == "lm_head.weight") or self.serving.is_thinned_out(name),
        )
        if tied:
            loaded.add("lm_head.weight")
        missing = sorted(name for name, _ in self.named_parameters() if name not in loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
        return loaded

    # ---- hybrid-model hooks (vllm/platforms/interface.py: `_align_hybrid_block_size`) ---------

    @classmethod
    def get_mamba_specs_from_config(cls, vllm_config: VllmConfig) -> list[MambaSpec]:
        """One spec per kind of linear-mixer state page served (per rank, one part of a state spread over several
        pages); vLLM pads all pages to the largest."""
        footprints = CacheFootprints.of(vllm_config)
        dtypes = state_dtypes(vllm_config)
        if footprints.layout.conv_apart:  # the page holds the delta-rule state alone
            dtypes = dtypes[1:]
        specs = {}
        for cache in footprints.caches.values():
            if cache.state_bytes:
                shapes = cache.page_shapes[-len(dtypes) :]
                specs[shapes] = MambaSpec(shapes=shapes, dtypes=dtypes, block_size=-1)
        return list(specs.values()) or [MambaSpec(shapes=(), dtypes=(), block_size=-1)]

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return max(cls.get_mamba_specs_from_config(vllm_config), key=lambda s: s.page_size_bytes).shapes

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return max(cls.get_mamba_specs_from_config(vllm_config), key=lambda s: s.page_size_bytes).dtypes

    @classmethod
    def get_mamba_state_copy_func(cls):
        # Whole-page copies of (conv, recurrent) for prefix caching's "align" mode.
        return page_layout.copy_funcs(conv_apart=False)

    def get_mamba_state_copy_funcs(self, mamba_types) -> dict:
        """The deployment's: with the conv states apart, in the order of the layers' kv_cache (`page_layout`)."""
        funcs = page_layout.copy_funcs(CacheFootprints.of(self.vllm_config).layout.conv_apart)
        return {mamba_type: funcs for mamba_type in mamba_types}


def load_stacked_weights(
    root: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], skip=lambda name: False
) -> set[str]:
    """Load checkpoint tensors into `root`'s parameters with their vLLM weight loaders; returns the
    parameter names written.

    Checkpoint names are the module tree's, except the tensors a module lists in its `stacked_params`
    ({checkpoint name: (parameter, shard)}: Q|K|V, gate|up, the linear mixers' input projections and
    convolutions), which go into a shard of one stacked parameter. A tuple of shards is a tensor
    fused on disk (GDN's Q|K|V|Z): each block goes to its own shard.
    """
    params = dict(root.named_parameters())
    modules = dict(root.named_modules())
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        target, shard = _stacked_target(name, modules)
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(root).__name__}")
        param = params[target]
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            weight_loader(param, tensor)
        elif isinstance(shard, tuple):
            stacked_linear = modules[target.rpartition(".")[0]]
            sizes = [stacked_linear.output_sizes[index] for index in shard]
            for index, block in zip(shard, tensor.split(sizes, dim=0), strict=True):
                weight_loader(param, block, index)
        else:
            weight_loader(param, tensor, shard)
        loaded.add(target)
    return loaded


def _stacked_target(name: str, modules: dict[str, nn.Module]) -> tuple[str, object]:
    """(parameter name, shard) that checkpoint tensor `name` loads into: its own name and no shard,
    unless the module that owns it stacks it (`stacked_params`)."""
    owner_path, _, local = name.rpartition(".")  # e.g. "...mixers.kda.q_proj", "weight"
    module_path, _, child = owner_path.rpartition(".")  # "...mixers.kda", "q_proj"
    stacked = getattr(modules.get(module_path), "stacked_params", {})
    if child in stacked:
        parameter, shard = stacked[child]
        return ".".join(filter(None, (module_path, parameter, local))), shard
    return name, None
