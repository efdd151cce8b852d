"""Chat prompts made from what ships with Python: varied, deterministic, split by subject."""

from collections import Counter

from fast_llm_supernet.training.chat_prompts import (
    FACTUAL_PROMPTS,
    SOURCES,
    build_prompts,
    evaluation_prompts,
    topic_titles,
)


def test_prompts_are_deterministic_varied_and_split_by_subject():
    train, held_out = build_prompts(seed=0)
    assert (train, held_out) == build_prompts(seed=0)
    assert len(train) > 1500 and 150 < len(held_out) < len(train) / 4
    # Every source in any prefix: the first few hundred prompts are a mix.
    assert set(Counter(p.source for p in train[:50])) == set(SOURCES)
    # Forms vary within a source: several task templates are drawn.
    assert len({p.text.replace(p.subject, "{}") for p in train if p.source == "things"}) >= 5
    # No held-out subject is named by a training prompt, and no factual answer is a training subject.
    assert not {(p.source, p.subject) for p in train} & {(p.source, p.subject) for p in held_out}
    reserved = {k.casefold() for p in FACTUAL_PROMPTS for k in p.keywords}
    assert not {p.subject.casefold() for p in train} & reserved
    # Language-reference topics are held out as make_data.py holds out their text: every 8th topic.
    held_out_topics = {title for index, (_, title) in enumerate(topic_titles()) if index % 8 == 0}
    assert {p.subject for p in held_out if p.source == "topics"} == held_out_topics


def test_evaluation_prompts_are_the_factual_questions_and_held_out_prompts():
    prompts = evaluation_prompts(count=10)
    assert prompts[: len(FACTUAL_PROMPTS)] == list(FACTUAL_PROMPTS) and len(prompts) == len(FACTUAL_PROMPTS) + 10
    assert 12 <= len(FACTUAL_PROMPTS) <= 20 and all(p.keywords for p in FACTUAL_PROMPTS)
    _, held_out = build_prompts()
    assert prompts[len(FACTUAL_PROMPTS) :] == held_out[:10]
