"""The `supernet` trainer: Fast-LLM's GPT trainer with three changes for supernet training.

1. KDA on its finite-gradient torch kernel (see `kda_kernel.py`): swapped in before the model is built.
2. One attention mask per attention sub-mixer. Fast-LLM's `StochasticMixer.preprocess` runs every
   sub-mixer's `preprocess` on one shared kwargs dict, so on the dense-SDPA path (CPU; CUDA without
   flash-attn) every attention sub-mixer of a block gets the mask (and rotary) of the *last* one: with
   the mixers sorted by name, `attention` then runs with `sliding_window`'s window. Here each attention
   sub-mixer of a stochastic block re-runs its own `preprocess` right before its forward, so full
   attention trains as full attention. The export records this in `supernet_model.json`
   (`stochastic_attention_masks: per_mixer`), which `SupernetForCausalLM.from_pretrained` reads; an
   export without it is computed as upstream computes it.
3. Activation targets on the student's input (`supernet.activation_target: student_input`): Fast-LLM's
   activation loss compares a block's mixer output with the teacher's attention output from the teacher's
   own forward pass. Each stochastic mixer here also runs its frozen full-attention sub-mixer (the
   teacher's attention, copied by the conversion) on the same input, without gradients, and puts that
   output where Fast-LLM's activation loss reads the teacher's — the definition of `training.loss`.
"""

import functools
import typing

import torch
from fast_llm.engine.checkpoint.config import CheckpointFormat
from fast_llm.engine.config_utils.run import log_main_rank
from fast_llm.engine.training.config import TrainingCheckpointBaseConfig
from fast_llm.layers.attention.attention import Attention
from fast_llm.layers.decoder.stochastic_mixer import StochasticMixer
from fast_llm.models.gpt.conversion.config import Apriel2TextCheckpointFormat
from fast_llm.models.gpt.trainer import GPTTrainer

from fast_llm_supernet.fast_llm_adapter.config import SupernetTrainerConfig, attention_target_name
from fast_llm_supernet.fast_llm_adapter.kda_kernel import use_finite_kda_kernel
from fast_llm_supernet.model.checkpoint import MODEL_NOTES_FILE, model_notes_json


def _forward_with_own_mask(attention: Attention, forward: typing.Callable, input_, kwargs, *args, **kwargs_):
    attention.preprocess(kwargs)  # this sub-mixer's own mask (window) and rotary into the shared kwargs
    return forward(input_, kwargs, *args, **kwargs_)


def give_attention_sub_mixers_their_own_masks(model) -> int:
    """Patch every attention sub-mixer of every `StochasticMixer` in `model`; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, StochasticMixer):
            for mixer in module.mixers.values():
                if isinstance(mixer, Attention) and not isinstance(mixer._forward, functools.partial):
                    mixer._forward = functools.partial(_forward_with_own_mask, mixer, mixer._forward)
                    count += 1
    return count


# Fast-LLM finds a configurable's config class from a type variable named `ConfigType` (old-style
# TypeVar rather than PEP 695 syntax, so the file still parses on Python 3.11 for the project's lint).
ConfigType = typing.TypeVar("ConfigType", bound=SupernetTrainerConfig)


def _forward_with_student_input_target(
    mixer: StochasticMixer,
    forward: typing.Callable,
    target_name: str,
    teacher: str,
    input_,
    kwargs,
    *args,
    **kwargs_,
):
    output = forward(input_, kwargs, *args, **kwargs_)
    # The dict of the teacher's recorded outputs that the block's activation loss reads (training only).
    targets = kwargs.get(f"reference_{teacher}_hidden_states")
    if mixer.training and targets is not None:
        with torch.no_grad():
            target, target_bias = mixer.mixers[target_name]._forward(input_, kwargs)
        # The block reads `<block>.mixer_output`; this mixer is `<block>.mixer`.
        targets[f"{mixer.module_name}_output"] = target if target_bias is None else target + target_bias
    return output


def take_activation_targets_from_student_input(model, teacher: str) -> int:
    """Patch every `StochasticMixer` in `model` (see module docstring, 3.); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, StochasticMixer) and not isinstance(module._forward, functools.partial):
            target_name = attention_target_name(module._config)
            module._forward = functools.partial(
                _forward_with_student_input_target, module, module._forward, target_name, teacher
            )
            count += 1
    return count


class SupernetTrainer(GPTTrainer[ConfigType]):
    def __init__(self, config: ConfigType):
        # The model (and its KDA layers, which pick their kernel at construction) is built in
        # `Trainer.__init__`: swap the kernel first.
        use_finite_kda_kernel()
        super().__init__(config)
        patched = give_attention_sub_mixers_their_own_masks(self._multi_stage.base_model)
        log_main_rank(f"Supernet: {patched} attention sub-mixers compute their own attention mask.")
        section = self._config.supernet
        if section.activation > 0 and section.activation_target == "student_input":
            patched = take_activation_targets_from_student_input(
                self._multi_stage.base_model, section.teacher
            )
            log_main_rank(
                f"Supernet: {patched} stochastic mixers match the teacher's attention on their own input."
            )

    def _save_checkpoint(self, config: TrainingCheckpointBaseConfig, metrics) -> None:
        super()._save_checkpoint(config, metrics)
        checkpoint_format: type[CheckpointFormat] | None = getattr(config, "format", None)
        if self._run.is_main_rank and checkpoint_format is Apriel2TextCheckpointFormat:
            directory = config.get_save_directory(self._run.experiment_directory) / str(self._completed_steps)
            (directory / MODEL_NOTES_FILE).write_text(model_notes_json(upstream_mask_sharing=False))
