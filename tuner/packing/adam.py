"""The vectorized Adam/AdamW step and per-slot gradient clipping of a pack: one set of
`torch._foreach_*` ops over the stacked [K, ...] tensors per step, each slot with its own
hyperparameters, bitwise torch's Adam per slot on the CPU (see tuner.packing.modules)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tuner.study.params import TrialParams
from tuner.training.optim import LRSchedule

# ---------------------------------------------------------------------------------------------
# Vectorized Adam/AdamW and per-slot clipping
# ---------------------------------------------------------------------------------------------

def per_slot(values: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A [K] vector as one [K, 1, ...] view per tensor (broadcasting over each slot's elements)."""
    views: dict[int, torch.Tensor] = {}
    out = []
    for t in tensors:
        d = t.dim()
        if d not in views:
            views[d] = values.view(-1, *([1] * (d - 1)))
        out.append(views[d])
    return out


def adam_tables(params: TrialParams, total_steps: int, steps_per_epoch: int) -> dict[str, list[float]]:
    """Per optimizer step s (0-based) of a trial: the lr after its schedule and warm-up, and the
    scalars torch's Adam derives from it in Python double precision at step s + 1: the step size
    −lr / (1 − β1^t), sqrt(1 − β2^t) and AdamW's decay factor 1 − lr × weight_decay. Computed here
    once per trial, with the same expressions, so the packed step is bitwise torch's. With `intervals`,
    each step uses the values in force in its epoch."""
    schedule = LRSchedule(params.schedule, total_steps, steps_per_epoch)
    per_epoch = max(1, steps_per_epoch)
    by_epoch = [params.at_epoch(e).optimizer for e in range(params.training.epochs)] or [params.optimizer]
    lr, step_size, bc2_sqrt, decay = [], [], [], []
    for s in range(max(1, total_steps)):
        opt = by_epoch[min(s // per_epoch, len(by_epoch) - 1)]
        beta1, beta2 = opt.betas
        rate = opt.lr * schedule(s)
        t = float(s + 1)
        lr.append(rate)
        step_size.append((rate / (1 - beta1 ** t)) * -1)
        bc2_sqrt.append((1 - beta2 ** t) ** 0.5)
        decay.append(1 - rate * opt.weight_decay if opt.name == "adamw" and opt.weight_decay != 0 else 1.0)
    return {"lr": lr, "step_size": step_size, "bc2_sqrt": bc2_sqrt, "decay": decay}


@dataclass
class AdamState:
    """The stacked tensors one packed Adam step reads and writes."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: list[torch.Tensor] | None  # only when some slot uses amsgrad


def packed_adam_step(s: AdamState, *, one_minus_beta1: torch.Tensor, beta2: torch.Tensor,
                     one_minus_beta2: torch.Tensor, eps: torch.Tensor, step_size: torch.Tensor,
                     bc2_sqrt: torch.Tensor, coupled_wd: torch.Tensor | None = None,
                     decay: torch.Tensor | None = None, amsgrad: torch.Tensor | None = None) -> None:
    """One Adam/AdamW step for every slot at once. Each hyperparameter is a [K] float32 tensor (one
    value per slot, cast from the double torch's Adam uses); `coupled_wd` (Adam's L2 term) and
    `decay` (AdamW's factor) are None when no slot uses them, `amsgrad` a [K] bool mask or None.

    The ops mirror `torch.optim.adam._multi_tensor_adam` (foreach, not capturable), per slot:
    g += wd·p (adam) or p *= 1 − lr·wd (adamw); m.lerp_(g, 1 − β1); v = v·β2 + ((1 − β2)·g)·g;
    denom = sqrt(v or max v) / sqrt(1 − β2^t) + eps; p += (step_size · m) / denom. There is no
    loop over slots: each line is one `torch._foreach_*` op over the stacked tensors."""
    p, g = s.params, s.grads
    if coupled_wd is not None:
        g = list(torch._foreach_addcmul(g, p, per_slot(coupled_wd, p)))
    if decay is not None:
        torch._foreach_mul_(p, per_slot(decay, p))
    torch._foreach_lerp_(s.exp_avgs, g, per_slot(one_minus_beta1, p))
    torch._foreach_mul_(s.exp_avg_sqs, per_slot(beta2, p))
    torch._foreach_addcmul_(s.exp_avg_sqs, torch._foreach_mul(g, per_slot(one_minus_beta2, p)), g)
    del g
    if amsgrad is not None and s.max_exp_avg_sqs is not None:
        torch._foreach_maximum_(s.max_exp_avg_sqs, s.exp_avg_sqs)
        masks = per_slot(amsgrad, p)
        source = [torch.where(mask, mx, v) for mask, mx, v in zip(masks, s.max_exp_avg_sqs, s.exp_avg_sqs)]
        denom = torch._foreach_sqrt(source)
        del source
    else:
        denom = torch._foreach_sqrt(s.exp_avg_sqs)
    torch._foreach_div_(denom, per_slot(bc2_sqrt, p))
    torch._foreach_add_(denom, per_slot(eps, p))
    numer = torch._foreach_mul(s.exp_avgs, per_slot(step_size, p))
    torch._foreach_addcdiv_(p, numer, denom)


def packed_clip(grads: list[torch.Tensor], norm_threshold: torch.Tensor | None,
                value_threshold: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot: the global L2 gradient norm before clipping ([K]), then clipping by norm (slots
    with a finite `norm_threshold`) or by value (slots with a finite `value_threshold`; inf means
    off). Returns (norms, clipped) as [K] tensors on the device, `clipped` 1.0 where this step
    clipped. The arithmetic per slot is `optim.clip_gradients`'s."""
    k = grads[0].shape[0]
    rows = [row for g in grads for row in g.unbind(0)]  # each slot's tensors, laid out as one model's
    per_tensor = torch.stack(torch._foreach_norm(rows, 2)).view(len(grads), k).t().contiguous()
    norms = torch.linalg.vector_norm(per_tensor, 2, dim=1)
    clipped = torch.zeros_like(norms)
    if norm_threshold is not None:
        # clip_grads_with_norm_: max_norm / (norm + 1e-6), which torch evaluates as reciprocal × max_norm
        coef = torch.clamp((norms + 1e-6).reciprocal() * norm_threshold, max=1.0)
        torch._foreach_mul_(grads, per_slot(coef, grads))
        clipped = torch.where(norms > norm_threshold, 1.0, clipped)
    if value_threshold is not None:
        peak = torch.stack(torch._foreach_norm(rows, math.inf)).view(len(grads), k).amax(0)
        torch._foreach_maximum_(grads, per_slot(-value_threshold, grads))
        torch._foreach_minimum_(grads, per_slot(value_threshold, grads))
        clipped = torch.where(peak > value_threshold, 1.0, clipped)
    return norms, clipped
