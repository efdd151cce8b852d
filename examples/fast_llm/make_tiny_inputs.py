"""Inputs of the tiny CPU Fast-LLM example, from text that ships with Python (no download).

    python examples/fast_llm/make_tiny_inputs.py [--root /tmp/supernet_fast_llm_tiny] [--teacher-steps N]

writes under ROOT:
  teacher/     a tiny Llama teacher + tokenizer (`supernet-make-tiny-teacher`), pre-trained on stdlib docstrings
  student/     the teacher converted into a four-mixer Apriel2 supernet (`supernet-convert`)
  text.jsonl   the stdlib docstrings, one {"text": ...} per line, for `fast-llm prepare`
Then (see docs/fast_llm.md):
  fast-llm prepare gpt_memmap --config examples/fast_llm/prepare_tiny.yaml
  fast-llm train supernet --config examples/fast_llm/tiny_cpu.yaml
"""

import argparse
import json
from pathlib import Path

from fast_llm_supernet.tools.convert import convert
from fast_llm_supernet.tools.tiny_teacher import TinyTeacherConfig, make_tiny_teacher
from fast_llm_supernet.training.corpus import stdlib_documents

# Must match examples/fast_llm/tiny_cpu.yaml (its `data.maximum_document_length` is 128).
WINDOW_SIZE = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/supernet_fast_llm_tiny"))
    parser.add_argument("--teacher-steps", type=int, default=TinyTeacherConfig.steps)
    args = parser.parse_args()
    root: Path = args.root
    root.mkdir(parents=True, exist_ok=True)

    if not (root / "teacher" / "config.json").exists():
        # At least 2 KV heads, stated here because it matters: upstream Fast-LLM cannot build a GDN mixer
        # with a single key head and several value heads.
        teacher = TinyTeacherConfig(num_heads=4, num_kv_heads=2, steps=args.teacher_steps)
        summary = make_tiny_teacher(root / "teacher", teacher)
        print(f"teacher: {summary['parameters']:,} parameters, held-out loss {summary['held_out_loss']:.3f}")
    convert(root / "teacher", root / "student", window_size=WINDOW_SIZE)
    print(f"student: {root / 'student'}")

    documents = stdlib_documents()
    with open(root / "text.jsonl", "w") as file:
        for document in documents:
            file.write(json.dumps({"text": document}) + "\n")
    print(f"text: {len(documents)} documents in {root / 'text.jsonl'}")


if __name__ == "__main__":
    main()
