"""Sliding-window attention through compiled FlexAttention on a CUDA GPU against the dense mask (skipped without
one): outputs and gradients, bf16 and float32, with GQA."""

import pytest
import torch
import torch.nn.functional as F

from fast_llm_supernet.model import ops, windowed_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(windowed_attention.flex_attention is None, reason="needs torch >= 2.5 (FlexAttention)"),
]


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)], ids=["bf16", "float32"]
)
def test_flex_matches_the_dense_mask_with_gradients(dtype, tolerance):
    torch.manual_seed(0)
    batch, heads, groups, length, dim, window = 2, 8, 2, 1000, 64, 100
    query = torch.randn(batch, heads, length, dim, device="cuda", dtype=dtype)
    key, value = (torch.randn(batch, groups, length, dim, device="cuda", dtype=dtype) for _ in range(2))
    upstream = torch.randn_like(query)
    positions = torch.arange(length, device="cuda")
    allowed = ops.attention_mask(positions, positions, window)

    def run(flex: bool):
        leaves = [x.detach().requires_grad_() for x in (query, key, value)]
        if flex:
            out = windowed_attention.sliding_window_attention(*leaves, window, dim**-0.5)
        else:
            expanded = [x.repeat_interleave(heads // groups, dim=1) for x in leaves[1:]]
            out = F.scaled_dot_product_attention(leaves[0], *expanded, attn_mask=allowed, scale=dim**-0.5)
        return [out, *torch.autograd.grad(out, leaves, upstream)]

    assert windowed_attention.usable(query)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), run(flex=True), run(flex=False), strict=True):
        relative = ((got.float() - expected.float()).norm() / expected.float().norm()).item()  # relative L2
        assert relative <= tolerance, (name, relative)
