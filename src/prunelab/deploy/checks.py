"""Agreement that cannot be fooled: every served form against the eager fp32 model, at every timed
batch size, on top-1 answers and on the logits themselves.

A form is refused (``DeployMismatchError``) when, at any batch size it is timed at,

- it changes top-1 answers beyond rounding (``MIN_AGREEMENT`` of the images must keep their answer,
  a flip being excused only where the two forms' logits agree within ``ROUNDING_RTOL``), or gives
  inf/NaN logits;
- its logits are off by more than the dtype allows: their RMS error relative to the reference's RMS
  (``LOGIT_RTOL``), or their least-squares scale against the reference (``SCALE_TOL``): a form that
  multiplies every logit by 1.05 keeps every top-1 answer but not its scale.

Checking at every batch size catches a form that is right at 128 and wrong at 1 (a capture, a
compiled specialisation or a session that mishandles one shape).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunelab.deploy.form import dtype_name
from prunelab.errors import PrunelabError
from prunelab.models.modes import eval_mode

# A flip of the top-1 answer counts as rounding only when the two forms' logits for that image
# agree to within this fraction of the image's largest logit (then the reference had a near-tie).
# fp32 forms only reorder sums (fold, NHWC, graph, another library's kernels) - ~1e-6 relative,
# ~1e-3 where CUDA runs convs in TF32; fp16 keeps 11 mantissa bits, bf16 8, and the error grows
# over a deep net's layers.
ROUNDING_RTOL = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
# Fewest answers (after excusing rounding flips) a form must keep. fp32: the same function, so more
# than 1 in 1000 changed answers is a bug. fp16/bf16: a trained classifier has few images whose
# top-2 margin is within ~1% of its logits; losing more than 1 in 100 means the form is broken
# (overflow in fp16, a wrong fold or layout), not rounded.
MIN_AGREEMENT = {torch.float32: 0.999, torch.float16: 0.99, torch.bfloat16: 0.99}
# Largest RMS logit error over the reference logits' RMS. bf16 VGG16 and ResNet-18 forms measured
# about 0.5% on CPU; fp32 forms far below 1e-3.
LOGIT_RTOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 3e-2}
# Largest |scale - 1|, the scale being the least-squares fit of the form's logits to the
# reference's: rounding is unbiased (bf16 forms measured within 1e-3), a scaled output is not.
SCALE_TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}


class DeployMismatchError(PrunelabError):
    """A deployed form gives different answers from the model it was made from."""


def _batches(loader_or_batches: Iterable) -> Iterable[torch.Tensor]:
    for b in loader_or_batches:
        yield b[0] if isinstance(b, (tuple, list)) else b


def _tol(table: dict, dtype: torch.dtype) -> float:
    return table.get(dtype, table[torch.float32])


def form_dtype(form: nn.Module) -> torch.dtype:
    """The precision ``form`` computes in (an eager form under autocast: the autocast dtype)."""
    return getattr(form, "compute_dtype", None) or getattr(form, "dtype", torch.float32)


@torch.inference_mode()
def agreement(reference_net: nn.Module, deployed: nn.Module, loader_or_batches: Iterable, device,
              rtol: float | None = None) -> dict:
    """How ``deployed`` answers against ``reference_net`` run eagerly in fp32, over the batches
    (tensors, or ``(images, labels)`` as a loader yields them).

    ``flips_beyond_rounding`` counts changed answers whose logits also differ by more than ``rtol``
    of the image's largest reference logit: a flip within that is a near-tie the dtype's rounding
    may break either way. ``max_rel_logit_diff`` is the largest |logit difference| over that scale;
    ``rms_rel_logit_error`` the RMS error over the reference logits' RMS; ``logit_scale`` the
    least-squares scale of the form's logits against the reference's (1 for an unbiased form).
    """
    device = torch.device(device)
    dtype = form_dtype(deployed)
    rtol = _tol(ROUNDING_RTOL, dtype) if rtol is None else rtol
    ref_net = reference_net
    if any(p.dtype != torch.float32 for p in reference_net.parameters()):
        ref_net = copy.deepcopy(reference_net).float()
    images = agree = beyond = nonfinite = 0
    max_abs = max_rel = 0.0
    err2 = ref2 = cross = 0.0
    sizes = set()
    with eval_mode(ref_net, deployed):
        for x in _batches(loader_or_batches):
            x = x.to(device=device, dtype=torch.float32)
            sizes.add(int(x.shape[0]))
            ref = ref_net(x).float()
            out = deployed(x).float().to(ref.device)
            if out.shape != ref.shape:
                raise DeployMismatchError(f"the {getattr(deployed, 'runtime', 'deployed')} form answered a batch of "
                                          f"{tuple(x.shape)} with logits of shape {tuple(out.shape)}, not {tuple(ref.shape)}")
            bad = ~torch.isfinite(out).all(1)
            diff = (out - ref).abs().amax(1)
            rel = diff / ref.abs().amax(1).clamp_min(1e-12)
            same = out.argmax(1) == ref.argmax(1)
            beyond += int((~same & ((rel > rtol) | bad)).sum())
            agree += int(same.sum())
            nonfinite += int(bad.sum())
            images += x.shape[0]
            ok = ~bad
            if ok.any():
                max_abs = max(max_abs, float(diff[ok].max()))
                max_rel = max(max_rel, float(rel[ok].max()))
                o, r = out[ok].double(), ref[ok].double()
                err2 += float((o - r).pow(2).sum())
                ref2 += float(r.pow(2).sum())
                cross += float((o * r).sum())
    if images == 0:
        raise ValueError("agreement needs at least one batch")
    ref2 = max(ref2, 1e-30)
    return {"dtype": dtype_name(dtype), "images": images, "batch_sizes": sorted(sizes), "agree": agree,
            "agreement": agree / images, "flips": images - agree, "flips_beyond_rounding": beyond,
            "agreement_beyond_rounding": 1 - beyond / images, "nonfinite": nonfinite, "max_abs_logit_diff": max_abs,
            "max_rel_logit_diff": max_rel, "rms_rel_logit_error": (err2 / ref2) ** 0.5, "logit_scale": cross / ref2,
            "rounding_rtol": rtol}


def check_agreement(result: dict, min_agreement: float | None = None, what: str = "deployed form") -> dict:
    """``result`` (from :func:`agreement`) when the form keeps its answers and its logits, else
    DeployMismatchError. ``min_agreement`` defaults per dtype (:data:`MIN_AGREEMENT`)."""
    dtype = getattr(torch, result["dtype"], torch.float32)
    need = _tol(MIN_AGREEMENT, dtype) if min_agreement is None else min_agreement
    got = result["agreement_beyond_rounding"]
    at = f" at batch size {', '.join(map(str, result['batch_sizes']))}" if result.get("batch_sizes") else ""
    hint = "Its latency would not be the latency of this model: try latency.dtype=float32 or another latency.runtime."
    if result["nonfinite"] or got < need:
        nonfinite = f"; {result['nonfinite']} image(s) gave inf/NaN logits" if result["nonfinite"] else ""
        raise DeployMismatchError(
            f"the {what} ({result['dtype']}) changes top-1 answers beyond rounding{at}: {result['flips_beyond_rounding']} "
            f"of {result['images']} images flip with logits off by more than {result['rounding_rtol']:.1%} of their "
            f"scale (agreement {got:.4f} < {need}; largest logit difference {result['max_rel_logit_diff']:.2%})"
            f"{nonfinite}. {hint}")
    rms, scale = result.get("rms_rel_logit_error"), result.get("logit_scale")
    if rms is not None and (rms > _tol(LOGIT_RTOL, dtype) or abs(scale - 1) > _tol(SCALE_TOL, dtype)):
        raise DeployMismatchError(
            f"the {what} ({result['dtype']}) keeps its top-1 answers but not its logits{at}: RMS error "
            f"{rms:.2%} of the reference's (at most {_tol(LOGIT_RTOL, dtype):.1%} in {result['dtype']}), scale "
            f"{scale:.4f} (within {_tol(SCALE_TOL, dtype):g} of 1 allowed). {hint}")
    return result


def _chunks(images: torch.Tensor, size: int, limit: int) -> list[torch.Tensor]:
    """At most ``limit`` images (at least one batch) of ``images`` in batches of exactly ``size``."""
    n = images.shape[0]
    take = max(size, min(limit, n) // size * size) if n >= size else 0
    return list(images[:take].split(size)) if take else []


def check_every_size(reference_net: nn.Module, form: nn.Module, images: torch.Tensor | None,
                     timed: Mapping[int, torch.Tensor], device, what: str, small_limit: int = 64) -> dict:
    """The form checked at every batch size it is timed at; {batch size: agreement result}.

    ``images``: the agreement images (validation); None checks on the timing batches themselves.
    Batch sizes below the headline are checked on at most ``small_limit`` images (one forward
    each), the largest on all of ``images``."""
    results = {}
    head = max(timed)
    for bs, batch in sorted(timed.items()):
        on = _chunks(images, bs, images.shape[0] if bs == head else small_limit) if images is not None else []
        results[bs] = check_agreement(agreement(reference_net, form, on or [batch], device), what=what)
    return results
