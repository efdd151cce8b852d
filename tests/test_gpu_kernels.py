"""flash-linear-attention against the PyTorch kernels, on a CUDA GPU (skipped without one).

On CUDA the GDN and KDA mixers run fla's Triton kernels (`delta_rule_kernels.gated_delta_rule`), for
training, prefill and decode alike; everywhere else they run its PyTorch kernels, which the
rest of the suite checks against the token-by-token recurrence. These tests hold fla to the same
numbers: chunked and recurrent kernels, scalar (GDN) and per-channel (KDA) decay, with a starting
state. They need a CUDA device and `pip install flash-linear-attention`.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from fast_llm_supernet.model import delta_rule_kernels, ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("fla") is None,
        reason="needs flash-linear-attention (pip install flash-linear-attention)",
    ),
]


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn_scalar_decay", "kda_per_channel_decay"])
@pytest.mark.parametrize("recurrent", [False, True], ids=["chunked", "recurrent"])
def test_fla_matches_the_torch_kernels(per_channel, recurrent):
    torch.manual_seed(0)
    batch, length, heads, key_dim, value_dim = 2, 8 if recurrent else 150, 4, 64, 64
    query = ops.l2norm(torch.randn(batch, length, heads, key_dim))
    key = ops.l2norm(torch.randn(batch, length, heads, key_dim))
    value = torch.randn(batch, length, heads, value_dim)
    decay_shape = (batch, length, heads, key_dim) if per_channel else (batch, length, heads)
    log_decay = F.logsigmoid(torch.randn(decay_shape) + 2)  # decays in (0, 1), mostly near 1
    beta = torch.rand(batch, length, heads)
    initial_state = 0.1 * torch.randn(batch, heads, key_dim, value_dim)

    reference = ops.recurrent_gated_delta_rule if recurrent else ops.chunk_gated_delta_rule
    expected_out, expected_state = reference(query, key, value, log_decay, beta, initial_state=initial_state)

    on_gpu = [x.cuda() for x in (query, key, value, log_decay, beta, initial_state)]
    assert delta_rule_kernels.uses_fla(on_gpu[0].device)
    out, state = delta_rule_kernels.gated_delta_rule(
        *on_gpu[:5], initial_state=on_gpu[5], output_final_state=True, recurrent=recurrent
    )
    # Outputs here are ~0.1 and states ~1. fla's chunked kernels may multiply in TF32 on recent GPUs:
    # agreement to about 1 % of the outputs, not to float32's last bits (the torch kernels agree to 1e-7).
    torch.testing.assert_close(out.float().cpu(), expected_out.float(), atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(state.float().cpu(), expected_state.float(), atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn_scalar_decay", "kda_per_channel_decay"])
def test_training_gradients_match_the_torch_kernels(per_channel):
    """Whatever `kernel_choice` picked for training on this GPU (fla, or the torch kernels where fla's backward
    refuses or is wrong), its gradients are the torch kernels' up to fla's TF32 products."""
    torch.manual_seed(1)
    batch, length, heads, dim = 2, 200, 4, 64
    decay_shape = (batch, length, heads, dim) if per_channel else (batch, length, heads)
    inputs = [
        ops.l2norm(torch.randn(batch, length, heads, dim)),
        ops.l2norm(torch.randn(batch, length, heads, dim)),
        torch.randn(batch, length, heads, dim),
        F.logsigmoid(torch.randn(decay_shape) + 2),
        torch.rand(batch, length, heads),
    ]
    upstream = torch.randn(batch, length, heads, dim)

    def grads(kernel, device):
        leaves = [x.to(device).requires_grad_() for x in inputs]
        out, _ = kernel(*leaves)
        return [grad.float().cpu() for grad in torch.autograd.grad(out, leaves, upstream.to(device, out.dtype))]

    choice = delta_rule_kernels.kernel_choice("cuda")
    print(choice.describe())
    got = grads(delta_rule_kernels.gated_delta_rule, "cuda")
    expected = grads(ops.chunk_gated_delta_rule, "cpu")
    for name, grad, reference in zip(("q", "k", "v", "g", "beta"), got, expected, strict=True):
        relative = ((grad - reference).norm() / reference.norm()).item()
        assert relative <= delta_rule_kernels.CHECK_TOLERANCE, (name, relative)
