"""Chat agreement with the teacher: its metrics on constructed cases, with the real tiny model."""

import pytest
import torch

from fast_llm_supernet.toolkit.chat_eval import (
    answer_logprob,
    chat_agreement,
    first_sentence,
    holds_keyword,
    reference_answers,
)
from fast_llm_supernet.training.chat_prompts import ChatPrompt, build_prompts
from shared_spec import PresetsFile
from shared_spec.presets import CHAT_FIRST_SENTENCE_METRIC
from tests.test_training_teacher_text import load, tiny_teacher  # noqa: F401  (fixture)


def test_first_sentence_and_keywords():
    assert first_sentence("The capital of France is Paris. It is big.") == "the capital of france is paris"
    assert first_sentence("The capital of France is Paris") == first_sentence("the capital  of France is Paris!")
    assert first_sentence("Version 3.12 is out\nMore text.") == "version 3.12 is out"  # a decimal point ends nothing
    assert first_sentence("") == ""
    assert holds_keyword("It is Tokyo.", ("tokyo",)) and not holds_keyword("Kyoto", ("Tokyo",))
    assert holds_keyword("There are 7 days.", ("seven", "7")) and not holds_keyword("There are 17.", ("7",))


def test_the_teacher_itself_agrees_fully_and_its_likelihood_is_the_teachers(tiny_teacher):  # noqa: F811
    teacher, tokenizer, _ = load(tiny_teacher)
    model, _, _ = load(tiny_teacher)  # another model object with the teacher's weights: everything is recomputed
    prompts = build_prompts()[1][:6]
    reference = reference_answers(teacher, tokenizer, prompts, max_new_tokens=10, batch_size=4)
    # A factual prompt whose keyword is the teacher's own first word: the teacher "answers it right".
    first_word = reference.texts[0].split()[0] if reference.texts[0].split() else "x"
    prompts = [prompts[0].model_copy(update={"keywords": (first_word,)}), *prompts[1:]]
    reference = reference_answers(teacher, tokenizer, prompts, max_new_tokens=10, batch_size=4)
    same, answers = chat_agreement(model, tokenizer, model.resolve_placement("attention*"), reference)
    assert (same.exact, same.first_sentence, same.factual, same.factual_right, same.factual_teacher_right) == (1.0, 1.0, 1.0, 1, 1)
    assert answers == reference.texts and same.prompts == 6
    assert same.logprob == pytest.approx(same.teacher_logprob, abs=1e-6)

    other, answers = chat_agreement(model, tokenizer, model.resolve_placement("gdn*"), reference)
    assert other.exact == sum(a == t for a, t in zip(answers, reference.texts, strict=True)) / 6
    assert other.teacher_logprob == same.teacher_logprob and other.logprob < other.teacher_logprob


def test_answer_logprob_is_the_mean_log_probability_of_the_answer_tokens(tiny_teacher):  # noqa: F811
    model, tokenizer, placement = load(tiny_teacher)
    reference = reference_answers(model, tokenizer, [ChatPrompt(text="Hello?"), ChatPrompt(text="Why?")], 6)
    gdn = model.resolve_placement("gdn*")
    expected, count = 0.0, 0
    for ids, answer in zip(reference.prompt_ids, reference.answers, strict=True):
        tokens = ids + answer.ids + ([tokenizer.eos_token_id] if answer.finished else [])
        with torch.no_grad():
            log_probs = model(torch.tensor([tokens]), placement=gdn)[0].log_softmax(-1)
        for position in range(len(ids), len(tokens)):
            expected += log_probs[position - 1, tokens[position]].item()
            count += 1
    got = answer_logprob(model, gdn, reference.prompt_ids, reference.answers, tokenizer.eos_token_id)
    assert got == pytest.approx(expected / count, abs=1e-5)


def test_a_presets_file_can_match_service_levels_on_chat_agreement():
    presets = PresetsFile.model_validate({"quality_metric": CHAT_FIRST_SENTENCE_METRIC, "presets": {
        "a": {"placement": "gdn*", "metrics": {"quality": 0.9, "chat_first_sentence": 0.5, "speedup": 2.0}},
        "b": {"placement": "kda*", "metrics": {"quality": 0.7, "chat_first_sentence": 0.8, "speedup": 1.5}},
    }})
    assert presets.choose(["a", "b"], min_quality=0.6, min_speedup=None) == "b"
    assert PresetsFile.model_validate({**presets.model_dump(), "quality_metric": "quality"}).choose(
        ["a", "b"], min_quality=0.6, min_speedup=None) == "a"
    with pytest.raises(ValueError, match="quality_metric"):  # a metric that is not a [0, 1] agreement
        PresetsFile.model_validate({**presets.model_dump(), "quality_metric": "chat_logprob"})
