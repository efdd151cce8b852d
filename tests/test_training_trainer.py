"""The single-machine trainer: config validation, data, resume == uninterrupted, distillation lowers KL."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.tools.convert import default_presets
from fast_llm_supernet.tools.tiny_teacher import train_tokenizer
from fast_llm_supernet.training.config import ConfigError, load_config, parse_config
from fast_llm_supernet.training.data import (
    IGNORE_INDEX,
    Conversation,
    batch_indices,
    load_tokenizer,
    pack_conversations,
    pack_documents,
    tokenize_conversation,
)
from fast_llm_supernet.training.trainer import Trainer, main, placement_label
from shared_spec import Apriel2TextConfig, PresetsFile

ATTENTION = {"type": "attention", "heads": 2, "head_groups": 1, "head_size": 16, "rotary": {"type": "mistral_1d", "theta": 10000.0}}
TINY_SUPERNET = {
    "hidden_size": 32,
    "vocab_size": 320,
    "decoder": {
        "type": "fixed",
        "num_blocks": 2,
        "block": {
            "mixer": {
                "type": "stochastic",
                "main_mixer_name": "attention",
                "mixers": {
                    "attention": ATTENTION,
                    "sliding_window": {**ATTENTION, "window_size": 4},
                    "gdn": {"type": "gdn", "value_heads": 2, "key_heads": 1, "key_head_dim": 16, "value_head_dim": 16},
                    "kda": {"type": "kda", "heads": 2, "head_dim": 16},
                },
            },
            "mlp": {"type": "mlp", "intermediate_size": 64},
        },
    },
}


def stdlib_paragraphs() -> list[str]:
    """Paragraphs of a few stdlib modules' docstrings: English text that ships with Python."""
    import argparse
    import collections
    import difflib
    import json as json_module
    import logging
    import pathlib
    import random
    import string
    import textwrap
    import typing

    modules = (argparse, collections, difflib, json_module, logging, pathlib, random, string, textwrap, typing)
    paragraphs = []
    with warnings.catch_warnings():  # some modules re-export deprecated names (typing.io)
        warnings.simplefilter("ignore")
        for module in modules:
            for value in [module, *(v for v in vars(module).values() if callable(v))]:
                doc = getattr(value, "__doc__", None)
                if isinstance(doc, str) and getattr(value, "__module__", module.__name__) == module.__name__:
                    paragraphs += [p.strip() for p in doc.split("\n\n") if len(p.strip()) > 40]
    return list(dict.fromkeys(paragraphs))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A random tiny supernet with a byte-level BPE tokenizer, and text + chat data from stdlib docstrings."""
    root = tmp_path_factory.mktemp("tiny")
    documents = stdlib_paragraphs()
    tokenizer = train_tokenizer(documents, vocab_size=320)
    checkpoint = root / "supernet"
    torch.manual_seed(0)
    model = SupernetForCausalLM(Apriel2TextConfig.model_validate(TINY_SUPERNET))
    # Presets as `supernet-convert` writes them (all-attention, all-swa, ...).
    model.save_pretrained(checkpoint, presets=default_presets(model.spec))
    tokenizer.save_pretrained(checkpoint)
    with (root / "text.jsonl").open("w") as handle:
        for document in documents[:120]:
            handle.write(json.dumps({"text": document}) + "\n")
    with (root / "chat.jsonl").open("w") as handle:
        for document in documents[:60]:
            words = document.split()
            messages = [
                {"role": "user", "content": "Explain: " + " ".join(words[:4])},
                {"role": "assistant", "content": " ".join(words[4:20])},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return root


# The layer-local objective's loss: the activation distance alone (it refuses the logit terms).
ACTIVATION_ONLY_LOSS = {"reverse_kl": 0.0, "forward_kl": 0.0, "activation": 1.0, "activation_distance": "mse"}


def base_config(root: Path, output: str, **overrides) -> dict:
    config = {
        "output_dir": str(root / output),
        "steps": 4,
        "seed": 1,
        "device": "cpu",
        "threads": 1,
        "progress_bar": False,
        "tensorboard": False,
        "model": {"checkpoint": str(root / "supernet")},
        "data": {"train": {"paths": [str(root / "text.jsonl")]}, "sequence_length": 24, "batch_size": 2, "eval_fraction": 0.1},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
        "eval": {"max_batches": 1},
        "checkpoint": {"every": 2},
    }
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return config


# ---- config validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("optimizer.lr", -1.0, "optimizer.lr"),
        ("optimizer.lrr", 1.0, "optimizer.lrr"),
        ("loss.temperature", 0, "loss.temperature"),
        ("sampling.strategy", "random", "sampling.strategy"),
        ("data.train.paths", ["/does/not/exist.jsonl"], "data.train.paths"),
        ("data.train.format", "parquet", "data.train.format"),
        ("model.checkpoint", "/nowhere", "model.checkpoint"),
        ("steps", 0, "steps"),
        ("eval.placements", ["attention*", "mamba*"], "eval.placements.1"),
        ("teacher.placement", "gdn,bogus", "teacher.placement"),
        ("sampling.predefined", ["kda*"], "sampling"),
        ("export.presets", {"fast": "gdn*", "bad name": "kda*"}, "export.presets"),
        ("optimizer.mixer_lr_scale", {"sliding_window": 0.0}, "optimizer.mixer_lr_scale"),
        ("optimizer.mixer_lr_scale", {"gdn": "fast"}, "optimizer.mixer_lr_scale.gdn"),
    ],
)
def test_bad_config_fails_naming_the_field(tiny_run, key, value, field):
    with pytest.raises(ConfigError) as error:
        parse_config(base_config(tiny_run, "bad", **{key: value}))
    assert field in str(error.value)


def test_mixer_lr_scale_naming_no_mixer_fails_before_training(tiny_run, tmp_path, capsys):
    with pytest.raises(ConfigError) as error:
        parse_config(base_config(tiny_run, "bad", **{"optimizer.mixer_lr_scale": {"gdn": 2.0, "swa": 5.0}}))
    message = str(error.value)
    # The field, the bad value and the allowed names; the good key is not reported.
    assert "optimizer.mixer_lr_scale: 'swa' is not a mixer of this checkpoint" in message
    assert "mixers: attention, gdn, kda, sliding_window" in message
    assert "'gdn'" not in message
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(tiny_run, "bad_lr_scale")))
    assert main(["--config", str(path), "--set", "optimizer.mixer_lr_scale={mamba: 2}"]) == 2
    assert "'mamba' is not a mixer" in capsys.readouterr().err
    assert not (tiny_run / "bad_lr_scale").exists()  # nothing was started


def test_yaml_loading_overrides_and_cli_rejects_before_work(tiny_run, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(tiny_run, "yaml")))
    config = load_config(path, ["optimizer.lr=0.01", "sampling.strategy=full_layout"])
    assert config.optimizer.lr == 0.01 and config.sampling.strategy.value == "full_layout"
    assert main(["--config", str(path), "--check"]) == 0
    assert main(["--config", str(path), "--set", "optimizer.betas=[0.9, 1.5]"]) == 2
    assert "optimizer.betas" in capsys.readouterr().err
    assert not (tiny_run / "yaml").exists()  # nothing was started


@pytest.mark.parametrize(
    "example",
    ["tiny_distill.yaml", "tiny_sft.yaml", "smollm2/layer_local.yaml", "smollm2/distill.yaml", "smollm2/sft.yaml"],
)
def test_example_configs_validate(tiny_run, example):
    """Every shipped recipe parses and validates, the real teacher's too: a recipe edit is checked here, not two
    hours into `scripts/main.sh --teacher smollm2`. Replaced: the paths its earlier stages would write, and the
    real teacher's 30-layer placements (test_examples_smollm2_chat.py parses those for 30 layers)."""
    path = Path(__file__).parent.parent / "examples" / example
    raw = yaml.safe_load(path.read_text())
    data = tiny_run / ("chat.jsonl" if "sft" in example else "text.jsonl")
    overrides = [f"output_dir={tiny_run / 'example'}", f"model.checkpoint={tiny_run / 'supernet'}", f"data.train.paths={data}"]
    if "eval" in raw.get("data", {}):
        overrides.append(f"data.eval.paths={data}")
    if "teacher" in raw:
        overrides.append(f"teacher.checkpoint={tiny_run / 'supernet'}")
    if raw.get("sampling", {}).get("predefined"):
        overrides += ["sampling.predefined=[]", "sampling.predefined_probabilities=[]"]
    config = load_config(path, overrides)
    assert config.steps > 0


# ---- data ---------------------------------------------------------------------------------------------------


def test_text_packing_and_batches_are_a_function_of_the_step(tiny_run):
    tokenizer = load_tokenizer(tiny_run / "supernet")
    data = pack_documents(tokenizer, ["one two three four five six"] * 20, sequence_length=8)
    assert data.tokens.shape[1] == 9
    batch = data.rows(torch.tensor([0, 1]))
    assert torch.equal(batch["labels"], data.tokens[[0, 1], 1:])
    assert batch["loss_mask"].all()
    # Every row once per epoch; the same step gives the same rows.
    epoch = torch.cat([batch_indices(step, 3, 12, seed=5) for step in range(4)])
    assert sorted(epoch.tolist()) == list(range(12))
    assert torch.equal(batch_indices(7, 3, 12, seed=5), batch_indices(7, 3, 12, seed=5))
    assert not torch.equal(batch_indices(4, 3, 12, seed=5), epoch[:3])  # the next epoch reshuffles


def test_chat_loss_only_on_assistant_turns(tiny_run):
    tokenizer = load_tokenizer(tiny_run / "supernet")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three?"},
        {"role": "assistant", "content": "Six."},
    ]
    ids, is_assistant = tokenize_conversation(tokenizer, Conversation(messages))
    assistant_text = tokenizer.decode([i for i, keep in zip(ids, is_assistant, strict=True) if keep])
    assert assistant_text == f"Four.{tokenizer.eos_token}Six.{tokenizer.eos_token}"
    # Three conversations packed two to a row: the targets are exactly the assistant replies.
    data = pack_conversations(tokenizer, [Conversation(messages)] * 3, sequence_length=2 * len(ids))
    assert data.num_rows == 2
    batch = data.rows(torch.arange(data.num_rows))
    assert (batch["labels"][~batch["loss_mask"]] == IGNORE_INDEX).all()
    targets = tokenizer.decode(batch["labels"][batch["loss_mask"]].tolist())
    assert targets == f"Four.{tokenizer.eos_token}Six.{tokenizer.eos_token}" * 3


# ---- training -----------------------------------------------------------------------------------------------


def trained_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.trainable}


@pytest.mark.parametrize("lr_scale", [{}, {"sliding_window": 5.0, "gdn": 0.5}], ids=["plain", "mixer_lr_scale"])
def test_resume_after_kill_equals_uninterrupted_run(tiny_run, lr_scale):
    # log_every 3 and checkpoints every 2: the resumed run must carry a half-filled logging window.
    settings = {"log_every": 3, "eval.every": 2, "optimizer.mixer_lr_scale": lr_scale}
    suffix = "_scaled" if lr_scale else ""
    uninterrupted = Trainer(parse_config(base_config(tiny_run, "straight" + suffix, **settings)), log=lambda *_: None)
    straight = uninterrupted.run()

    config = parse_config(base_config(tiny_run, "killed" + suffix, **settings))
    first = Trainer(config, log=lambda *_: None)
    stopped = first.run(stop_after_steps=3)  # "killed" after step 3; the last checkpoint is step 2
    assert stopped.stopped_early and stopped.step == 3
    resumed_trainer = Trainer(config, log=lambda *_: None)  # a fresh process would build everything again
    resumed = resumed_trainer.run()

    assert resumed.final_eval == straight.final_eval
    assert resumed.initial_eval == straight.initial_eval
    for name, tensor in trained_state(uninterrupted).items():
        assert torch.equal(tensor, dict(resumed_trainer.trainable)[name]), name
    # Every group's lr (and multiplier) after the resumed run is the uninterrupted run's.
    def groups(trainer):
        return [(g["lr"], g["initial_lr"], g["lr_scale"], g["param_names"]) for g in trainer.optimizer.param_groups]

    assert groups(resumed_trainer) == groups(uninterrupted)
    # The metrics log of the resumed run is the uninterrupted one (the replayed step 3 is not duplicated).
    def lines(run):
        return [json.loads(line) for line in (tiny_run / run / "metrics.jsonl").read_text().splitlines()]

    assert lines("killed" + suffix) == lines("straight" + suffix)
    checkpoints = sorted(p.name for p in (tiny_run / ("killed" + suffix) / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000002", "step_00000004"]  # keep: 2


def _mark_executed(path: str) -> None:
    Path(path).write_text("unpickling ran code")


class _CodeOnLoad:
    """An object whose unpickling calls a function: what a hostile trainer_state.pt could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _mark_executed, (str(self.marker),)


def test_resume_checkpoint_loads_with_weights_only_and_refuses_pickled_code(tiny_run, tmp_path):
    from fast_llm_supernet.training.trainer import STATE_FILE

    trainer = Trainer(parse_config(base_config(tiny_run, "safe_load", steps=2)), log=lambda *_: None)
    trainer.run()
    checkpoint = trainer.latest_checkpoint()
    # Everything a resume reads is tensors, numbers, strings and plain containers.
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["format_version"] == 2
    assert Trainer(parse_config(base_config(tiny_run, "safe_load", steps=2)), log=lambda *_: None).load_checkpoint(checkpoint)[0] == 2

    # A trainer_state.pt holding an object that runs code on unpickling is refused, and the code never runs.
    marker = tmp_path / "executed"
    torch.save({**state, "log_window": {"loss": _CodeOnLoad(marker)}}, checkpoint / STATE_FILE)
    with pytest.raises(ConfigError, match="not unpickled"):
        trainer.load_checkpoint(checkpoint)
    assert not marker.exists()


def test_mixer_lr_scale_makes_scheduled_parameter_groups(tiny_run):
    scales = {"sliding_window": 5.0, "gdn": 0.5, "attention": 3.0}  # attention is frozen: no group of its own
    settings = {"steps": 6, "optimizer": {"lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 2, "min_lr_ratio": 0.1, "mixer_lr_scale": scales}}
    trainer = Trainer(parse_config(base_config(tiny_run, "lr_scale", **settings)), log=lambda *_: None)
    groups = trainer.optimizer.param_groups
    # (lr multiplier, decays) per group, unscaled first; every trainable parameter in exactly one group.
    assert [(g["lr_scale"], g["weight_decay"] == 0.0) for g in groups] == [
        (1.0, False), (1.0, True), (0.5, False), (0.5, True), (5.0, False), (5.0, True)
    ]
    assert sorted(name for g in groups for name in g["param_names"]) == sorted(name for name, _ in trainer.trainable)
    for group in groups:
        for name, parameter in zip(group["param_names"], group["params"], strict=True):
            assert parameter is dict(trainer.trainable)[name]
            mixer = name.split(".mixers.")[1].split(".")[0]
            assert group["lr_scale"] == {"sliding_window": 5.0, "gdn": 0.5}.get(mixer, 1.0), name
            assert (group["weight_decay"] == 0.0) == (parameter.ndim < 2), name
    # Warmup and cosine scale every group alike: at each step, group lr = schedule(step) * lr * multiplier.
    from fast_llm_supernet.training.trainer import cosine_schedule

    schedule = cosine_schedule(2, 6, 0.1)
    for step in range(6):
        for group in groups:
            assert group["lr"] == pytest.approx(schedule(step) * 2e-3 * group["lr_scale"], rel=1e-12)
        metrics, _ = trainer.train_step(step)
        assert metrics["lr"] == pytest.approx(schedule(step) * 2e-3, rel=1e-12)  # the base lr is logged
    # Resuming with other multipliers would silently keep the old ones: it fails instead.
    trainer.save_checkpoint(6, {})
    changed = {**settings, "optimizer": {**settings["optimizer"], "mixer_lr_scale": {"sliding_window": 2.0}}}
    with pytest.raises(ConfigError, match="mixer_lr_scale changed"):
        Trainer(parse_config(base_config(tiny_run, "lr_scale", **changed)), log=lambda *_: None).run()


def test_only_non_attention_mixers_train_and_export_loads(tiny_run):
    config = base_config(tiny_run, "export", steps=2, sampling={"predefined": ["gdn*"], "predefined_probabilities": [1.0]})
    trainer = Trainer(parse_config(config), log=lambda *_: None)
    names = [name for name, _ in trainer.trainable]
    assert names and all(".mixer.mixers." in name for name in names)
    assert not any(".mixers.attention." in name for name in names)
    assert any(".mixers.gdn." in name for name in names) and any(".mixers.kda." in name for name in names)
    before = SupernetForCausalLM.from_pretrained(tiny_run / "supernet")
    result = trainer.run()
    exported = SupernetForCausalLM.from_pretrained(result.export_path)
    presets = PresetsFile.load(result.export_path)
    assert {"all-attention", "all-swa", "all-gdn", "all-kda"} <= set(presets.presets)
    assert presets.presets["all-gdn"].metrics["kl_to_teacher"] == result.final_eval["eval/gdn*2/kl"]
    assert presets.presets["all-kda"].metrics["perplexity"] == result.final_eval["eval/kda*2/ppl"]
    assert presets.presets["all-gdn"].description  # kept from the input checkpoint
    assert placement_label(exported.resolve_placement("sliding_window*"), exported.spec) == "all-swa"
    mixed = exported.resolve_placement("gdn,kda")
    assert placement_label(mixed, exported.spec) == f"placement-{mixed.hash}"
    assert (result.export_path / "tokenizer.json").exists()
    x = torch.randint(0, 320, (1, 10))
    # Frozen parts are unchanged: all-attention is still the teacher.
    torch.testing.assert_close(exported(x, placement="attention*"), before(x, placement="attention*"))
    assert not torch.equal(exported(x, placement="gdn*"), before(x, placement="gdn*"))
    assert result.final_eval["eval/attention*2/kl"] < 1e-8


def test_sft_on_chat_data_runs(tiny_run):
    config = base_config(
        tiny_run,
        "sft",
        steps=2,
        **{
            "data.train": {"paths": [str(tiny_run / "chat.jsonl")], "format": "chat"},
            "data.sequence_length": 128,
            "loss": {"cross_entropy": 1.0, "forward_kl": 0.0, "reverse_kl": 0.0, "activation": 0.0},
            "model.train": "all",
            "sampling": {"predefined": ["gdn*", "attention,kda"], "predefined_probabilities": [0.5, 0.25]},
        },
    )
    result = Trainer(parse_config(config), log=lambda *_: None).run()
    records = [json.loads(line) for line in (tiny_run / "sft" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["cross_entropy"]) for r in train)
    assert "forward_kl" not in train[0]
    assert math.isfinite(result.final_eval["eval/kda*2/ppl"])


@pytest.fixture(scope="module")
def converted_tiny_teacher(tmp_path_factory) -> Path:
    """A small pre-trained Llama teacher (stdlib docstrings) converted into a four-mixer supernet."""
    from fast_llm_supernet.tools.convert import convert
    from fast_llm_supernet.tools.tiny_teacher import TinyTeacherConfig, make_tiny_teacher

    root = tmp_path_factory.mktemp("converted")
    teacher_config = TinyTeacherConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
        head_dim=32, steps=80, batch_size=8, sequence_length=64, corpus_files=12,
    )
    make_tiny_teacher(root / "teacher", teacher_config, log=None)
    convert(root / "teacher", root / "supernet", window_size=4)
    return root


@pytest.mark.slow
def test_short_distillation_lowers_kl_of_every_uniform_placement(tiny_run, converted_tiny_teacher):
    root = converted_tiny_teacher
    config = base_config(
        tiny_run,
        "distill",
        steps=60,
        **{
            "output_dir": str(root / "distill"),
            "model.checkpoint": str(root / "supernet"),
            "data.sequence_length": 64,
            "data.batch_size": 4,
            "optimizer": {"lr": 1e-3, "warmup_steps": 5},
            "loss": {"activation": 0.1},
            "eval.max_batches": 4,
            "checkpoint.every": 100,
        },
    )
    result = Trainer(parse_config(config), log=lambda *_: None).run()
    for placement in ["sliding_window*2", "gdn*2", "kda*2"]:
        before = result.initial_eval[f"eval/{placement}/kl"]
        after = result.final_eval[f"eval/{placement}/kl"]
        assert after < 0.7 * before, (placement, before, after)
    # Full attention is the teacher's own (frozen): it stays exactly on the teacher.
    assert result.final_eval["eval/attention*2/kl"] < 1e-6


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny_run, tmp_path):
    """A real kill (SIGKILL of the CLI process, possibly mid-checkpoint), then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def config_file(name: str) -> Path:
        config = base_config(tiny_run, name, steps=8, **{"checkpoint.every": 1})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    command = [sys.executable, "-m", "fast_llm_supernet.training.trainer", "--config"]
    subprocess.run([*command, str(config_file("sigkill_straight"))], check=True, capture_output=True)

    killed_config = config_file("sigkill")
    process = subprocess.Popen([*command, str(killed_config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tiny_run / "sigkill" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_00000003":
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tiny_run / "sigkill" / "summary.json").exists(), "the run finished before it could be killed"

    subprocess.run([*command, str(killed_config)], check=True, capture_output=True)
    straight = json.loads((tiny_run / "sigkill_straight" / "summary.json").read_text())
    resumed = json.loads((tiny_run / "sigkill" / "summary.json").read_text())
    assert resumed["final_eval"] == straight["final_eval"]
    assert resumed["initial_eval"] == straight["initial_eval"]
    exported = [SupernetForCausalLM.from_pretrained(tiny_run / run / "export") for run in ("sigkill", "sigkill_straight")]
    for (name, a), (_, b) in zip(exported[0].state_dict().items(), exported[1].state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_gradient_accumulation_matches_the_full_batch(tiny_run):
    def one_step(output: str, **settings) -> dict[str, torch.Tensor]:
        """The gradients of step 0 (the first Adam update is about lr * sign(grad): too weak a check)."""
        config = base_config(tiny_run, output, steps=1, **{"optimizer.grad_clip": 0.0, **settings})
        trainer = Trainer(parse_config(config), log=lambda *_: None)
        trainer.train_step(0)
        return {name: p.grad.clone() for name, p in trainer.trainable if p.grad is not None}

    full = one_step("accumulate_full", **{"data.batch_size": 2})
    accumulated = one_step("accumulate_two", **{"data.batch_size": 1, "data.gradient_accumulation": 2})
    assert full and set(full) == set(accumulated)
    for name, tensor in full.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ---- layer-local stage ------------------------------------------------------------------------------------


def test_layer_local_objective_refuses_logit_losses(tiny_run):
    config = base_config(tiny_run, "ll", objective="layer_local")  # default loss has KL terms
    with pytest.raises(ConfigError, match="objective 'layer_local' trains on activation matching only"):
        parse_config(config)


def test_layer_local_gradients_are_each_mixers_own_distance(tiny_run):
    """One layer-local step's gradients equal autograd of sum over (layer, mixer) of the mixer's distance to
    the teacher attention on the teacher's own layer input; attention, MLPs and norms get none."""
    from fast_llm_supernet.training.layer_local import layer_local_backward, teacher_mixer_io
    from fast_llm_supernet.training.loss import DistillLossConfig
    from fast_llm_supernet.training.trainer import select_trainable_parameters

    student = SupernetForCausalLM.from_pretrained(tiny_run / "supernet")
    teacher = SupernetForCausalLM.from_pretrained(tiny_run / "supernet").requires_grad_(False)
    trainable = select_trainable_parameters(student, "mixers", ["attention"])
    assert {name for _, name in trainable} == {"sliding_window", "gdn", "kda"}
    placement = teacher.resolve_placement("attention*")
    input_ids = torch.randint(0, 320, (2, 12))
    loss_config = DistillLossConfig(**ACTIVATION_ONLY_LOSS)
    output = layer_local_backward(student, teacher, placement, input_ids, None, trainable, loss_config)
    got = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    assert got and all(".mixers.attention." not in name and "mlp" not in name for name in got)

    student.zero_grad()
    io = teacher_mixer_io(teacher, placement, input_ids)
    expected = sum(
        (student.model.decoder.blocks[layer].get_mixer(name)(io[layer][0]) - io[layer][1]).pow(2).mean()
        for layer, name in sorted(trainable)
    ) / len(trainable)
    expected.backward()
    assert output.total.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, parameter in student.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(got[name], parameter.grad, rtol=1e-4, atol=1e-7)


def _layer_local_run(tiny_run):
    """The tiny supernet as student and teacher, its trainable linear mixers, the teacher placement, 2 x 70 tokens
    (two chunks: the per-chunk loop runs) and the activation-only loss: `layer_local_backward`'s arguments."""
    from fast_llm_supernet.training.loss import DistillLossConfig
    from fast_llm_supernet.training.trainer import select_trainable_parameters

    student = SupernetForCausalLM.from_pretrained(tiny_run / "supernet")
    teacher = SupernetForCausalLM.from_pretrained(tiny_run / "supernet").requires_grad_(False)
    trainable = select_trainable_parameters(student, "mixers", ["attention"])
    placement = teacher.resolve_placement("attention*")
    input_ids = torch.randint(0, 320, (2, 70))
    loss_config = DistillLossConfig(**ACTIVATION_ONLY_LOSS)
    return student, teacher, placement, input_ids, trainable, loss_config


def test_layer_local_mixers_on_cpu_workers_equal_one_after_another(tiny_run):
    """Two workers (one mixer per thread, one intra-op thread each) give the serial path's loss, metrics and
    gradients, within float32 rounding; torch's thread count is restored after."""
    from fast_llm_supernet.training.layer_local import layer_local_backward

    student, teacher, placement, input_ids, trainable, loss_config = _layer_local_run(tiny_run)
    threads = torch.get_num_threads()
    runs = []
    for workers in (1, 2):
        student.zero_grad(set_to_none=True)
        output = layer_local_backward(student, teacher, placement, input_ids, None, trainable, loss_config,
                                      workers=workers)
        assert torch.get_num_threads() == threads
        runs.append((output.metrics, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (serial_metrics, serial_grads), (parallel_metrics, parallel_grads) = runs
    assert serial_metrics.keys() == parallel_metrics.keys()
    for name, value in serial_metrics.items():
        assert parallel_metrics[name] == pytest.approx(value, rel=1e-5)
    assert serial_grads.keys() == parallel_grads.keys()
    for name, grad in serial_grads.items():
        torch.testing.assert_close(parallel_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_layer_local_bf16_mixers_give_the_float32_loss_and_gradients_within_bf16_rounding(tiny_run):
    """`bf16=True` (the `cpu_bf16` config field) runs the student mixers' matmuls in bf16 on one and on two
    workers: the loss and every gradient stay float32 and within bf16 rounding of the float32 step's."""
    from fast_llm_supernet.training.layer_local import layer_local_backward

    student, teacher, placement, input_ids, trainable, loss_config = _layer_local_run(tiny_run)

    def step(bf16: bool, workers: int):
        student.zero_grad(set_to_none=True)
        output = layer_local_backward(student, teacher, placement, input_ids, None, trainable, loss_config,
                                      workers=workers, bf16=bf16)
        return output.total.item(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    loss, grads = step(bf16=False, workers=1)
    for workers in (1, 2):
        bf16_loss, bf16_grads = step(bf16=True, workers=workers)
        assert bf16_loss != loss  # the matmuls did run in bf16
        assert bf16_loss == pytest.approx(loss, rel=0.03)
        assert bf16_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert bf16_grads[name].dtype == torch.float32
            cosine = torch.nn.functional.cosine_similarity(bf16_grads[name].flatten(), grad.flatten(), dim=0)
            assert cosine > 0.98, (name, cosine.item())


def test_cpu_bf16_is_refused_outside_the_layer_local_objective(tiny_run):
    with pytest.raises(ConfigError, match="cpu_bf16 applies to objective 'layer_local' only"):
        parse_config(base_config(tiny_run, "bf16_e2e", cpu_bf16=True))


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_warns_where_the_cpu_has_no_native_bf16(tiny_run, monkeypatch, native):
    """On a CPU without native bf16 matmuls (AVX2 only) bf16 autocast makes the step slower: the trainer says so
    once, before any step, naming the fix; where bf16 is native it says nothing."""
    from fast_llm_supernet.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_bf16_is_native", lambda: native)
    config = parse_config(base_config(tiny_run, "bf16_warning", objective="layer_local", cpu_bf16=True,
                                      loss=ACTIVATION_ONLY_LOSS))
    lines = []
    trainer = Trainer(config, log=lines.append)
    assert trainer.layer_local_cpu_bf16  # a warning, not a refusal: the run is right, only slower
    warnings = [line for line in lines if "cpu_bf16" in line]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "no native bf16" in warnings[0] and "set cpu_bf16: false" in warnings[0]


@pytest.mark.slow
def test_layer_local_stage_lowers_kl_and_resumes(tiny_run, converted_tiny_teacher):
    """Layer-local training alone moves every linear mixer towards the teacher (held-out KL falls), and a run
    stopped mid-way resumes to the same weights as one that was not."""
    root = converted_tiny_teacher
    overrides = {
        "objective": "layer_local",
        "model.checkpoint": str(root / "supernet"),
        "data.sequence_length": 64,
        "data.batch_size": 4,
        "optimizer": {"lr": 3e-3, "warmup_steps": 3},
        "loss": ACTIVATION_ONLY_LOSS,
        "eval.max_batches": 4,
        "checkpoint.every": 10,
    }
    result = Trainer(parse_config(base_config(tiny_run, "ll_full", steps=40, **overrides)), log=lambda *_: None).run()
    for placement in ["gdn*2", "kda*2"]:
        before, after = result.initial_eval[f"eval/{placement}/kl"], result.final_eval[f"eval/{placement}/kl"]
        assert after < 0.7 * before, (placement, before, after)
    assert result.final_eval["eval/attention*2/kl"] < 1e-6

    config = parse_config(base_config(tiny_run, "ll_resumed", steps=40, **overrides))
    assert Trainer(config, log=lambda *_: None).run(stop_after_steps=25).stopped_early
    resumed = Trainer(config, log=lambda *_: None)
    resumed.run()
    uninterrupted = SupernetForCausalLM.from_pretrained(result.export_path)
    for name, tensor in SupernetForCausalLM.from_pretrained(config.export_path).state_dict().items():
        torch.testing.assert_close(tensor, uninterrupted.state_dict()[name], rtol=0, atol=0)
