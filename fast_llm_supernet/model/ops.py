"""The mixer math of the supernet: every function the four mixers compute with, on plain tensors.

`fast_llm_supernet.model.ops` is the one module of mixer math. It imports neither Fast-LLM nor vLLM, so
the reference model, the Fast-LLM adapter and the vLLM plugin (KDA has no CPU kernel in vLLM) share one
definition. As flash-linear-attention keeps its ops with a naive reference beside each kernel, each fast
function here names the function that is its reference (the tests compare the pairs):

| function | what it computes | its reference |
| --- | --- | --- |
| `recurrent_gated_delta_rule` | the gated delta rule token by token | (the definition below) |
| `chunk_gated_delta_rule` | the same in chunks of 64 tokens (WY form) | `recurrent_gated_delta_rule` |
| `gated_delta_rule_step` | one token, the state updated in place (serving's decode step) | `recurrent_gated_delta_rule`, T = 1 |
| `causal_conv1d` | depthwise causal convolution (+ SiLU); T = 1 is an elementwise decode step | `F.conv1d` over the padded input |
| `l2norm`, `gated_rms_norm` | Fast-LLM's L2 norm (eps inside the root) and gated RMS norm | - |
| `rotary_cos_sin`, `apply_rotary` | rotary tables (float64 angles, float32 tables) and the half-split rotation | - |
| `attention_mask` | which keys each query may attend (causal, optionally windowed) | `is_causal=True` without a window |

The gated delta rule, per head, with state S [Dk, Dv], at each token t:

    S   <- diag(exp(g_t)) S                          # decay (g_t: scalar for GDN, per key channel for KDA)
    S   <- S + beta_t k_t (v_t - S^T k_t)^T          # delta-rule write: move S^T k_t towards v_t
    o_t  = S^T (scale q_t)                           # read after the write

`recurrent_gated_delta_rule` runs exactly that, token by token (the reference and the decode step).
`chunk_gated_delta_rule` computes the same thing in chunks of 64 tokens (the WY form that
flash-linear-attention and Fast-LLM's torch fallback use), with a Python loop over chunks only.

Log-decays `g` are <= 0. Inside a chunk the decay between positions t >= s is exp(G_t - G_s) with
G the within-chunk cumulative sum. Above the diagonal G_t - G_s is positive and overflows at strong
decay; we mask *before* the exponential (exp(-inf) = 0), so forward and backward stay finite.
Fast-LLM's torch KDA exponentiates first and masks after: finite forward, NaN gradients.
Per-channel decays build that [t, s, Dk] decay only within sub-chunks of 16 tokens; across
sub-chunks the decay factors through the sub-chunk start into two factors <= 1 (see `_decayed_scores`).

Which kernel runs where (flash-linear-attention's Triton kernels on CUDA, these elsewhere, and these for
training where fla's backward is wrong) is `delta_rule_kernels`' decision; this module is the math only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16  # per-channel decay: the explicit [t, s, Dk] decay only within sub-chunks
L2NORM_EPS = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrences run in: at least float32 (bf16/fp16 inputs are upcast), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim.

    Fast-LLM's form (eps inside the root), which differs from `F.normalize` (eps clamps the norm).
    """
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate), normalised over the last dim (the head dim).

    x, gate: [..., D]; weight: [D]. Same order of operations as Fast-LLM's torch GatedRMSNormalization.
    """
    return torch.rms_norm(x.to(weight.dtype), (x.shape[-1],), weight, eps) * F.silu(gate)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None = None,
    apply_silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise 1-D convolution over time (no bias), optionally followed by SiLU.

    x:      [B, T, C] channels last (as the projections produce them); any T >= 0, T = 1 is a decode step.
    weight: [C, 1, K] (the checkpoint's `convolution.weight` / `{q,k,v}_conv.weight` layout).
    state:  [B, C, K-1], the K-1 inputs that precede x (None: sequence start, zeros).
    Returns y [B, T, C] (y_t = sum_j weight[:, 0, j] * x_{t-K+1+j}) and the new state [B, C, K-1]:
    the last K-1 inputs, carried from `state` when T < K-1.
    """
    batch_size, seq_len, channels = x.shape
    kernel_size = weight.shape[-1]
    x = x.transpose(1, 2)  # [B, C, T]
    if state is None:
        state = x.new_zeros(batch_size, channels, kernel_size - 1)
    padded = torch.cat([state.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
    if seq_len == 1:  # decode step: one window per channel; an elementwise sum beats conv1d's setup cost
        y = (padded * weight.squeeze(1)).sum(-1, keepdim=True)  # [B, C, 1]
    else:
        y = F.conv1d(padded, weight, groups=channels)  # [B, C, T]
    if apply_silu:
        y = F.silu(y)
    return y.transpose(1, 2).contiguous(), padded[..., seq_len:].contiguous()


def _prepare_decay(g: torch.Tensor) -> torch.Tensor:
    """Scalar decays [..., H] get a trailing channel dim of 1 so one code path broadcasts over Dk."""
    return g.unsqueeze(-1) if g.dim() == 3 else g


def _decayed_scores(
    queries: tuple[torch.Tensor, ...], keys: torch.Tensor, log_decay: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """For each a in `queries`: scores[t, s] = sum_d a[t, d] keys[s, d] exp(G[t, d] - G[s, d]) for s <= t, else 0.

    queries, keys: [..., C, Dk]; log_decay G: [..., C, Dk] (per channel) or [..., C, 1] (scalar).
    Returns one [..., C, C] tensor per query tensor (the decays are built once for all).

    Per-channel decay splits the chunk into sub-chunks of `SUB_CHUNK_SIZE` (flash-linear-attention's
    chunk KDA/GLA layout), so the explicit [t, s, Dk] decay tensor only exists for the diagonal blocks.
    """
    chunk_size = keys.shape[-2]
    if log_decay.shape[-1] == 1:  # scalar decay: a plain matmul, then the [C, C] decay
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=keys.device).tril()
        log_decay = log_decay.squeeze(-1)  # [..., C]
        decay = _masked_decay(log_decay.unsqueeze(-1) - log_decay.unsqueeze(-2), causal)  # [..., C, C]
        return tuple((a @ keys.transpose(-1, -2)) * decay for a in queries)

    # Per-channel decay: split the chunk into M sub-chunks of S tokens. r(t) is the first position of
    # t's sub-chunk. For s in an earlier sub-chunk (s < r(t) <= t), factor the decay through r(t):
    #     exp(G[t] - G[s]) = exp(G[t] - G[r]) * exp(G[r] - G[s]),
    # both factors <= 1 (G is non-increasing), so nothing overflows at strong decay, and the factors
    # rescale the queries and the keys: these scores are plain matmuls.
    sub_size = math.gcd(chunk_size, SUB_CHUNK_SIZE)
    num_subs = chunk_size // sub_size

    def by_sub_chunk(x: torch.Tensor, dim: int = -2) -> torch.Tensor:  # the C dim -> M, S
        return x.unflatten(dim, (num_subs, sub_size))

    sub_decay = by_sub_chunk(log_decay)  # [..., M, S, Dk]
    reference = sub_decay[..., :1, :]  # [..., M, 1, Dk]: G[r] of each sub-chunk
    sub_of_key = torch.arange(chunk_size, device=keys.device) // sub_size  # [C]
    key_before_sub = torch.arange(num_subs, device=keys.device).unsqueeze(-1) > sub_of_key  # [M, C]
    # [..., M, C, Dk]: exp(G[r] - G[s]) for each sub-chunk's r and every key s, masked where s >= r.
    key_decay = _masked_decay(reference - log_decay.unsqueeze(-3), key_before_sub.unsqueeze(-1))
    decayed_keys = (key_decay * keys.unsqueeze(-3)).transpose(-1, -2)  # [..., M, Dk, C]
    query_decay = (sub_decay - reference).exp()  # [..., M, S, Dk]: exp(G[t] - G[r])
    # [..., M, S, C] -> [..., C, C]; zero on and above the diagonal sub-chunk blocks.
    scores = [((by_sub_chunk(a) * query_decay) @ decayed_keys).flatten(-3, -2) for a in queries]

    # Diagonal blocks (s and t in the same sub-chunk): the decay per (t, s, channel), only S x S.
    stacked_queries = torch.stack([by_sub_chunk(a) for a in queries])  # [J, ..., M, S, Dk]
    diagonal = diagonal_block_scores if FAST_DIAGONAL_BLOCKS else diagonal_block_scores_reference
    block_scores = diagonal(stacked_queries, by_sub_chunk(keys), sub_decay).movedim(0, -1)  # [..., M, t, s, J]
    # [..., t, s, M] -> block-diagonal [..., M, t, M, s] -> [..., C, C]
    blocks = torch.diag_embed(block_scores.movedim(-4, -1), dim1=-5, dim2=-3).flatten(-5, -4).flatten(-3, -2)
    return tuple(full + diagonal for full, diagonal in zip(scores, blocks.unbind(-1), strict=True))


# `diagonal_block_scores` (True) or its reference `diagonal_block_scores_reference` (False): the switch is for
# benchmarks/bench_layer_local.py, which times both in one process.
FAST_DIAGONAL_BLOCKS = True


def diagonal_block_scores_reference(
    queries: torch.Tensor, keys: torch.Tensor, log_decay: torch.Tensor
) -> torch.Tensor:
    """scores[j, ..., t, s] = sum_d queries[j, ..., t, d] keys[..., s, d] exp(G[..., t, d] - G[..., s, d]) for
    s <= t, else 0, with the explicit [t, s, Dk] decay tensor (the reference of `diagonal_block_scores`).

    queries [J, ..., S, Dk]; keys, log_decay G [..., S, Dk] -> [J, ..., S, S].
    """
    size = keys.shape[-2]
    causal = torch.ones(size, size, dtype=torch.bool, device=keys.device).tril()
    diff = log_decay.unsqueeze(-2) - log_decay.unsqueeze(-3)  # [..., t, s, Dk]: G[t] - G[s]
    block_keys = _masked_decay(diff, causal.unsqueeze(-1)) * keys.unsqueeze(-3)  # [..., t, s, Dk]
    return (block_keys @ queries.movedim(0, -1)).movedim(-1, 0)  # [..., t, s, Dk] @ [..., t, Dk, J]


def diagonal_block_scores(queries: torch.Tensor, keys: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """`diagonal_block_scores_reference` without its [t, s, Dk] tensor: one key position at a time.

    On a CPU the reference's [B, H, N, M, S, S, Dk] tensors (37 MB each at 4 x 256 tokens, 9 heads of 64) and
    their autograd copies made KDA's delta rule memory-bound; a slice per key position stays in cache, skips
    the masked half above the diagonal (no -inf, no mask), and the hand-written backward recomputes the decay
    instead of keeping it.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (queries, keys, log_decay)):
        return _DiagonalBlockScores.apply(queries, keys, log_decay)
    return _diagonal_block_scores_forward(queries, keys, log_decay)


def _diagonal_block_scores_forward(queries, keys, log_decay):
    size = keys.shape[-2]
    scores = queries.new_zeros(*queries.shape[:-1], size)  # [J, ..., t, s]
    for s in range(size):  # key s meets queries t >= s; G[t] - G[s] <= 0 there, so exp cannot overflow
        decayed_key = (log_decay[..., s:, :] - log_decay[..., s : s + 1, :]).exp_().mul_(keys[..., s : s + 1, :])
        scores[..., s:, s] = (queries[..., s:, :] * decayed_key).sum(-1)
    return scores


class _DiagonalBlockScores(torch.autograd.Function):
    """Backward of scores[j, t, s] = sum_d a_j[t, d] k[s, d] E[t, s, d], E = exp(G[t, d] - G[s, d]), s <= t:
        da_j[t] = sum_s dscores[j, t, s] k[s] E[t, s]
        dk[s]   = sum_t sum_j dscores[j, t, s] a_j[t] E[t, s]
        dG[i]   = sum_j a_j[i] da_j[i] - k[i] dk[i]   (G[i] enters as the query's decay and as the key's)
    """

    @staticmethod
    def forward(ctx, queries, keys, log_decay):
        ctx.save_for_backward(queries, keys, log_decay)
        return _diagonal_block_scores_forward(queries, keys, log_decay)

    @staticmethod
    def backward(ctx, grad_scores):
        queries, keys, log_decay = ctx.saved_tensors
        grad_queries = torch.zeros_like(queries)
        grad_keys = torch.zeros_like(keys)
        for s in range(keys.shape[-2]):
            decay = (log_decay[..., s:, :] - log_decay[..., s : s + 1, :]).exp_()  # [..., S - s, Dk]
            grad_s = grad_scores[..., s:, s, None]  # [J, ..., S - s, 1]
            grad_queries[..., s:, :] += grad_s * (decay * keys[..., s : s + 1, :])
            grad_keys[..., s, :] = ((grad_s * queries[..., s:, :]).sum(0) * decay).sum(-2)
        grad_log_decay = (queries * grad_queries).sum(0) - keys * grad_keys
        return grad_queries, grad_keys, grad_log_decay


def _masked_decay(log_decay_diff: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(log_decay_diff) where `keep`, else 0.

    Masks before the exponential: where the difference is positive it may overflow; exp(-inf) = 0
    keeps both the values and their gradients finite.
    """
    return log_decay_diff.masked_fill(~keep, float("-inf")).exp()


def _start_state(
    initial_state: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The recurrent state [B, H, Dk, Dv] to start from (zeros: sequence start), in the compute dtype."""
    if initial_state is not None:
        return initial_state.to(dtype)
    batch_size, _, num_heads, key_dim = k.shape
    return torch.zeros(batch_size, num_heads, key_dim, v.shape[-1], dtype=dtype, device=k.device)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule, for any sequence length (the last chunk is zero-padded).

    q, k:  [B, T, H, Dk], used as given (L2-normalise them first); q is multiplied by `scale`
           (default Dk ** -0.5).
    v:     [B, T, H, Dv].
    g:     log-decays <= 0: [B, T, H] (scalar per head, GDN) or [B, T, H, Dk] (per key channel, KDA).
    beta:  [B, T, H] write strengths in [0, 1].
    initial_state: [B, H, Dk, Dv] or None (zeros).
    Returns o [B, T, H, Dv] in v's dtype and the final state [B, H, Dk, Dv] in `compute_dtype`.
    """
    out_dtype = v.dtype
    dtype = compute_dtype(q.dtype)
    batch_size, seq_len, num_heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    state = _start_state(initial_state, k, v, dtype)

    # Head-first, compute dtype, trailing feature dim everywhere: [B, H, T, *].
    q, k, v, g = (x.transpose(1, 2).to(dtype) for x in (q, k, v, _prepare_decay(g)))
    beta = beta.transpose(1, 2).to(dtype).unsqueeze(-1)  # [B, H, T, 1]

    # Zero padding is inert: beta = 0 writes nothing, g = 0 does not decay, so the final state is exact.
    pad = (-seq_len) % chunk_size
    num_chunks = (seq_len + pad) // chunk_size
    q, k, v, g, beta = (
        F.pad(x, (0, 0, 0, pad)).unflatten(2, (num_chunks, chunk_size)) for x in (q, k, v, g, beta)
    )  # [B, H, N, C, *]
    q = q * scale
    g = g.cumsum(dim=-2)  # G[t] = sum_{s <= t} g[s] within the chunk: [B, H, N, C, Dk or 1]

    # Within a chunk, the sequential writes amount to a unit lower-triangular system:
    # (I + L) U = beta * v and (I + L) W = beta * k * exp(G), with L[t, s] = beta_t k_t.decay(t, s).k_s (s < t).
    # U are the chunk's values corrected for earlier writes in the chunk; W maps the incoming state onto
    # the same correction.
    # query_key keeps its diagonal (a token reads its own write); key_key's diagonal is never read, as
    # `unitriangular=True` takes the diagonal of I + L to be ones.
    query_key, key_key = _decayed_scores((q, k * beta), k, g)  # [B, H, N, C, C] each
    decay = g.exp()  # from the chunk start to each position
    rhs = torch.cat([v * beta, k * beta * decay], dim=-1)  # [B, H, N, C, Dv + Dk]
    u, w = torch.linalg.solve_triangular(key_key, rhs, upper=False, unitriangular=True).split(
        [value_dim, key_dim], dim=-1
    )

    # Everything but the state's own recurrence is computed for all chunks at once, and the loop takes its
    # per-chunk operands from `unbind` (indexing chunk n of a tensor costs its backward a zero-filled gradient
    # of the whole tensor, per chunk).
    g_last = g[:, :, :, -1:]  # [B, H, N, 1, Dk or 1]
    decayed_queries = q * decay  # reads the incoming state decayed to each position
    decayed_keys = (k * (g_last - g).exp()).transpose(-1, -2)  # [B, H, N, Dk, C]: writes decayed to the chunk end
    state_decay = g_last.transpose(-1, -2).exp()  # [B, H, N, Dk or 1, 1]
    outputs = []
    per_chunk = (x.unbind(2) for x in (u, w, decayed_queries, query_key, decayed_keys, state_decay))
    for u_n, w_n, query_n, query_key_n, key_n, state_decay_n in zip(*per_chunk, strict=True):
        new_values = u_n - w_n @ state  # [B, H, C, Dv]: what the chunk writes
        outputs.append(query_n @ state + query_key_n @ new_values)
        state = state * state_decay_n + key_n @ new_values

    if num_chunks:
        o = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :seq_len]  # [B, H, T, Dv]
    else:
        o = v.new_zeros(batch_size, num_heads, 0, value_dim)
    return o.transpose(1, 2).to(out_dtype), state


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token: the reference for `chunk_gated_delta_rule` and the decode step.

    Same arguments, shapes and return values as `chunk_gated_delta_rule`.
    """
    out_dtype = v.dtype
    dtype = compute_dtype(q.dtype)
    batch_size, seq_len, num_heads, key_dim = k.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, _prepare_decay(g), beta))

    state = _start_state(initial_state, k, v, dtype)
    outputs = []
    for t in range(seq_len):
        state = state * g[:, t].exp().unsqueeze(-1)  # [B, H, Dk, Dv] * [B, H, Dk or 1, 1]
        k_t = k[:, t].unsqueeze(-1)  # [B, H, Dk, 1]
        recalled = (k_t * state).sum(-2)  # S^T k_t: [B, H, Dv]
        delta = (v[:, t] - recalled) * beta[:, t].unsqueeze(-1)  # [B, H, Dv]
        state = state + k_t * delta.unsqueeze(-2)
        outputs.append(((q[:, t] * scale).unsqueeze(-1) * state).sum(-2))  # [B, H, Dv]

    if seq_len:
        o = torch.stack(outputs, dim=1)
    else:
        o = v.new_zeros(batch_size, 0, num_heads, value_dim)
    return o.to(out_dtype), state


def gated_delta_rule_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One token of the gated delta rule for each of B sequences; `state` is updated in place.

    query, key [B, H, Dk] (L2-normalised), value [B, H, Dv], log_decay [B, H, Dk] (per channel) or
    [B, H, 1] (scalar), beta [B, H], state [B, H, Dk, Dv]; all in the state's dtype (float32).
    Returns o [B, H, Dv]. The reference is `recurrent_gated_delta_rule` with T = 1.
    """
    state.mul_(log_decay.exp().unsqueeze(-1))  # decay
    recalled = torch.matmul(key.unsqueeze(-2), state)  # S^T k: [B, H, 1, Dv]
    delta = (value.unsqueeze(-2) - recalled).mul_(beta[..., None, None])  # [B, H, 1, Dv]
    state.add_(key.unsqueeze(-1) * delta)  # write k delta^T
    return torch.matmul((query * scale).unsqueeze(-2), state).squeeze(-2)  # read after the write


# ---- attention ---------------------------------------------------------------------------------------------


def rotary_cos_sin(
    angle_scales: torch.Tensor, start: int, length: int, attention_factor: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [length, head_size / 2] (float32) for positions start .. start+length-1."""
    positions = torch.arange(start, start + length, dtype=torch.float64)
    angles = torch.outer(positions, angle_scales)  # [length, head_size/2], float64 like upstream
    cos = (torch.cos(angles) * attention_factor).to(torch.float32)
    sin = (torch.sin(angles) * attention_factor).to(torch.float32)
    return cos.to(device), sin.to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_size] in the half-split layout; cos/sin [T, head_size/2].

    Computed in float32 (upstream multiplies by its float32 tables) and cast back to x's dtype.
    """
    real, imag = x.float().chunk(2, dim=-1)
    rotated = torch.cat([real * cos - imag * sin, imag * cos + real * sin], dim=-1)
    return rotated.to(x.dtype)


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [T, S]: query at query_positions[t] may attend key at key_positions[s].

    Causal (distance = query - key >= 0) and, with a window w, distance < w: query i reaches keys
    i-w+1 .. i (upstream Fast-LLM's mask `triu(-(w-1))`, flash `window=(w-1, 0)`).
    """
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed
