"""Write the real-teacher run's text from what ships with Python (no download).

    python examples/smollm2/make_data.py --output runs/smollm2/data [--held-out-every 8]

* `heldout.jsonl`: every 8th topic of Python's language reference (`pydoc_data.topics`, sorted by topic
  name), one `{"text": ...}` each: the held-out text of every evaluation (KL, perplexity, top-1 agreement).
* `train.jsonl`: the other topics, then the stdlib docstrings of `fast_llm_supernet.training.corpus`.
  No held-out topic's text is in it (the docstrings are another source; the test checks no held-out
  paragraph appears in training).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fast_llm_supernet.training.corpus import pydoc_topics, stdlib_documents


def split_topics(held_out_every: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts)."""
    topics = pydoc_topics()
    held_out = [text for index, (_, text) in enumerate(topics) if index % held_out_every == 0]
    train = [text for index, (_, text) in enumerate(topics) if index % held_out_every != 0]
    held_out_paragraphs = {p for text in held_out for p in text.split("\n\n") if len(p) > 80}
    # The same paragraph can sit in two topics (shared grammar snippets): keep it out of training too.
    train = ["\n\n".join(p for p in text.split("\n\n") if p not in held_out_paragraphs) for text in train]
    return [text for text in train if text] + stdlib_documents(), held_out


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--held-out-every", type=int, default=8)
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    train, held_out = split_topics(args.held_out_every)
    write_jsonl(output / "train.jsonl", train)
    write_jsonl(output / "heldout.jsonl", held_out)
    print(
        f"wrote {len(train)} training documents ({sum(map(len, train))} characters) and {len(held_out)} held-out "
        f"topics ({sum(map(len, held_out))} characters) to {output}"
    )


if __name__ == "__main__":
    main()
