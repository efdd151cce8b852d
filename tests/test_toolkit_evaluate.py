"""`supernet-place evaluate` / `quality`: per-placement quality against the teacher on held-out text."""

import json

import pytest
import torch
import torch.nn.functional as F

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.toolkit.cli import main
from fast_llm_supernet.toolkit.evaluate import Sharing, evaluate_placements, load_held_out
from fast_llm_supernet.toolkit.quality import named_placements, spread_layers
from fast_llm_supernet.toolkit.sampling import sample_placements
from fast_llm_supernet.toolkit.store import read_evaluations
from fast_llm_supernet.tools.convert import default_presets
from fast_llm_supernet.tools.tiny_teacher import train_tokenizer
from shared_spec import Apriel2TextConfig, MixerKind
from tests.test_training_trainer import TINY_SUPERNET, stdlib_paragraphs

THREE_LAYERS = {**TINY_SUPERNET, "decoder": {**TINY_SUPERNET["decoder"], "num_blocks": 3}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("toolkit")
    documents = stdlib_paragraphs()
    tokenizer = train_tokenizer(documents, vocab_size=320)
    torch.manual_seed(0)
    model = SupernetForCausalLM(Apriel2TextConfig.model_validate(THREE_LAYERS))
    model.save_pretrained(root / "supernet", presets=default_presets(model.spec))
    tokenizer.save_pretrained(root / "supernet")
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:40]))
    return root


def test_quality_matches_a_direct_computation_and_sharing_changes_nothing(tiny):
    model = SupernetForCausalLM.from_pretrained(tiny / "supernet")
    held_out = load_held_out([tiny / "heldout.jsonl"], tiny / "supernet", 32, 32 * 6, batch_size=4)
    placements = [model.resolve_placement(p) for p in ("attention*", "gdn*", "gdn,gdn,kda", "gdn,kda*", "sliding_window*")]
    sharing = Sharing()
    records = evaluate_placements(model, placements, held_out, sharing=sharing, progress=False)
    assert records[0].top1 == 1.0 and records[0].kl == 0.0 and records[0].attention_layers == 3
    assert sharing.computed < sharing.without_sharing  # gdn* and gdn,gdn,kda share two layers, ...
    rows = held_out.data.rows(torch.arange(held_out.data.num_rows))
    with torch.no_grad():
        teacher = F.log_softmax(model(rows["input_ids"], placement="attention*"), -1)
        for placement, record in zip(placements, records, strict=True):
            student = F.log_softmax(model(rows["input_ids"], placement=placement), -1)
            kl = (teacher.exp() * (teacher - student)).sum(-1).mean().item()
            top1 = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
            nll = -student.gather(-1, rows["labels"].unsqueeze(-1)).mean().item()
            assert record.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
            assert record.top1 == pytest.approx(top1, abs=1e-9)
            assert record.ppl == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
            assert record.tokens == 6 * 32 and record.top1_se >= 0


def test_sampling_is_seeded_distinct_and_stratified_covers_attention_counts(tiny):
    spec = SupernetForCausalLM.from_pretrained(tiny / "supernet").spec
    uniform = sample_placements(spec, 20, "uniform", seed=3)
    assert uniform == sample_placements(spec, 20, "uniform", seed=3)
    assert len({p.canonical for p in uniform}) == 20
    stratified = sample_placements(spec, 16, "stratified", seed=0)
    counts = {sum(k == MixerKind.ATTENTION for k in p.kinds(spec)) for p in stratified}
    assert counts == {0, 1, 2, 3}


def test_named_placements_and_spread_layers(tiny):
    assert spread_layers(30, 8) == [1, 5, 9, 13, 16, 20, 24, 28]
    assert spread_layers(30, 4) == [3, 11, 18, 26]
    spec = SupernetForCausalLM.from_pretrained(tiny / "supernet").spec
    named = named_placements(spec)
    assert named["attention in even layers, GDN in odd"].canonical == "attention,gdn,attention"
    assert named["all-SWA"].canonical == "sliding_window*3"


def test_evaluate_cli_appends_and_resumes(tiny, capsys):
    output = tiny / "evals.jsonl"
    args = ["evaluate", "--checkpoint", str(tiny / "supernet"), "--data", str(tiny / "heldout.jsonl"),
            "--sequence-length", "32", "--max-tokens", "64", "--output", str(output), "--threads", "1"]
    assert main([*args, "--sample", "uniform", "--count", "5", "--chunk", "2"]) == 0
    first = read_evaluations(output)
    assert len(first) == 5 and all(r.tokens == 64 for r in first)
    assert main([*args, "--sample", "uniform", "--count", "7", "--chunk", "2"]) == 0  # the first 5 are reused
    assert "5 already in" in capsys.readouterr().err
    records = read_evaluations(output)
    assert len(records) == 7 and len({r.placement for r in records}) == 7
    with output.open("a") as handle:  # a run killed mid-line leaves a partial record: ignored
        handle.write('{"placement": "gd')
    assert len(read_evaluations(output)) == 7
    assert main([*args, "--sample", "uniform", "--count", "8", "--chunk", "2"]) == 0  # ... and replaced on resume
    assert len(read_evaluations(output)) == 8 and output.read_text().count("\n") == 8
    (tiny / "list.txt").write_text("gdn*\nmamba*\n")
    with pytest.raises(SystemExit):
        main([*args, "--placements", str(tiny / "list.txt")])
    assert "'mamba'" in capsys.readouterr().err


def test_quality_cli_writes_table_and_answers(tiny):
    (tiny / "prompts.json").write_text(json.dumps(["Hello?"]))
    assert main(["quality", "--checkpoint", str(tiny / "supernet"), "--data", str(tiny / "heldout.jsonl"),
                 "--sequence-length", "32", "--max-tokens", "64", "--output", str(tiny / "quality"),
                 "--prompts", str(tiny / "prompts.json"), "--max-new-tokens", "4"]) == 0
    rows = json.loads((tiny / "quality" / "quality.json").read_text())
    assert [row["label"] for row in rows][:4] == ["all-attention", "all-SWA", "all-GDN", "all-KDA"]
    assert all(set(row["answers"]) == {"Hello?"} for row in rows)
    assert rows[0]["chat"]["exact"] == 1.0 and rows[0]["chat"]["logprob"] == rows[0]["chat"]["teacher_logprob"]
    assert "| all-attention | 1.000" in (tiny / "quality" / "quality.md").read_text()


def test_stability_ranks_placements_of_two_checkpoints(tiny, tmp_path, capsys):
    from fast_llm_supernet.toolkit.evaluate import PlacementQuality
    from fast_llm_supernet.toolkit.store import append_evaluations

    def record(placement: str, top1: float) -> PlacementQuality:
        return PlacementQuality(placement=placement, hash="0" * 12, top1=top1, top1_se=0, kl=1 - top1, kl_se=0,
                                ppl=1, tokens=64, attention_layers=0)

    names = ["gdn*", "kda*", "sliding_window*", "gdn,kda*", "attention*"]
    append_evaluations(tmp_path / "mid.jsonl", [record(n, q) for n, q in zip(names, [0.1, 0.2, 0.3, 0.4, 1.0], strict=True)])
    append_evaluations(tmp_path / "final.jsonl", [record(n, q) for n, q in zip(names, [0.5, 0.4, 0.6, 0.7, 1.0], strict=True)])
    assert main(["stability", "--evaluations", str(tmp_path / "mid.jsonl"), str(tmp_path / "final.jsonl")]) == 0
    assert "5 placements in both: Spearman 0.900, Kendall 0.800" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["stability", "--evaluations", str(tmp_path / "mid.jsonl"), str(tmp_path / "missing.jsonl")])
