"""The real-teacher run's text: Python's language reference split by topic, held-out text never trained on."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "smollm2" / "make_data.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_smollm2_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_topics_stay_out_of_training(tmp_path):
    module = load_script()
    train, held_out = module.split_topics(8)
    assert len(held_out) >= 8 and sum(map(len, held_out)) > 20_000  # enough for >= 2k tokens per placement
    training_text = "\n\n".join(train)
    for text in held_out:
        for paragraph in text.split("\n\n"):
            if len(paragraph) > 80:
                assert paragraph not in training_text, paragraph[:80]
    module.main(["--output", str(tmp_path)])
    assert (tmp_path / "train.jsonl").stat().st_size > 500_000 and (tmp_path / "heldout.jsonl").exists()
