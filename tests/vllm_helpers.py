"""Helpers for the vLLM plugin tests: test checkpoints and an offline engine run in a subprocess.

The engine runs in its own process (`python tests/vllm_helpers.py SCENARIO.json`), as vLLM's
offline `LLM` needs an `if __name__ == "__main__":` guard, and writes what it generated to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "apriel2_upstream_small"
FIXTURE_CHECKPOINT = FIXTURE / "checkpoint"
PYTHON = sys.executable

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def fixture_placements() -> list[list[str]]:
    return json.loads((FIXTURE / "reference.json").read_text())["placements"]


def copy_fixture(dest: Path, tokenizer: bool = False, presets: dict | None = None) -> Path:
    """A copy of the upstream fixture checkpoint, optionally with a tiny tokenizer and presets."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE_CHECKPOINT / name, dest / name)
    if tokenizer:
        from fast_llm_supernet.tools.tiny_teacher import save_tokenizer, train_tokenizer
        from fast_llm_supernet.training.corpus import stdlib_documents

        # Vocabulary <= the model's 320 rows; ids 0/1/2 = pad/bos/eos as in the fixture's config.
        save_tokenizer(train_tokenizer(stdlib_documents(max_files=3), vocab_size=300), dest)
        (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if presets is not None:
        from shared_spec import PresetsFile

        PresetsFile.model_validate(presets).save(dest)
    return dest


def run_engine(scenario: dict, workdir: Path, timeout: float = 1200) -> dict:
    """Run `scenario` (see `_main`) in a fresh process; returns its JSON results."""
    scenario_path = workdir / "scenario.json"
    result_path = workdir / "result.json"
    scenario_path.write_text(json.dumps({**scenario, "result": str(result_path)}))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.run(
        [PYTHON, __file__, str(scenario_path)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if process.returncode != 0 or not result_path.exists():
        raise RuntimeError(
            f"engine run failed (rc {process.returncode}):\n{process.stdout[-4000:]}\n{process.stderr[-8000:]}"
        )
    return json.loads(result_path.read_text())


class RankShapes:
    """Mixed into each vLLM worker (`worker_extension_cls`), so `LLM.collective_rpc("rank_shapes")`
    asks every tensor-parallel rank what it holds."""

    def rank_shapes(self) -> dict:
        return rank_shapes(self.model_runner.get_model())


def rank_shapes(model) -> dict:
    """What one rank's model holds: per linear layer its (input, output) partition sizes (CPU frees the
    weights once oneDNN has packed them), per other parameter its shape, per linear mixer its (conv,
    delta-rule) state shapes, per attention mixer its query and KV heads."""
    linears, parameters, states = {}, {}, {}
    for name, module in model.named_modules():
        if hasattr(module, "output_size_per_partition"):
            linears[name] = [module.input_size_per_partition, module.output_size_per_partition]
        if hasattr(module, "page_shapes_of_rank"):  # wherever the layout keeps them (`page_layout`)
            states[name] = [list(shape) for shape in module.page_shapes_of_rank]
        if hasattr(module, "num_kv_heads") and hasattr(module, "attn"):
            states[name] = {"heads": module.num_heads, "kv_heads": module.num_kv_heads}
    for name, parameter in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner not in linears:
            parameters[name] = list(parameter.shape)
    return {"linears": linears, "parameters": parameters, "states": states}


def block_tables_of(worker) -> dict:
    """How the runner keeps its block tables (`LLM.collective_rpc(block_tables_of)`): per group whether the host
    and device tables are one tensor (the CPU runner's intent), and whether the groups' per-row block counts are
    rows of the plugin's shared array (`patches._share_block_counts`)."""
    import numpy as np

    tables = worker.model_runner.input_batch.block_table
    shared = getattr(tables, "supernet_block_counts", None)
    return {
        "groups": len(tables.block_tables),
        "one_tensor": [t.block_table.gpu is t.block_table.cpu for t in tables.block_tables],
        "shared_counts": [shared is not None and np.shares_memory(t.num_blocks_per_row, shared)
                          for t in tables.block_tables],
    }  # fmt: skip


def state_pages_of(worker) -> dict:
    """Where each linear mixer keeps its states (`LLM.collective_rpc(state_pages_of)`): conv states in the table
    beside the pool or in the state page, each state tensor's shape, how many conv-state tables there are, and the
    pool's page size."""
    from vllm_supernet.linear_mixer import StatePages

    runner = worker.model_runner
    layers = {name: layer for name, layer in runner.compilation_config.static_forward_context.items()
              if isinstance(layer, StatePages)}  # fmt: skip
    tables = {layer.state_pages[0].untyped_storage().data_ptr() for layer in layers.values() if layer.conv_in_table}
    return {
        "page_bytes": runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes,
        "num_blocks": runner.kv_cache_config.num_blocks,
        "conv_tables": len(tables),
        "layers": {name: {"conv_in_table": layer.conv_in_table, "shapes": [list(pages.shape) for pages in layer.state_pages]}
                   for name, layer in layers.items()},  # fmt: skip
    }


def _main(scenario_path: str) -> None:
    """Engine process. scenario: {model, engine: {kwargs}, batches: [{name, requests: [{prompt_token_ids,
    placement?, draft_placement?, max_tokens, prompt_logprobs?, logprobs?, ignore_eos?, temperature?, n?,
    seed?}]}], invalid: [placement values, or request fields such as {"draft_placement": value}] (with speculative_config in
    engine, and disable_log_stats False, `speculation` gives each batch's drafting counts; with disable_log_stats
    False, `metrics` holds vLLM's counters and gauges after the last batch),
    env?: {variables set before the engine starts}, rank_shapes?: bool (see `rank_shapes`), block_tables?: bool
    (see `block_tables_of`), state_pages?: bool (see `state_pages_of`),
    draft_memory?: bool (each rank's `speculative.DraftMemory` after the batches, with what one block of its pool costs)}."""
    from vllm import LLM, SamplingParams

    from vllm_supernet.speculative import speculation_counts

    scenario = json.loads(Path(scenario_path).read_text())
    os.environ.update(scenario.get("env", {}))
    engine = dict(scenario["engine"])
    if scenario.get("rank_shapes"):  # RPC by name into each worker (vLLM's worker_extension_cls)
        engine["worker_extension_cls"] = "tests.vllm_helpers.RankShapes"
    if scenario.get("draft_memory"):
        engine["worker_extension_cls"] = "vllm_supernet.speculative.SpeculatorTiming"
    llm = LLM(model=scenario["model"], skip_tokenizer_init=True, **engine)
    results: dict = {"batches": {}, "invalid": []}
    if scenario.get("rank_shapes"):
        results["rank_shapes"] = llm.collective_rpc("rank_shapes")
    if scenario.get("block_tables"):
        results["block_tables"] = llm.collective_rpc(block_tables_of)
    if scenario.get("state_pages"):
        results["state_pages"] = llm.collective_rpc(state_pages_of)

    def params(request: dict) -> SamplingParams:
        extra = {key: request[key] for key in ("placement", "draft_placement") if key in request} or None
        return SamplingParams(
            max_tokens=request["max_tokens"],
            temperature=request.get("temperature", 0.0),
            n=request.get("n", 1),
            seed=request.get("seed"),
            detokenize=False,
            prompt_logprobs=request.get("prompt_logprobs"),
            logprobs=request.get("logprobs"),
            ignore_eos=request.get("ignore_eos", False),
            extra_args=extra,
        )

    def generate(requests: list[dict]) -> list[dict]:
        outputs = llm.generate(
            [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests],
            [params(r) for r in requests],
            use_tqdm=False,
        )
        found = []
        for request, output in zip(requests, outputs, strict=True):
            completion = output.outputs[0]
            item = {
                "token_ids": list(completion.token_ids),
                "num_cached_tokens": output.num_cached_tokens or 0,
            }
            if len(output.outputs) > 1:
                item["samples"] = [list(sample.token_ids) for sample in output.outputs]
            if completion.logprobs is not None:
                item["logprobs"] = [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
                ]
            if output.prompt_logprobs is not None:
                ids = request["prompt_token_ids"]
                item["prompt_logprobs"] = [None] + [
                    output.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))
                ]
            found.append(item)
        return found

    results["speculation"] = {}
    for batch in scenario.get("batches", []):
        before = speculation_counts(llm) if engine.get("speculative_config") else None
        results["batches"][batch["name"]] = generate(batch["requests"])
        if before is not None:
            after = speculation_counts(llm)
            results["speculation"][batch["name"]] = {key: after[key] - before[key] for key in after}
    for value in scenario.get("invalid", []):
        # A placement value, or a request's fields ({"draft_placement": ...}, {"max_tokens": ...}, ...).
        request = value if isinstance(value, dict) else {"placement": value}
        try:
            llm.generate(
                [{"prompt_token_ids": request.get("prompt_token_ids", [1, 5, 6])}],
                params({"max_tokens": 1, **request}),
                use_tqdm=False,
            )
            results["invalid"].append({"value": value, "error": None})
        except Exception as error:  # VLLMValidationError (a client error, not a ValueError)
            results["invalid"].append({"value": value, "error": f"{type(error).__name__}: {error}"})
    # After the rejections the engine still serves.
    results["after_invalid"] = generate([{"prompt_token_ids": [1, 5, 6], "max_tokens": 2}])
    if not engine.get("disable_log_stats", True):  # vLLM's own counters (preemptions, tokens)
        results["metrics"] = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    if scenario.get("draft_memory"):
        results["draft_memory"] = llm.collective_rpc("draft_memory")
    results["num_gpu_blocks"] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    results["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
    Path(scenario["result"]).write_text(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1])
