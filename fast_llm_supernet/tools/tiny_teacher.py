"""`fast_llm_supernet.tools.tiny_teacher`: make a tiny Llama teacher and a real byte-level BPE tokenizer, with no download.

    supernet-make-tiny-teacher --output DIR [--steps N] [--seed S]

writes a Hugging Face checkpoint (`config.json`, `model.safetensors`, `LlamaForCausalLM`,
float32) and a tokenizer (`tokenizer.json`, `tokenizer_config.json`) that
`AutoTokenizer.from_pretrained(DIR)` loads. Both are trained on the docstrings of the Python
standard library (`fast_llm_supernet.training.corpus`), so the teacher is a (very small) language model
rather than random weights, which makes distilling from it meaningful. Everything is seeded:
the same Python version, seed, step count and torch thread count give the same files.
Pre-training the default size for 200 steps takes about one CPU-minute (single thread).

Default size: hidden 128, 4 layers, 4 query heads in 2 KV groups (GQA), head dim 64 (so the
attention width, 256, is not the hidden size, as in Qwen3), MLP 384, vocab 1024 (about 1.2M
parameters). Head dim 64 because vLLM's CPU GDN kernel accepts head dims 64 and 128 only and the
converted supernet takes its GDN/KDA head dims from the teacher; 2 KV heads because upstream
Fast-LLM cannot build a GDN with one key head and several value heads (GDN key heads = teacher
KV heads).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fast_llm_supernet.training.corpus import stdlib_documents

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
_print = functools.partial(print, flush=True)


@dataclass
class TinyTeacherConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    # Pre-training on the stdlib corpus (0 steps: random weights).
    steps: int = 200
    batch_size: int = 8
    sequence_length: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    # Fewer stdlib files: a smaller corpus (tests); None: all of them.
    corpus_files: int | None = None


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) that prepends BOS, as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes (no unknown token needed).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, output: Path) -> None:
    """tokenizer.json + tokenizer_config.json (+ the SFT chat template), loadable by `AutoTokenizer`
    in transformers 4 and 5."""
    from fast_llm_supernet.training.data import CHAT_TEMPLATE

    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(output)
    # transformers 5 writes its own class name (`TokenizersBackend`), which transformers 4 (vLLM on
    # other stacks) does not know; `PreTrainedTokenizerFast` means the same in both.
    config_path = output / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def build_llama(config: TinyTeacherConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama_config).float()


def tokenize_corpus(documents: list[str], tokenizer) -> torch.Tensor:
    """One long stream: BOS document EOS BOS document EOS ... (int64 [num_tokens])."""
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=True)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model, stream: torch.Tensor, config: TinyTeacherConfig, log=_print) -> list[float]:
    """Short causal-LM training on random windows of the stream (AdamW, warmup + cosine decay)."""
    if config.steps <= 0:
        return []
    if stream.numel() <= config.sequence_length + 1:
        raise ValueError(
            f"corpus has {stream.numel()} tokens; need more than sequence_length={config.sequence_length}"
        )
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=0.01, betas=(0.9, 0.95)
    )
    warmup = max(1, config.steps // 10)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    offsets = torch.arange(config.sequence_length)
    losses = []
    model.train()
    for step in range(config.steps):
        starts = torch.randint(
            0, stream.numel() - config.sequence_length, (config.batch_size,), generator=generator
        )
        batch = stream[starts[:, None] + offsets]  # [B, T]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step % 50 == 0 or step == config.steps - 1):
            log(f"  step {step:4d}/{config.steps}  loss {loss.item():.3f}")
    model.eval()
    return losses


def make_tiny_teacher(output: str | Path, config: TinyTeacherConfig | None = None, log=_print) -> dict:
    """Write the tokenizer and the (optionally pre-trained) teacher to `output`; returns a summary."""
    config = config or TinyTeacherConfig()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    documents = stdlib_documents(config.corpus_files)
    tokenizer = train_tokenizer(documents, config.vocab_size)
    if len(tokenizer) != config.vocab_size:
        # A small corpus may not support that many merges; the model's vocab must cover the tokenizer.
        raise ValueError(
            f"the tokenizer learned only {len(tokenizer)} tokens; lower vocab_size (was {config.vocab_size}) "
            "or use more corpus files"
        )
    stream = tokenize_corpus(documents, tokenizer)

    model = build_llama(config, tokenizer)
    # Hold out the last 5% of the stream to report a loss the training did not see.
    split = int(stream.numel() * 0.95)
    losses = pretrain(model, stream[:split], config, log=log)
    held_out_loss = evaluate_loss(model, stream[split:], config.sequence_length)

    save_tokenizer(tokenizer, output)
    model.save_pretrained(output)
    summary = {
        "config": asdict(config),
        "corpus_documents": len(documents),
        "corpus_chars": sum(len(d) for d in documents),
        "corpus_tokens": int(stream.numel()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "held_out_loss": held_out_loss,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (output / "tiny_teacher.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def evaluate_loss(model, stream: torch.Tensor, sequence_length: int, max_windows: int = 16) -> float:
    """Mean next-token cross-entropy over consecutive windows of `stream`."""
    windows = stream[: (stream.numel() // sequence_length) * sequence_length].view(-1, sequence_length)
    windows = windows[:max_windows]
    if windows.numel() == 0:
        return float("nan")
    model.eval()
    return model(input_ids=windows, labels=windows).loss.item()


def main(argv: list[str] | None = None) -> None:
    defaults = TinyTeacherConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory for the HF checkpoint and tokenizer")
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="pre-training steps (0: random weights)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=defaults.num_kv_heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--sequence-length", type=int, default=defaults.sequence_length)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--corpus-files",
        type=int,
        default=None,
        help="use only the first N stdlib files of the corpus (default: all; fewer is faster)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is much faster on a machine already busy",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TinyTeacherConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        learning_rate=args.learning_rate,
        seed=args.seed,
        corpus_files=args.corpus_files,
    )
    print(f"making tiny teacher in {args.output} ({config.steps} pre-training steps)", flush=True)
    summary = make_tiny_teacher(args.output, config)
    print(
        f"done in {summary['seconds']} s: {summary['parameters']:,} parameters, "
        f"{summary['corpus_tokens']:,} corpus tokens, loss {summary['first_loss']} -> {summary['final_loss']}, "
        f"held-out loss {summary['held_out_loss']:.3f}"
    )


if __name__ == "__main__":
    main()
