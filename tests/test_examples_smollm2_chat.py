"""The real-teacher run's new stages, cut down to the tiny teacher: the teacher's chat data, and targeted SFT on it
(examples/smollm2/make_chat_data.py and sft.yaml)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.toolkit.quality import named_placements
from fast_llm_supernet.training.config import load_config
from fast_llm_supernet.training.data import load_tokenizer, pack_conversations, read_conversations
from fast_llm_supernet.training.loss import token_cross_entropy
from fast_llm_supernet.training.teacher_text import AnswerSettings
from fast_llm_supernet.training.trainer import Trainer
from shared_spec import Apriel2TextConfig, Placement, SupernetSpec
from tests.test_training_teacher_text import tiny_teacher  # noqa: F401  (fixture)
from tests.test_training_trainer import TINY_SUPERNET

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "smollm2"
SMALL = {"sampled_settings": AnswerSettings(temperature=0.7, top_p=0.95, max_new_tokens=16, batch_size=8),
         "greedy_settings": AnswerSettings(max_new_tokens=12, batch_size=8), "log": lambda *_: None}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"smollm2_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chat_data(tiny_teacher, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("chat_data")
    mix = load_script("make_chat_data").make_chat_data(tiny_teacher, output, 12, 32, 4, **SMALL)
    return output, mix


def prompts_of(path: Path) -> list[str]:
    return [conversation.messages[0]["content"] for conversation in read_conversations([path])]


def test_chat_data_is_reproducible_and_keeps_held_out_prompts_out_of_sft(tiny_teacher, chat_data, tmp_path):  # noqa: F811
    output, mix = chat_data
    assert mix["teacher_text_conversations"] == 12 and mix["teacher_text_tokens"] > 12 * 16
    texts = [json.loads(line)["text"] for line in (output / "teacher_text.jsonl").read_text().splitlines()]
    assert len(texts) == 12 and all("### User:\n" in t and "### Assistant:\n" in t for t in texts)  # the chat template
    # Seeded: another run writes the same text.
    again = load_script("make_chat_data").make_chat_data(tiny_teacher, tmp_path, 12, 32, 4, **SMALL)
    assert (tmp_path / "teacher_text.jsonl").read_text() == (output / "teacher_text.jsonl").read_text()
    assert again["teacher_text_tokens"] == mix["teacher_text_tokens"]
    # The held-out prompts (chat evaluation, SFT's held-out loss) are not in the SFT training data.
    evaluation = [p["text"] for p in json.loads((output / "chat_eval.json").read_text())]
    sft_train = prompts_of(output / "sft_train.jsonl")
    assert len(sft_train) == 32 and len(evaluation) == 18 + 4
    assert not set(sft_train) & set(evaluation) and not set(sft_train) & set(prompts_of(output / "sft_heldout.jsonl"))
    assert not set(sft_train) & {json.loads(line)["prompt"] for line in (output / "answers_sampled.jsonl").open()}


def answer_loss(checkpoint: Path, rows: dict, placement: str) -> float:
    model = SupernetForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        logits = model(rows["input_ids"], placement=placement)
    return token_cross_entropy(logits, rows["labels"])[rows["loss_mask"]].mean().item()


def test_sft_stage_masks_prompt_tokens_and_lowers_the_answer_loss(tiny_teacher, chat_data, tmp_path):  # noqa: F811
    output, _ = chat_data
    overrides = [
        f"output_dir={tmp_path / 'sft'}", f"model.checkpoint={tiny_teacher}", f"teacher.checkpoint={tiny_teacher}",
        f"data.train.paths=[{output / 'sft_train.jsonl'}]", f"data.eval.paths=[{output / 'sft_heldout.jsonl'}]",
        "sampling.predefined=[]", "sampling.predefined_probabilities=[]", f"export.path={tmp_path / 'sft_final'}",
        "steps=12", "threads=1", "data.sequence_length=128", "data.batch_size=4", "optimizer.lr=3e-3",
        "optimizer.warmup_steps=2", "progress_bar=false", "tensorboard=false", "checkpoint.every=6", "log_every=6",
    ]
    config = load_config(EXAMPLES / "sft.yaml", overrides)
    tokenizer = load_tokenizer(tiny_teacher)
    # The tiny teacher never stops within its 12-token budget: every answer is cut (`finished: false`); one marked
    # finished here shows both kinds packed together.
    records = [json.loads(line) for line in (output / "sft_train.jsonl").read_text().splitlines()]
    assert not any(record["finished"] for record in records)
    mixed = tmp_path / "sft_mixed.jsonl"
    mixed.write_text("".join(json.dumps({**r, "finished": i == 0}) + "\n" for i, r in enumerate(records)))
    conversations = read_conversations([mixed])
    data = pack_conversations(tokenizer, conversations, 128)
    rows = data.rows(torch.arange(data.num_rows))
    # Loss only on the answers, with the end-of-turn token where the teacher stopped (not where the budget cut).
    expected = [c.messages[1]["content"] + (tokenizer.eos_token if c.finished else "") for c in conversations]
    targets = tokenizer.decode(rows["labels"][rows["loss_mask"]].tolist())
    assert targets == "".join(expected) and targets.count(tokenizer.eos_token) == 1
    before = answer_loss(tiny_teacher, rows, "gdn*")
    result = Trainer(config, log=lambda *_: None).run()
    assert result.step == 12 and not result.stopped_early
    assert answer_loss(config.export_path, rows, "gdn*") < before - 0.05
    # Attention stays frozen: all-attention is still the teacher.
    assert answer_loss(config.export_path, rows, "attention*") == pytest.approx(answer_loss(tiny_teacher, rows, "attention*"))


def smollm2_shaped_spec() -> SupernetSpec:
    """The tiny supernet's mixers over SmolLM2's 30 layers: what the recipes' placements are parsed against."""
    config = {**TINY_SUPERNET, "decoder": {**TINY_SUPERNET["decoder"], "num_blocks": 30}}
    return SupernetSpec.from_config(Apriel2TextConfig.model_validate(config))


@pytest.mark.parametrize("example", ["distill.yaml", "sft.yaml"])
def test_recipe_placements_are_smollm2_placements(example):
    """The recipes' targeted placements name SmolLM2's 30 layers (the trainer's config test checks the rest of
    each recipe on a tiny checkpoint)."""
    spec = smollm2_shaped_spec()
    sampling = yaml.safe_load((EXAMPLES / example).read_text())["sampling"]
    assert len(sampling["predefined"]) == len(sampling["predefined_probabilities"])
    for placement in sampling["predefined"]:
        assert len(Placement.parse(placement, spec).mixers) == 30


def test_sft_config_trains_the_served_placements():
    """sft.yaml's targeted placements: the quality table's (all-attention aside) and the presets `supernet-place`
    picked on the frontier (those measured for speed) of the previous run (results/place/presets.json), for
    SmolLM2's 30 layers. Rerunning place.sh changes the presets: sft.yaml's list follows them."""
    spec = smollm2_shaped_spec()
    predefined = yaml.safe_load((EXAMPLES / "sft.yaml").read_text())["sampling"]["predefined"]
    parsed = [Placement.parse(p, spec).canonical for p in predefined]
    table = [p.canonical for label, p in named_placements(spec).items() if label != "all-attention"]
    presets = json.loads((EXAMPLES / "results" / "place" / "presets.json").read_text())["presets"]
    picked = [Placement.parse(preset["placement"], spec).canonical
              for preset in presets.values() if "speedup" in preset["metrics"]]
    assert len(picked) >= 3 and parsed == table + picked


def test_out_of_domain_table_gives_each_placement_its_gap(tiny_teacher, tmp_path):  # noqa: F811
    """run.py's stage 11 on the tiny teacher: top-1 on the held-out text and on Python's LICENSE.txt, per
    placement and stage, and the gap between them."""
    run = load_script("run")
    if run.outside_text() is None:
        pytest.skip("this Python's standard library has no LICENSE.txt")
    held_out = [{"label": label, "top1": 0.9} for label in named_placements(
        SupernetForCausalLM.from_pretrained(tiny_teacher).spec)]
    table = run.outside_domain({"conversion": tiny_teacher}, {"conversion": held_out}, tmp_path)
    outside = json.loads((tmp_path / "outside_conversion" / "quality.json").read_text())
    assert outside[0]["label"] == "all-attention" and outside[0]["top1"] == 1.0  # the teacher itself
    assert "| all-attention | 0.900 / 1.000 / -0.100 |" in table
    assert len(table.splitlines()) == 4 + len(held_out)
