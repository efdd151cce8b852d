"""`fast_llm_supernet.model.ops`: chunked gated delta rule == its token-by-token recurrence, the one-token
step, conv state, norms, the attention mask."""

import pytest
import torch
import torch.nn.functional as F

from fast_llm_supernet.model import ops


def _delta_rule_inputs(
    seq_len, per_channel, dtype=torch.float64, batch=2, heads=3, key_dim=8, value_dim=5, seed=0
):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    q = ops.l2norm(randn(batch, seq_len, heads, key_dim))
    k = ops.l2norm(randn(batch, seq_len, heads, key_dim))
    v = randn(batch, seq_len, heads, value_dim)
    decay_shape = (batch, seq_len, heads, key_dim) if per_channel else (batch, seq_len, heads)
    g = -2 * torch.rand(*decay_shape, generator=generator, dtype=dtype)
    beta = torch.rand(batch, seq_len, heads, generator=generator, dtype=dtype)
    initial_state = randn(batch, heads, key_dim, value_dim)
    return q, k, v, g, beta, initial_state


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn_scalar_decay", "kda_per_channel_decay"])
@pytest.mark.parametrize("seq_len", [1, 7, 64, 100, 129])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(per_channel, seq_len, with_state):
    q, k, v, g, beta, initial_state = _delta_rule_inputs(seq_len, per_channel)
    initial_state = initial_state if with_state else None
    chunk_out, chunk_state = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state)
    ref_out, ref_state = ops.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state)
    assert chunk_out.shape == v.shape and chunk_out.dtype == v.dtype
    torch.testing.assert_close(chunk_out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(chunk_state, ref_state, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn_scalar_decay", "kda_per_channel_decay"])
def test_chunked_float32_and_chunk_size(per_channel):
    q, k, v, g, beta, state = _delta_rule_inputs(150, per_channel, dtype=torch.float32)
    ref_out, ref_state = ops.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    for chunk_size in (16, 64):
        out, final = ops.chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=state, chunk_size=chunk_size
        )
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(final, ref_state, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn_scalar_decay", "kda_per_channel_decay"])
def test_split_sequence_carries_state(per_channel):
    """Two calls chained through the final state equal one call over the whole sequence."""
    q, k, v, g, beta, state = _delta_rule_inputs(90, per_channel)
    whole, whole_state = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    split = 70
    first, mid_state = ops.chunk_gated_delta_rule(
        q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], initial_state=state
    )
    second, end_state = ops.chunk_gated_delta_rule(
        q[:, split:], k[:, split:], v[:, split:], g[:, split:], beta[:, split:], initial_state=mid_state
    )
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(end_state, whole_state)


def test_delta_rule_semantics_one_token():
    """With no decay and beta = 1, one write stores v under k exactly: reading with q = k returns v * scale."""
    k = ops.l2norm(torch.randn(1, 1, 1, 4, dtype=torch.float64), eps=0.0)
    v = torch.randn(1, 1, 1, 3, dtype=torch.float64)
    g = torch.zeros(1, 1, 1, dtype=torch.float64)
    beta = torch.ones(1, 1, 1, dtype=torch.float64)
    for kernel in (ops.chunk_gated_delta_rule, ops.recurrent_gated_delta_rule):
        out, state = kernel(k, k, v, g, beta, scale=1.0)
        torch.testing.assert_close(out, v)
        torch.testing.assert_close(state[0, 0], k[0, 0, 0, :, None] * v[0, 0, 0, None, :])


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn_scalar_decay", "kda_per_channel_decay"])
def test_gradients_finite_at_strong_decay(per_channel):
    """Decays of -60 per token: exp(G_t - G_s) above the diagonal would be exp(+3800) = inf without masking."""
    q, k, v, g, beta, state = _delta_rule_inputs(80, per_channel, dtype=torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g * 30, beta, state)]
    out, final = ops.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5])
    (out.square().sum() + final.square().sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


def test_causal_conv1d_matches_padded_conv_and_carries_state():
    torch.manual_seed(0)
    batch, seq_len, channels, kernel_size = 2, 11, 6, 4
    x = torch.randn(batch, seq_len, channels, dtype=torch.float64)
    weight = torch.randn(channels, 1, kernel_size, dtype=torch.float64)

    y, state = ops.causal_conv1d(x, weight)
    # Reference: zero-pad on the left and convolve (Fast-LLM: padding=K-1, keep the first T outputs).
    reference = F.silu(
        F.conv1d(x.transpose(1, 2), weight, groups=channels, padding=kernel_size - 1)[..., :seq_len]
    )
    torch.testing.assert_close(y, reference.transpose(1, 2))
    assert state.shape == (batch, channels, kernel_size - 1)
    torch.testing.assert_close(state, x[:, -(kernel_size - 1) :].transpose(1, 2))

    # Token by token (and a 2-token piece shorter than K-1), carrying the state, gives the same outputs.
    pieces, state = [], None
    for start, end in [(0, 2), *[(t, t + 1) for t in range(2, seq_len)]]:
        y_piece, state = ops.causal_conv1d(x[:, start:end], weight, state)
        pieces.append(y_piece)
    torch.testing.assert_close(torch.cat(pieces, dim=1), y)
    torch.testing.assert_close(state, x[:, -(kernel_size - 1) :].transpose(1, 2))


def test_l2norm_and_gated_rms_norm():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.l2norm(x), x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6))
    gate, weight = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5) * weight * gate * torch.sigmoid(gate)
    torch.testing.assert_close(ops.gated_rms_norm(x, gate, weight, 1e-5), expected)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn_scalar_decay", "kda_per_channel_decay"])
def test_chunked_gradients_equal_recurrent_gradients(per_channel):
    inputs = _delta_rule_inputs(70, per_channel)
    gradients = []
    for kernel in (ops.chunk_gated_delta_rule, ops.recurrent_gated_delta_rule):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out, final = kernel(*leaves[:5], initial_state=leaves[5])
        (out.sin().sum() + final.cos().sum()).backward()
        gradients.append([leaf.grad for leaf in leaves])
    for chunked, recurrent in zip(*gradients, strict=True):
        torch.testing.assert_close(chunked, recurrent, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("chunk_size", [8, 24, 64])
def test_chunked_sub_chunks_at_strong_per_channel_decay(chunk_size):
    """Per-channel decay factors through sub-chunk starts (sizes 8, 16 and a chunk of 24 = 3 x 8):
    values and gradients still equal the recurrence where decays reach -20 per token."""
    inputs = list(_delta_rule_inputs(70, per_channel=True))
    inputs[3] = inputs[3] * 10  # g in [-20, 0]: most channels forget within a token, some keep
    results = []
    for kernel, kwargs in (
        (ops.chunk_gated_delta_rule, {"chunk_size": chunk_size}),
        (ops.recurrent_gated_delta_rule, {}),
    ):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out, final = kernel(*leaves[:5], initial_state=leaves[5], **kwargs)
        (out.sin().sum() + final.cos().sum()).backward()
        results.append([out, final, *(leaf.grad for leaf in leaves)])
    for chunked, recurrent in zip(*results, strict=True):
        torch.testing.assert_close(chunked, recurrent, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar_decay", "per_channel_decay"])
def test_gated_delta_rule_step_is_one_token_of_the_recurrence(per_channel):
    generator = torch.Generator().manual_seed(0)
    batch, heads, key_dim, value_dim = 3, 2, 8, 4
    q = ops.l2norm(torch.randn(batch, 1, heads, key_dim, generator=generator))
    k = ops.l2norm(torch.randn(batch, 1, heads, key_dim, generator=generator))
    v = torch.randn(batch, 1, heads, value_dim, generator=generator)
    g = -torch.rand(batch, 1, heads, *((key_dim,) if per_channel else ()), generator=generator)
    beta = torch.rand(batch, 1, heads, generator=generator)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=generator)
    expected_out, expected_state = ops.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    decay = g[:, 0] if per_channel else g[:, 0, :, None]
    out = ops.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], decay, beta[:, 0], state, key_dim**-0.5)
    torch.testing.assert_close(out, expected_out[:, 0])
    torch.testing.assert_close(state, expected_state)  # updated in place


def test_attention_mask_is_causal_and_windowed():
    queries, keys = torch.arange(3, 6), torch.arange(0, 6)
    full = ops.attention_mask(queries, keys, None)
    assert full.tolist() == [[key <= query for key in range(6)] for query in range(3, 6)]
    windowed = ops.attention_mask(queries, keys, 2)  # query i reaches keys i-1 .. i
    assert windowed.tolist() == [[query - 2 < key <= query for key in range(6)] for query in range(3, 6)]


def _diagonal_block_inputs(dtype, shape=(2, 9, 4, 4), size=16, key_dim=64, decay_scale=1.0, seed=0):
    """Queries [J=2, ..., S, Dk], keys and within-chunk cumulative log-decays [..., S, Dk] of one sub-chunk each."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(2, *shape, size, key_dim, generator=generator, dtype=dtype)
    keys = torch.randn(*shape, size, key_dim, generator=generator, dtype=dtype)
    log_decay = (-decay_scale * torch.rand(*shape, size, key_dim, generator=generator, dtype=dtype)).cumsum(-2)
    return queries, keys, log_decay


@pytest.mark.parametrize("decay_scale", [1.0, 60.0], ids=["mild_decay", "strong_decay"])
def test_diagonal_block_scores_equal_reference_float32(decay_scale):
    """The loop-per-key diagonal blocks (and their hand-written backward) against the explicit [t, s, Dk] reference,
    float32 at the SmolLM2 layer-local shape (batch 2 of 4, 9 heads of 64, 4 chunks of 4 sub-chunks of 16):
    values and gradients within 1e-5 relative (float32 rounding of sums of 64 products); finite at -60 per token."""
    inputs = _diagonal_block_inputs(torch.float32, decay_scale=decay_scale)
    upstream = torch.randn(2, 2, 9, 4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for kernel in (ops.diagonal_block_scores, ops.diagonal_block_scores_reference):
        leaves = [x.clone().requires_grad_() for x in inputs]
        scores = kernel(*leaves)
        results.append([scores, *torch.autograd.grad(scores, leaves, upstream)])
    for fast, reference in zip(*results, strict=True):
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert (results[0][0].triu(1) == 0).all()  # nothing above the diagonal


def test_diagonal_block_scores_gradcheck_and_no_grad_path():
    inputs = [x.requires_grad_() for x in _diagonal_block_inputs(torch.float64, shape=(2, 3), size=5, key_dim=4)]
    assert torch.autograd.gradcheck(ops.diagonal_block_scores, inputs)
    with torch.no_grad():
        torch.testing.assert_close(ops.diagonal_block_scores(*inputs), ops.diagonal_block_scores_reference(*inputs))


def test_chunked_kernel_with_reference_diagonal_blocks_is_unchanged(monkeypatch):
    """`FAST_DIAGONAL_BLOCKS = False` (the benchmark's "before") still computes the chunked rule: float32, 1e-5."""
    inputs = _delta_rule_inputs(150, per_channel=True, dtype=torch.float32)
    fast = ops.chunk_gated_delta_rule(*inputs[:5], initial_state=inputs[5])
    monkeypatch.setattr(ops, "FAST_DIAGONAL_BLOCKS", False)
    reference = ops.chunk_gated_delta_rule(*inputs[:5], initial_state=inputs[5])
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
