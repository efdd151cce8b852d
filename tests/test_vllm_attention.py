"""`vllm_supernet.attention`: paged attention on a subset of the batch, vLLM's CPU kernel and the
PyTorch path, against the reference mixer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from shared_spec import AttentionMixerConfig  # noqa: E402
from vllm_supernet.attention import (  # noqa: E402
    PagedAttentionMetadata,
    paged_attention_cpu,
    paged_attention_reference,
)

# ---- paged attention against the reference mixer ------------------------------------------------


KERNELS = [
    pytest.param(paged_attention_reference, id="reference"),
    pytest.param(paged_attention_cpu, id="vllm_cpu_kernel"),
]


@pytest.mark.parametrize("window", [None, 3, 40])
@pytest.mark.parametrize("kernel", KERNELS)
def test_paged_attention_equals_reference_mixer_over_chunks_and_decode(kernel, window):
    """Three sequences, prefilled in chunks then decoded, in scattered cache blocks, some steps on a
    subset of the batch, against the reference mixer's full-sequence forward."""
    from fast_llm_supernet.model.attention import Attention
    from fast_llm_supernet.model.ops import apply_rotary, rotary_cos_sin

    if kernel is paged_attention_cpu:
        pytest.importorskip("vllm")
    torch.manual_seed(0)
    heads, head_groups, head_size, hidden_size = 4, 2, 32, 64  # 32: a head size both kernels take
    config = AttentionMixerConfig(
        heads=heads,
        head_groups=head_groups,
        head_size=head_size,
        add_linear_biases=False,
        window_size=window,
        rotary={"theta": 10000.0},
    )
    mixer = Attention(config, hidden_size).eval()
    lengths, block_size = [75, 40, 9], 32
    inputs = [torch.randn(1, n, hidden_size) for n in lengths]
    expected = [mixer(x)[0] for x in inputs]
    block_tables = torch.tensor([[7, 2, 5], [3, 6, 0], [1, 0, 0]], dtype=torch.int32)
    # Unwritten slots must never be attended to: keys of 1e4 there would swamp the softmax. (Not NaN:
    # the CPU kernel computes whole tiles and masks the scores, and NaN * 0 stays NaN.)
    cache = torch.full((8, head_groups, block_size, 2 * head_size), 1e4)
    cos, sin = rotary_cos_sin(mixer._angle_scales, 0, 128, 1.0, "cpu")
    done = [0, 0, 0]
    # Per step, tokens per request (0: not in this step's subset); chunks cross block boundaries.
    for step_lengths in ([30, 7, 0], [20, 33, 9], [25, 1, 0], [1, 0, 1], [0, 1, 0]):
        requests = [r for r in range(3) if step_lengths[r]]
        chunks = [(r, done[r], min(lengths[r], done[r] + step_lengths[r])) for r in requests]
        hidden = torch.cat([inputs[r][0, start:end] for r, start, end in chunks])
        positions = torch.cat([torch.arange(start, end) for _, start, end in chunks])
        slots = torch.cat([block_tables[r, positions_r // block_size] * block_size + positions_r % block_size
                           for r, start, end in chunks for positions_r in [torch.arange(start, end)]])  # fmt: skip
        # The batch holds all three requests; this step's subset is `requests` (the others: 0 tokens).
        query_start_loc, seq_lens = [0], []
        for r in range(3):
            chunk = next((c for c in chunks if c[0] == r), (r, done[r], done[r]))
            query_start_loc.append(query_start_loc[-1] + chunk[2] - chunk[1])
            seq_lens.append(chunk[2])
        metadata = PagedAttentionMetadata(
            num_actual_tokens=len(positions),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=block_tables,
            slot_mapping=slots,
            isa="vec",
        )
        n = len(positions)
        q = apply_rotary(mixer.q_proj(hidden).view(n, heads, head_size), cos[positions][:, None], sin[positions][:, None])
        k = apply_rotary(mixer.k_proj(hidden).view(n, head_groups, head_size), cos[positions][:, None], sin[positions][:, None])
        v = mixer.v_proj(hidden).view(n, head_groups, head_size)
        token_index = torch.arange(n)  # the subset's tokens are the whole flat batch here
        attended = kernel(q, k, v, cache, metadata, requests, token_index, mixer.scale, window)
        out = mixer.o_proj(attended.flatten(1))
        offset = 0
        for r, start, end in chunks:
            torch.testing.assert_close(
                out[offset : offset + end - start], expected[r][start:end], atol=1e-5, rtol=1e-5
            )
            offset += end - start
            done[r] = end
    assert done == lengths


# ---- the step of a hybrid supernet's attention pages ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_step_keeps_the_cpu_kernel_on_the_path_of_32_token_blocks(dtype):
    """Pages step by 16 tokens only where that costs the CPU kernel nothing: the kernel path (ISA) of the chosen
    step is the one blocks of 32 get. A head size the kernel runs on its 16-wide path whatever the block (48)
    steps by 16."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_supernet.attention import BLOCK_STEP, block_step

    step = block_step(dtype, [64, 128], "auto")
    assert step in (BLOCK_STEP, 2 * BLOCK_STEP)
    for head in (64, 128):
        assert _get_attn_isa(dtype, step, head, "auto") == _get_attn_isa(dtype, 2 * BLOCK_STEP, head, "auto")
    if _get_attn_isa(dtype, BLOCK_STEP, 64, "auto") == "vec16":  # x86: 16-token blocks are slower
        assert step == 2 * BLOCK_STEP
    assert block_step(dtype, [48], "auto") == BLOCK_STEP
