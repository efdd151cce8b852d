"""Write the tiny example's data from text that ships with Python (no download).

    python examples/make_tiny_data.py --output runs/tiny/data

* `text.jsonl`: one `{"text": ...}` per docstring of the stdlib modules in `fast_llm_supernet.training.corpus`
  (the tiny teacher's own pre-training text), for stochastic distillation. The trainer holds out every
  20th document for evaluation.
* `chat.jsonl`: one conversation per documented stdlib function or class,
  `{"messages": [{"role": "user", "content": "What does `textwrap.dedent` do?"},
                 {"role": "assistant", "content": <first paragraph of its docstring>}]}`, for SFT.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path

from fast_llm_supernet.training.corpus import STDLIB_FILES, stdlib_documents


def chat_examples(max_answer_chars: int = 400) -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    examples = []
    for relative in STDLIB_FILES:
        path = stdlib / relative
        if not path.is_file() or relative == "this.py":
            continue
        module = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # top-level public functions and classes
            if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < 40:
                continue
            answer = doc.split("\n\n")[0].replace("\n", " ")[:max_answer_chars]
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            question = f"What does the {kind} `{module}.{node.name}` do?"
            examples.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return examples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory for text.jsonl and chat.jsonl")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    documents = stdlib_documents()
    with (output / "text.jsonl").open("w") as handle:
        for document in documents:
            handle.write(json.dumps({"text": document}) + "\n")
    chats = chat_examples()
    with (output / "chat.jsonl").open("w") as handle:
        for example in chats:
            handle.write(json.dumps(example) + "\n")
    print(f"wrote {len(documents)} documents to {output / 'text.jsonl'} and {len(chats)} chats to {output / 'chat.jsonl'}")


if __name__ == "__main__":
    main()
