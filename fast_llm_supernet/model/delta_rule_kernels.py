"""`fast_llm_supernet.model.delta_rule_kernels`: which kernel computes the gated delta rule (GDN, KDA) on which
device, decided once per device, and `gated_delta_rule`, which runs it.

| where | forward (training, prefill, evaluation, decode) | backward |
| --- | --- | --- |
| CPU, or flash-linear-attention (fla) not installed | this project's torch kernels (`ops`) | torch |
| CUDA with fla | fla's Triton kernels | fla where its backward is correct there, else torch |
| `SUPERNET_DISABLE_FLA=1` | torch | torch |

Why a backward check: fla 0.6.0 refuses the backward of its gated chunk kernel on Hopper (H100, H200) with
Triton >= 3.4 and < 3.7.1 ("produces incorrect results for gated chunk_bwd_dqkwg", fla issue #640) unless its
tilelang backend can run (package `tilelang` plus an `nvcc`); torch 2.11 ships Triton 3.6.0, so GDN training
would stop at its first step there. Version tables go stale and a refusal is only one way to be wrong, so the
choice is measured instead: the first time a kind's gradients are needed on a device (or when the trainer asks,
before its first step, for the kinds it trains), fla's forward and backward run once on a small case of that kind
of decay (scalar: GDN, per channel: KDA) next to the torch kernels. An error, or gradients that differ by more
than `CHECK_TOLERANCE`, sends that kind's training to the torch kernels (the whole op: fla's forward would have to
be recomputed in torch for its backward anyway), with one warning that names the versions and the fix.
Inference keeps fla's forward, which is not affected. One combination is known before any try
(`known_bad_backward`): Hopper with Triton >= 3.4 and < 3.7.1 (torch 2.11 ships 3.6.0), where fla refuses
GDN's backward and KDA's, though it passed the small check, did not finish a larger gradient test in minutes on
an H200: both kinds train on the torch kernels there. On a machine whose Triton cache is cold, the check's first
fla calls include their compile and autotuning.

Precision: fla's kernels multiply float32 in TF32 on Ampere and later GPUs, so a float32 model on CUDA is not
the torch kernels' float32 (on the held-out upstream export: 2e-2 against 1e-5). `SUPERNET_DISABLE_FLA=1` gives
the reference's numbers on a GPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from fast_llm_supernet.model import ops

logger = logging.getLogger(__name__)

DISABLE_FLA_ENV = "SUPERNET_DISABLE_FLA"
# Device types fla's Triton kernels run on (tests add "cpu" to run a stand-in fla module).
FLA_DEVICE_TYPES = frozenset({"cuda"})
# Largest relative L2 difference between fla's and the torch kernels' gradients that still counts as correct:
# TF32 products leave about 1e-3; a wrong kernel is off by order 1.
CHECK_TOLERANCE = 0.05
KINDS = {"gdn": False, "kda": True}  # kind -> per-channel decay
FIX = (
    "fix: torch >= 2.13 (it brings Triton >= 3.7.1; `pip install -e \".[gpu]\"` installs it) or "
    "`pip install tilelang` with a CUDA nvcc; SUPERNET_DISABLE_FLA=1 uses the torch kernels everywhere"
)


@dataclass(frozen=True)
class KernelChoice:
    """What computes the delta rule on one device: `forward` is "fla" or "torch"; `backward` maps each kind
    ("gdn", "kda") to the kernel its training runs; `reason` says why a kind fell back to torch."""

    device: str
    forward: str
    backward: dict[str, str]
    reason: str | None = None

    def describe(self) -> str:
        training = ", ".join(f"{kind} {kernel}" for kind, kernel in self.backward.items())
        text = f"delta rule on {self.device}: inference {self.forward}; training {training}"
        return text + (f" ({self.reason})" if self.reason else "")


def fla_disabled() -> bool:
    """Read on every call, so a process (the GPU check) can compare both paths."""
    return os.environ.get(DISABLE_FLA_ENV, "0") not in ("", "0")


@functools.cache
def fla_ops() -> tuple[ModuleType, ModuleType] | None:
    """fla's gated-delta-rule and KDA op modules, or None when fla is not installed or fails to import."""
    try:
        import fla.ops.gated_delta_rule as gdn_ops
        import fla.ops.kda as kda_ops
    except ModuleNotFoundError:
        return None
    except Exception as error:  # a broken Triton/CUDA install degrades to the torch kernels, loudly
        logger.warning("flash-linear-attention is installed but failed to import (%s); using torch kernels", error)
        return None
    return gdn_ops, kda_ops


def uses_fla(device: torch.device) -> bool:
    """True when `gated_delta_rule` runs fla's forward for tensors on `device`."""
    return device.type in FLA_DEVICE_TYPES and not fla_disabled() and fla_ops() is not None


# (device, kind) -> (the kernel its training runs, why fla's backward was not taken or None); decided once.
_backward: dict[tuple[str, str], tuple[str, str | None]] = {}


def kernel_choice(device: torch.device | str, kinds: tuple[str, ...] = tuple(KINDS)) -> KernelChoice:
    """The kernels for `device`. Where fla runs, its backward is checked once per kind asked for (`kinds`:
    "gdn", "kda"; a model that trains GDN only never pays for KDA's check), with one warning for those that fail."""
    device = torch.device(device)
    if not uses_fla(device):
        why = "SUPERNET_DISABLE_FLA is set" if fla_disabled() else f"no fla kernels for {device.type}"
        return KernelChoice(str(device), "torch", dict.fromkeys(kinds, "torch"), why)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    undecided = [kind for kind in kinds if (str(device), kind) not in _backward]
    if undecided:
        _decide(device, undecided)
    decided = {kind: _backward[str(device), kind] for kind in kinds}
    reason = _reasons({kind: failure for kind, (_, failure) in decided.items() if failure})
    return KernelChoice(str(device), "fla", {kind: kernel for kind, (kernel, _) in decided.items()}, reason or None)


def _reasons(failures: dict[str, str]) -> str:
    """"fla's gdn, kda backward: why" when the kinds share their reason, else one clause per kind."""
    if len(set(failures.values())) == 1:
        return f"fla's {', '.join(failures)} backward: {next(iter(failures.values()))}"
    return "; ".join(f"fla's {kind} backward: {failure}" for kind, failure in failures.items())


def _training_kernel(device: torch.device, kind: str) -> str:
    """`kernel_choice(device, (kind,)).backward[kind]`, from the cache once decided (it runs every layer, every step)."""
    decided = _backward.get((str(device), kind))
    return decided[0] if decided is not None else kernel_choice(device, (kind,)).backward[kind]


def _decide(device: torch.device, kinds: list[str]) -> None:
    known = None
    if device.type == "cuda":
        known = known_bad_backward(
            torch.cuda.get_device_capability(device), package_version("triton"), _tilelang_usable()
        )
    if known is not None:  # not even tried: on this combination a try may not come back
        failures = dict.fromkeys(kinds, known)
    else:
        failures = {kind: check_fla_backward(device, KINDS[kind]) for kind in kinds}
    for kind, failure in failures.items():
        _backward[str(device), kind] = ("torch" if failure else "fla", failure)
    failed = {kind: failure for kind, failure in failures.items() if failure}
    if failed:
        logger.warning(
            "GDN/KDA training on %s runs this project's torch delta-rule kernels for %s, not flash-linear-attention's "
            "(%s): %s. Inference still runs fla. %s",
            describe_device(device), ", ".join(failed), versions_line(), _reasons(failed), FIX,
        )
    else:
        logger.info("delta rule on %s: fla for inference and training of %s (%s)", describe_device(device),
                    ", ".join(kinds), versions_line())


def known_bad_backward(capability: tuple[int, int], triton_version: str, tilelang_usable: bool) -> str | None:
    """Why fla's backward must not run on this GPU generation and Triton, or None.

    fla issue #640: Triton >= 3.4 and < 3.7.1 gives wrong results in fla's gated chunk kernels on Hopper (sm_90).
    fla 0.6.0 refuses GDN's backward there; KDA's it runs, but on an H200 with Triton 3.6.0 (torch 2.11) a KDA
    gradient test through it had not finished after six minutes (`scripts/gpu_check.sh`, 2026-12-04), where the
    GDN one on the torch kernels took seconds. So both kinds train on the torch kernels there, unless fla's tilelang
    backend (which fla takes for these kernels on Hopper) can run.
    """
    if capability[0] != 9 or tilelang_usable:
        return None
    version = tuple(int(part) for part in re.findall(r"\d+", triton_version.split("+")[0])[:3])
    if not (3, 4, 0) <= version < (3, 7, 1):
        return None
    return (
        f"Triton {triton_version} on Hopper (sm_9x) is in the range (>= 3.4.0, < 3.7.1) where fla's gated chunk "
        "kernels go wrong (fla issue #640): fla refuses GDN's backward and KDA's did not finish in minutes"
    )


def _tilelang_usable() -> bool:
    """Whether fla would run its tilelang kernels (package `tilelang` and an nvcc), by fla's own test."""
    try:
        from fla.backends import TileLangBackend

        return TileLangBackend.is_available() and TileLangBackend().is_enabled()
    except Exception:  # an fla without the tilelang backend
        return False


def check_fla_backward(device: torch.device, per_channel: bool) -> str | None:
    """Run fla's chunked kernel forward and backward on a small case and compare its gradients with the torch
    kernels'. Returns None when they agree, else what went wrong."""
    generator = torch.Generator().manual_seed(0)
    batch, length, heads, dim = 1, 128, 2, 64  # two chunks: the inter-chunk backward runs too

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    inputs = (
        ops.l2norm(randn(batch, length, heads, dim)),
        ops.l2norm(randn(batch, length, heads, dim)),
        randn(batch, length, heads, dim),
        F.logsigmoid(randn(batch, length, heads, *((dim,) if per_channel else ())) + 2),
        torch.rand(batch, length, heads, generator=generator),
    )
    upstream = randn(batch, length, heads, dim)
    gradients = {}
    for name, kernel in (("fla", _fla_delta_rule), ("torch", ops.chunk_gated_delta_rule)):
        leaves = [x.to(device).requires_grad_() for x in inputs]
        try:
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                out, _ = kernel(*leaves)
                grads = torch.autograd.grad(out, leaves, upstream.to(device, out.dtype))
        except Exception as error:  # fla raises RuntimeError on a known-bad combination; anything else counts too
            return f"{type(error).__name__}: {error}"
        gradients[name] = [grad.float() for grad in grads]
    worst = max(
        ((fla - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        for fla, ref in zip(gradients["fla"], gradients["torch"], strict=True)
    )
    if not worst <= CHECK_TOLERANCE:  # `not <=` catches NaN too
        return f"its gradients differ from the torch kernels' by {worst:.3g} (relative L2; tolerance {CHECK_TOLERANCE})"
    return None


def _fla_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=True, recurrent=False):
    gdn_ops, kda_ops = fla_ops()
    per_channel = g.dim() == 4
    if recurrent:
        kernel = kda_ops.fused_recurrent_kda if per_channel else gdn_ops.fused_recurrent_gated_delta_rule
    else:
        kernel = kda_ops.chunk_kda if per_channel else gdn_ops.chunk_gated_delta_rule
    # Keywords only: fla's recurrent GDN kernel takes (q, k, v, g, gk, gv, beta, ...) positionally.
    return kernel(
        q=q,
        k=k,
        v=v,
        g=g.float(),
        beta=beta.to(q.dtype),
        initial_state=initial_state.float() if initial_state is not None else None,
        output_final_state=output_final_state,
    )


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    recurrent: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule with the kernel `kernel_choice` picks; arguments as in `ops.chunk_gated_delta_rule`.

    q, k [B, T, H, Dk] (already L2-normalised; scaled by Dk ** -0.5 inside), v [B, T, H, Dv],
    g [B, T, H] (scalar decay, GDN) or [B, T, H, Dk] (per-channel, KDA), beta [B, T, H],
    initial_state [B, H, Dk, Dv] or None. `recurrent=True` picks the token-by-token kernel (decode).
    Returns o [B, T, H, Dv] and the final state (None from fla unless `output_final_state`).
    """
    if uses_fla(q.device):
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta))
        if not needs_grad or _training_kernel(q.device, "kda" if g.dim() == 4 else "gdn") == "fla":
            return _fla_delta_rule(q, k, v, g, beta, initial_state, output_final_state, recurrent)
    kernel = ops.recurrent_gated_delta_rule if recurrent else ops.chunk_gated_delta_rule
    # The torch kernels compute in float32 (`ops.compute_dtype`); under a bf16 autocast (the trainer on a GPU)
    # their matmuls would round to bf16 inside the recurrence.
    with torch.autocast(q.device.type, enabled=False):
        return kernel(q, k, v, g, beta, initial_state=initial_state)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return str(device)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions_line() -> str:
    """torch, Triton, fla and tilelang versions as one line (for warnings and the GPU check)."""
    names = {"triton": "Triton", "flash-linear-attention": "fla", "tilelang": "tilelang"}
    parts = [f"torch {torch.__version__}"] + [f"{label} {package_version(name)}" for name, label in names.items()]
    return ", ".join(parts)
