"""Trial packing: K trials of one study trained at once, as one fused model on one device.

Every trial of a sweep has the same architecture and batch size; only the optimizer's knobs, the
schedule, the clipping and the seed differ. A pack of K trials stacks each slot's weights along a
new leading dimension ([K, ...]) and runs them as one model whose convolutions are grouped
convolutions (`groups = K × groups`), whose batch norms normalise K × C channels and whose linear
layers are batched matmuls (HFTA-style). The input of a step is [B, K × C, H, W]: each slot's
own batch of its own epoch, drawn with its own data-order generator and augmentation, exactly as
`train.train` draws it for that trial alone. Channels never mix between slots, so slot k's
forward is the single model's forward on slot k's batch.

Why grouped convolutions and not `torch.func.vmap` over `functional_call`: on the CPU a grouped
convolution in channels_last gives bitwise the same outputs as K separate convolutions, while
vmap's batching rule (which also folds the model dimension into conv groups) does not, and in a
measurement on 2 CPU cores a vmapped step was slower than both K separate steps and the grouped
model (see the README section "Trial packing").

The optimizer is a vectorized Adam/AdamW (`PackedAdam`): one set of `torch._foreach_*` ops over
the stacked [K, ...] tensors per step, with each slot's hyperparameters as [K, 1, ...] tensors
(lr after its own schedule and warm-up, betas, eps, weight decay coupled or decoupled, amsgrad).
It performs, per slot, the same float32 operations as `torch.optim.Adam(foreach=True)`, with the
scalars that Adam derives in Python double precision (bias corrections, step size, decoupled decay
factor) precomputed per slot and per step the same way, so on the CPU a step is bitwise the one
torch's Adam takes. Clipping (by norm or by value) is per slot with its own threshold.

Each slot keeps its own step counter, epoch and history: a slot that finished, was pruned or
diverged is removed at an epoch boundary and a new trial takes its place at epoch 0 while the
others go on. A slot that diverges in the middle of an epoch stops updating at once (its weights
and optimizer state are zeroed and its step size is 0, so nothing non-finite spreads) and is
reported as diverged; the others carry on. Checkpoints are per slot, in `train.save_checkpoint`'s
format, so a packed trial resumes packed or alone.

Exactness (CPU, fp32): forward outputs, batch-norm statistics and the optimizer step are bitwise
those of the trial alone; the grouped convolutions' weight gradients and the batched linear
layer's weight gradient are summed in another order by their kernels (differences of ~1e-7
relative per step), which training then amplifies slowly. See tests/test_pack.py for the
tolerances reached.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuner.study.params import TrainingParams, TrialParams
from tuner.training.data import DeviceData, batch_spans, epoch_images, eval_batches, normalize
from tuner.training.optim import LRSchedule, build_optimizer
from tuner.training.train import (
    DIVERGENCE_FACTOR,
    EVAL_BATCH,
    DeviceSettings,
    EpochRecord,
    TrainResult,
    _autocast,
    _restore_generator,
    device_settings,
    epoch_record,
    epoch_steps,
    initial_model,
    load_checkpoint,
    retain_cpu_memory,
    save_checkpoint,
)

PACKABLE_MODELS = ("fastcnn", "fastcnn-wide", "resnet18", "tiny")

# Leaf modules that act on each channel (or each sample) on its own: the same module serves K slots
# whose channels sit side by side.
_CHANNELWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout)


def packable(model_name: str) -> tuple[bool, str]:
    """Whether trials of `model_name` can be packed, and why (or why not)."""
    from tuner.training.models import MODELS, is_reference

    if is_reference(model_name):
        return False, (f"model {model_name!r} is a model by reference: tuner cannot tell whether its forward "
                       "mixes channels, so its trials run one at a time")
    if model_name not in MODELS:
        return False, f"unknown model {model_name!r}"
    if model_name not in PACKABLE_MODELS:
        return False, f"model {model_name!r} has no packed form"
    return True, f"model {model_name!r} packs as grouped convolutions"


def _check_structure(model: nn.Module) -> None:
    """Raise ValueError naming the first module that the grouped transform cannot pack."""
    for name, mod in model.named_modules():
        if list(mod.children()):
            continue  # containers: their leaves are checked
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros":
                raise ValueError(f"{name}: padding_mode {mod.padding_mode!r}")
        elif isinstance(mod, nn.BatchNorm2d):
            if not (mod.affine and mod.track_running_stats) or mod.momentum is None:
                raise ValueError(f"{name}: batch norm without affine parameters, running statistics or momentum")
        elif isinstance(mod, nn.Flatten):
            if mod.start_dim != 1 or mod.end_dim != -1:
                raise ValueError(f"{name}: Flatten({mod.start_dim}, {mod.end_dim})")
        elif not isinstance(mod, (nn.Linear, *_CHANNELWISE)):
            raise ValueError(f"{name}: {type(mod).__name__}")


# ---------------------------------------------------------------------------------------------
# The packed model: grouped convolutions, K × C batch norm, batched linear layers
# ---------------------------------------------------------------------------------------------

class _SlotwiseWeightGradConv(torch.autograd.Function):
    """A grouped convolution whose weight gradient is computed slot by slot.

    On the CPU the grouped kernels give bitwise the outputs and input gradients of K separate
    convolutions, but not always their weight gradients (oneDNN picks another algorithm for a
    grouped first layer with 3 input channels, or a 1×1 stride-2 convolution, which sums in another
    order). `exact` packs compute those per slot with the very call autograd makes for one model."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
                padding: Any, dilation: Any, groups: int, k: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, k, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, k, has_bias = ctx.conf
        conv_backward = torch.ops.aten.convolution_backward
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                                   [True, False, False])[0]
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            parts = [conv_backward(g.contiguous(memory_format=fmt), xs.contiguous(memory_format=fmt), w, None,
                                   stride, padding, dilation, False, [0, 0], groups // k, [False, True, has_bias])
                     for g, xs, w in zip(grad.chunk(k, 1), x.chunk(k, 1), weight.chunk(k, 0))]
            grad_w = torch.cat([part[1] for part in parts])
            grad_b = torch.cat([part[2] for part in parts]) if has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


class PackedConv2d(nn.Module):
    """K convolutions as one grouped convolution. Its tensors are bound per step (`bind`)."""

    def __init__(self, conv: nn.Conv2d, k: int, exact: bool = False) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups * k
        self.k, self.exact = k, exact
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None
        if self.exact and torch.is_grad_enabled() and self.weight.requires_grad:
            out = _SlotwiseWeightGradConv.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                                self.groups, self.k)
            return out
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackedBatchNorm2d(nn.Module):
    """K batch norms as one over K × C channels (statistics are per channel, so per slot)."""

    def __init__(self, bn: nn.BatchNorm2d, k: int, exact: bool = False) -> None:
        super().__init__()
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.running_mean: torch.Tensor | None = None
        self.running_var: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum if self.momentum is not None else 0.0, self.eps)


class _SlotwiseWeightGradLinear(torch.autograd.Function):
    """K linear layers as one batched matmul, with each slot's weight gradient computed as
    autograd computes it for one `F.linear` (grad_outputᵀ @ input): a batched matmul sums it in
    another order when it uses more than one thread."""

    @staticmethod
    def forward(ctx: Any, xk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(xk, weight)
        ctx.has_bias = bias is not None
        wt = weight.transpose(1, 2)
        return torch.baddbmm(bias.unsqueeze(1), xk, wt) if bias is not None else torch.bmm(xk, wt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        xk, weight = ctx.saved_tensors
        grad = grad.contiguous()  # K × B × out, each slot's rows as one model's grad_output
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.stack([g.t().mm(x) for g, x in zip(grad, xk)]) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class PackedLinear(nn.Module):
    """K linear layers as one batched matmul: [B, K × in] -> [B, K × out]."""

    def __init__(self, linear: nn.Linear, k: int, exact: bool = False) -> None:
        super().__init__()
        self.k, self.in_features, self.out_features = k, linear.in_features, linear.out_features
        self.exact = exact
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None
        k, b = self.k, x.shape[0]
        xk = x.reshape(b, k, self.in_features).transpose(0, 1)  # K × B × in
        w = self.weight.view(k, self.out_features, self.in_features)
        bias = self.bias.view(k, self.out_features) if self.bias is not None else None
        if self.exact and torch.is_grad_enabled() and w.requires_grad:
            out = _SlotwiseWeightGradLinear.apply(xk, w, bias)
        elif bias is not None:
            out = torch.baddbmm(bias.unsqueeze(1), xk, w.transpose(1, 2))
        else:
            out = torch.bmm(xk, w.transpose(1, 2))
        return out.transpose(0, 1).reshape(b, k * self.out_features)


_PACKED = {nn.Conv2d: PackedConv2d, nn.BatchNorm2d: PackedBatchNorm2d, nn.Linear: PackedLinear}


def packed_model(template: nn.Module, k: int, exact: bool = False) -> nn.Module:
    """The structure of `template` for K slots: every Conv2d, BatchNorm2d and Linear replaced by its
    packed form (holding no tensors of its own: `bind` gives them views of the stacked state). With
    `exact`, weight gradients of convolutions and linear layers are computed slot by slot (see
    `_SlotwiseWeightGradConv`): bitwise a single model's on the CPU, at the cost of K kernels per
    layer for that part of the backward pass."""
    _check_structure(template)
    skeleton = copy.deepcopy(template).to("meta")

    def replace(mod: nn.Module) -> None:
        for name, child in mod.named_children():
            kind = next((cls for cls in _PACKED if type(child) is cls), None)
            if kind is not None:
                setattr(mod, name, _PACKED[kind](child, k, exact))
            else:
                replace(child)

    replace(skeleton)
    return skeleton


def _packed_shape(t: torch.Tensor) -> tuple[int, ...]:
    """A stacked [K, d0, d1, ...] tensor as the packed module sees it: [K × d0, d1, ...]."""
    return (t.shape[0] * t.shape[1], *t.shape[2:])


# ---------------------------------------------------------------------------------------------
# Vectorized Adam/AdamW and per-slot clipping
# ---------------------------------------------------------------------------------------------

def _per_slot(values: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
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
    once per trial, with the same expressions, so the packed step is bitwise torch's."""
    opt = params.optimizer
    schedule = LRSchedule(params.schedule, total_steps, steps_per_epoch)
    beta1, beta2 = opt.betas
    lr, step_size, bc2_sqrt, decay = [], [], [], []
    for s in range(max(1, total_steps)):
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
        g = list(torch._foreach_addcmul(g, p, _per_slot(coupled_wd, p)))
    if decay is not None:
        torch._foreach_mul_(p, _per_slot(decay, p))
    torch._foreach_lerp_(s.exp_avgs, g, _per_slot(one_minus_beta1, p))
    torch._foreach_mul_(s.exp_avg_sqs, _per_slot(beta2, p))
    torch._foreach_addcmul_(s.exp_avg_sqs, torch._foreach_mul(g, _per_slot(one_minus_beta2, p)), g)
    del g
    if amsgrad is not None and s.max_exp_avg_sqs is not None:
        torch._foreach_maximum_(s.max_exp_avg_sqs, s.exp_avg_sqs)
        masks = _per_slot(amsgrad, p)
        source = [torch.where(mask, mx, v) for mask, mx, v in zip(masks, s.max_exp_avg_sqs, s.exp_avg_sqs)]
        denom = torch._foreach_sqrt(source)
        del source
    else:
        denom = torch._foreach_sqrt(s.exp_avg_sqs)
    torch._foreach_div_(denom, _per_slot(bc2_sqrt, p))
    torch._foreach_add_(denom, _per_slot(eps, p))
    numer = torch._foreach_mul(s.exp_avgs, _per_slot(step_size, p))
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
        torch._foreach_mul_(grads, _per_slot(coef, grads))
        clipped = torch.where(norms > norm_threshold, 1.0, clipped)
    if value_threshold is not None:
        peak = torch.stack(torch._foreach_norm(rows, math.inf)).view(len(grads), k).amax(0)
        torch._foreach_maximum_(grads, _per_slot(-value_threshold, grads))
        torch._foreach_minimum_(grads, _per_slot(value_threshold, grads))
        clipped = torch.where(peak > value_threshold, 1.0, clipped)
    return norms, clipped


# ---------------------------------------------------------------------------------------------
# The pack
# ---------------------------------------------------------------------------------------------

class PackError(ValueError):
    """A trial that cannot join this pack (full, another model or batch size, not packable)."""


@dataclass
class SlotEpoch:
    """What one epoch of the pack did for one slot: its record (None when it diverged in this
    epoch), whether it has now trained all its epochs, and whether it diverged."""

    record: EpochRecord | None
    finished: bool
    diverged: bool = False


@dataclass
class _Plan:
    """What every step of one epoch needs: the stacked tensors and which optional ops any slot uses."""

    state: AdamState
    rows: torch.Tensor
    coupled: bool  # some slot is Adam with weight decay (the L2 term in the gradient)
    decay: bool  # some slot is AdamW with weight decay
    norm: bool  # some slot clips by norm
    value: bool  # some slot clips by value


@dataclass
class _Slot:
    key: Hashable
    params: TrialParams
    generator: torch.Generator
    steps_per_epoch: int
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)
    own: dict[str, torch.Tensor] | None = None  # its tensors while it is not in the stack
    batches_tracked: dict[str, int] = field(default_factory=dict)  # batch norms' counters at `add`
    step_at_add: int = 0
    resumed_from: int | None = None
    diverged_at: dict[str, Any] | None = None
    seconds: float = 0.0
    last_lr: float = 0.0

    @property
    def live(self) -> bool:
        return self.diverged_at is None and self.epoch < self.params.training.epochs


class Pack:
    """Up to `capacity` trials trained together; see the module docstring.

        pack = Pack(data, 4, training)        # the study's model, batch size, precision
        pack.add(key, params)                 # or resume_from=checkpoint
        for key, out in pack.run_epoch().items():
            ...                               # out.record: the epoch's EpochRecord
        pack.save_checkpoint(key, path)       # train.save_checkpoint's format
        result = pack.result(key)             # a TrainResult
        pack.remove(key)                      # frees the slot for the next trial

    Slots that finished or diverged stay (for `result` and `save_checkpoint`) but no longer train;
    `remove` frees them. `run_epoch` trains every live slot for one epoch of its own.
    """

    def __init__(self, data: DeviceData, capacity: int, training: TrainingParams, *,
                 settings: DeviceSettings | None = None, exact: bool | None = None) -> None:
        ok, why = packable(training.model)
        if not ok:
            raise PackError(why)
        if capacity < 1:
            raise PackError(f"a pack holds at least one trial, not {capacity}")
        self.data = data
        self.device = data.device
        self.capacity = int(capacity)
        # slot-by-slot weight gradients (bitwise a trial alone) by default on the CPU only: there exactness
        # is tested; on CUDA nothing is bitwise anyway (bf16, cuDNN's own algorithm choices)
        self.exact = self.device.type == "cpu" if exact is None else bool(exact)
        self.training = training
        self.settings = settings or device_settings(self.device, training.precision, False)
        if self.settings.compile:
            raise PackError("compiled models are not packed")
        self.settings.apply(self.device)
        if self.device.type != "cuda":
            retain_cpu_memory()
        with torch.random.fork_rng(devices=[]):
            self.template = initial_model(training.model, data.num_classes, self.device, self.settings,
                                          options=training.model_options, in_channels=data.in_channels,
                                          image_size=data.image_size)
        _check_structure(self.template)
        self.param_names = [n for n, _ in self.template.named_parameters()]
        self.buffer_names = [n for n, b in self.template.named_buffers() if not n.endswith("num_batches_tracked")]
        self.counter_names = [n for n, _ in self.template.named_buffers() if n.endswith("num_batches_tracked")]
        self.slots: dict[Hashable, _Slot] = {}
        self._order: list[Hashable] = []  # the slots in the stack, by position
        self._stack: dict[str, torch.Tensor] = {}
        self._skeletons: dict[int, nn.Module] = {}
        self._modules_of: dict[int, dict[str, nn.Module]] = {}
        self._amsgrad = False  # whether the stack holds max_exp_avg_sq tensors

    # -- membership ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots)

    def keys(self) -> list[Hashable]:
        return list(self.slots)

    def live(self) -> list[Hashable]:
        """The slots that still train."""
        return [k for k, s in self.slots.items() if s.live]

    def epoch(self, key: Hashable) -> int:
        return self.slots[key].epoch

    def add(self, key: Hashable, params: TrialParams, resume_from: str | Path | None = None) -> None:
        """Put a trial into a free slot: a fresh model from its seed and fresh Adam state, or the state
        of a checkpoint written by `train.train` or `save_checkpoint` (CheckpointError if unusable)."""
        if key in self.slots:
            raise PackError(f"slot {key!r} is taken")
        if self.free <= 0:
            raise PackError(f"the pack is full ({self.capacity} trials)")
        t, mine = params.training, self.training
        for name in ("model", "model_options", "batch_size", "precision"):
            if getattr(t, name) != getattr(mine, name):
                raise PackError(f"trial's training.{name} {getattr(t, name)!r} differs from the pack's "
                                f"{getattr(mine, name)!r}")
        spe = epoch_steps(params, self.data, self.settings)
        gen = torch.Generator(device=self.device).manual_seed(t.seed)
        slot = _Slot(key=key, params=params, generator=gen, steps_per_epoch=spe)
        if resume_from is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed)
                model = initial_model(t.model, self.data.num_classes, self.device, self.settings,
                                      options=t.model_options, in_channels=self.data.in_channels,
                                      image_size=self.data.image_size)
            weights = model.state_dict()
            moments: dict[Any, Any] = {}
        else:
            state = load_checkpoint(resume_from, params)
            self.template.load_state_dict(state["model"])
            weights = self.template.state_dict()
            moments = state["optimizer"]["state"]
            _restore_generator(gen, state["rng_data"], t.seed, int(state["epoch"]))
            slot.epoch, slot.step = int(state["epoch"]), int(state["step"])
            slot.history = list(state["history"])
            slot.resumed_from = slot.epoch
            if slot.history:
                slot.last_lr = float(slot.history[-1]["lr"])
        own: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.param_names):
            w = weights[name].detach().to(self.device).clone()  # one model's layout (channels_last convs)
            own["p." + name] = w
            st = moments.get(i, {})
            own["m." + name] = _moment(st, "exp_avg", w)
            own["v." + name] = _moment(st, "exp_avg_sq", w)
            if params.optimizer.amsgrad:
                own["x." + name] = _moment(st, "max_exp_avg_sq", w)
        for name in self.buffer_names:
            own["b." + name] = weights[name].detach().to(self.device).clone()
        slot.batches_tracked = {n: int(weights[n]) for n in self.counter_names}
        slot.step_at_add = slot.step
        own.update(self._hyper(params, spe))
        own["step"] = torch.tensor(slot.step, dtype=torch.long, device=self.device)
        slot.own = own
        self.slots[key] = slot

    def _hyper(self, params: TrialParams, steps_per_epoch: int) -> dict[str, torch.Tensor]:
        """A slot's hyperparameters as 0-d tensors and its per-step tables, float32 like torch casts."""
        opt, clip, dev = params.optimizer, params.clipping, self.device
        f32 = lambda v: torch.tensor(float(v), dtype=torch.float64).to(dev, torch.float32)  # noqa: E731
        tables = adam_tables(params, params.training.epochs * steps_per_epoch, steps_per_epoch)
        inf = math.inf
        return {
            "h.w1": f32(1 - opt.betas[0]), "h.b2": f32(opt.betas[1]), "h.c2": f32(1 - opt.betas[1]),
            "h.eps": f32(opt.eps), "h.wd": f32(opt.weight_decay if opt.name == "adam" else 0.0),
            "h.ams": torch.tensor(bool(opt.amsgrad), device=dev),
            "h.clip_norm": f32(clip.threshold if clip.mode == "norm" else inf),
            "h.clip_value": f32(clip.threshold if clip.mode == "value" else inf),
            "t.lr": torch.tensor(tables["lr"], dtype=torch.float64, device=dev),
            "t.step_size": torch.tensor(tables["step_size"], dtype=torch.float64).to(dev, torch.float32),
            "t.bc2_sqrt": torch.tensor(tables["bc2_sqrt"], dtype=torch.float64).to(dev, torch.float32),
            "t.decay": torch.tensor(tables["decay"], dtype=torch.float64).to(dev, torch.float32),
        }

    def remove(self, key: Hashable) -> None:
        """Free a slot (its state is dropped; save its checkpoint or result first)."""
        self.slots.pop(key)
        if key in self._order:
            self._order[self._order.index(key)] = None  # restacked at the next epoch

    # -- the stack -------------------------------------------------------------------------------

    def _get(self, slot: _Slot, name: str) -> torch.Tensor:
        if slot.own is not None:
            return slot.own[name]
        return self._stack[name][self._order.index(slot.key)]

    def _names(self, amsgrad: bool) -> list[str]:
        names = [f"{kind}.{n}" for kind in ("p", "m", "v") for n in self.param_names]
        if amsgrad:
            names += ["x." + n for n in self.param_names]
        names += ["b." + n for n in self.buffer_names]
        names += ["h.w1", "h.b2", "h.c2", "h.eps", "h.wd", "h.ams", "h.clip_norm", "h.clip_value",
                  "t.lr", "t.step_size", "t.bc2_sqrt", "t.decay", "step"]
        return names

    def _restack(self) -> None:
        """Stack the live slots' tensors (slots that stopped training get their own copies back)."""
        live = [k for k in self.slots if self.slots[k].live]
        if live == self._order:
            return
        old_order, old = self._order, self._stack
        for pos, key in enumerate(old_order):  # slots leaving the stack keep their rows
            if key is not None and key in self.slots and key not in live:
                self.slots[key].own = {n: t[pos].clone() for n, t in old.items()}
        amsgrad = any(self.slots[k].params.optimizer.amsgrad for k in live)
        stack: dict[str, torch.Tensor] = {}
        if live:
            length = max(int(self._row(k, "t.lr", old_order, old).shape[0]) for k in live)
            for name in self._names(amsgrad):
                rows = [self._row(k, name, old_order, old) for k in live]
                if name.startswith("t."):
                    rows = [torch.cat([r, r[-1:].expand(length - len(r))]) if len(r) < length else r for r in rows]
                stack[name] = _stack_rows(rows)
        for key in live:
            self.slots[key].own = None
        self._order, self._stack, self._amsgrad = live, stack, amsgrad
        for name in self.param_names if live else ():
            stack["p." + name].requires_grad_(True)

    def _row(self, key: Hashable, name: str, order: list[Hashable], stack: dict[str, torch.Tensor]) -> torch.Tensor:
        slot = self.slots[key]
        if slot.own is not None:
            if name in slot.own:
                return slot.own[name]
            return torch.zeros_like(slot.own["p." + name[2:]])  # max_exp_avg_sq of a slot without amsgrad
        if name in stack:
            return stack[name][order.index(key)].detach()
        return torch.zeros_like(stack["p." + name[2:]][order.index(key)]).detach()

    def _skeleton(self, k: int) -> nn.Module:
        if k not in self._skeletons:
            self._skeletons = {k: packed_model(self.template, k, self.exact)}  # one size at a time
            self._modules_of = {id(self._skeletons[k]): dict(self._skeletons[k].named_modules())}
        return self._skeletons[k]

    def _bind(self, skeleton: nn.Module) -> None:
        """Give the packed modules this step's views of the stacked tensors."""
        mods = self._modules_of[id(skeleton)]
        for name in self.param_names:
            owner, _, attr = name.rpartition(".")
            t = self._stack["p." + name]
            setattr(mods[owner], attr, t.view(_packed_shape(t)) if t.dim() > 2 else t.view(-1))
        for name in self.buffer_names:
            owner, _, attr = name.rpartition(".")
            setattr(mods[owner], attr, self._stack["b." + name].view(-1))

    def _freeze(self, pos: int) -> None:
        """Stop a diverged slot: zero weights and Adam state, step size 0 (its forward stays finite,
        nothing non-finite reaches the other slots' tensors, and its updates are exact no-ops)."""
        with torch.no_grad():
            for name, t in self._stack.items():
                if name.startswith(("p.", "m.", "v.", "x.")) or name in ("t.lr", "t.step_size", "h.wd"):
                    t[pos].zero_()
                elif name.endswith("running_var") or name == "t.decay":
                    t[pos].fill_(1.0)
                elif name.startswith("b."):
                    t[pos].zero_()

    # -- training --------------------------------------------------------------------------------

    def run_epoch(self, on_step: Callable[[int, int], None] | None = None) -> dict[Hashable, SlotEpoch]:
        """One epoch for every live slot (each its own next epoch). Returns, per slot that trained,
        its record, whether it finished and whether it diverged."""
        self._restack()
        order = list(self._order)
        if not order:
            return {}
        slots = [self.slots[k] for k in order]
        k = len(order)
        data, dev, settings = self.data, self.device, self.settings
        t0 = time.perf_counter()
        skeleton = self._skeleton(k)
        skeleton.train()
        n_classes = data.num_classes
        batch_size = self.training.batch_size

        # each slot's own epoch: its shuffle, crops and flips from its own generator
        drawn = [epoch_images(data, s.generator, s.params.training.augment) for s in slots]
        x_all = torch.stack([x.permute(0, 2, 3, 1) for x, _ in drawn], dim=3)  # N × H × W × K × C
        n, h, w = x_all.shape[:3]
        x_all = x_all.reshape(n, h, w, k * data.in_channels)
        y_all = torch.stack([y for _, y in drawn])  # K × N
        del drawn
        mean, std = data.mean.repeat(1, k, 1, 1), data.std.repeat(1, k, 1, 1)
        spans = batch_spans(n, batch_size, drop_last=settings.static_shapes)

        plan = self._plan(slots)
        rows, st = plan.rows, self._stack
        loss_limit = DIVERGENCE_FACTOR * math.log(n_classes)
        loss_sum = torch.zeros(k, device=dev)
        loss_max = torch.zeros(k, device=dev)
        alive = torch.ones(k, dtype=torch.bool, device=dev)
        diverged: dict[int, dict[str, Any]] = {}
        norms: list[torch.Tensor] = []
        clipped: list[torch.Tensor] = []
        lrs = st["t.lr"][rows, st["step"].clamp(max=st["t.lr"].shape[1] - 1)]
        for i, (start, stop) in enumerate(spans):
            xb = normalize(x_all[start:stop].permute(0, 3, 1, 2), mean, std)
            yb = y_all[:, start:stop]
            lrs, losses, norm, was_clipped = self._step(skeleton, plan, xb, yb)
            with torch.no_grad():
                loss_sum += losses
                loss_max = torch.maximum(loss_max, losses)
            norms.append(norm)
            clipped.append(was_clipped)
            if (i + 1) % settings.divergence_check_every == 0 or i + 1 == len(spans):
                bad = ~(loss_max < loss_limit) & alive
                if bool(bad.any()):
                    for pos in bad.nonzero().flatten().tolist():
                        s = slots[pos]
                        diverged[pos] = {"epoch": s.epoch + 1, "step": s.step + i + 1,
                                         "loss": float(loss_max[pos].item())}
                        alive[pos] = False
                        self._freeze(pos)
            if on_step is not None:
                on_step(i + 1, len(spans))
        del x_all, y_all
        for p in plan.state.params:
            p.grad = None
        n_steps = len(spans)
        val_loss, val_acc = self._evaluate(skeleton, k)
        seconds = time.perf_counter() - t0
        norm_t = torch.stack(norms).float().cpu() if norms else torch.zeros(1, k)
        clip_t = torch.stack(clipped).float().cpu() if clipped else torch.zeros(1, k)
        sums, last_lrs = loss_sum.tolist(), lrs.tolist()
        out_by_slot: dict[Hashable, SlotEpoch] = {}
        for pos, s in enumerate(slots):
            s.seconds += seconds
            if pos not in diverged and not math.isfinite(val_loss[pos]):
                diverged[pos] = {"epoch": s.epoch + 1, "step": s.step + n_steps, "loss": val_loss[pos]}
                self._freeze(pos)
            if pos in diverged:
                s.diverged_at = diverged[pos]
                s.step = int(diverged[pos]["step"])
                out_by_slot[s.key] = SlotEpoch(None, finished=True, diverged=True)
                continue
            s.epoch += 1
            s.step += n_steps
            s.last_lr = last_lrs[pos]
            record = epoch_record(s.epoch, sums[pos], n_steps, val_loss[pos], val_acc[pos], last_lrs[pos], seconds,
                                  norm_t[:, pos], clip_t[:, pos])
            s.history.append(record.to_dict())
            out_by_slot[s.key] = SlotEpoch(record, finished=s.epoch >= s.params.training.epochs)
        return out_by_slot

    def _plan(self, slots: list[_Slot]) -> _Plan:
        st = self._stack
        params = [st["p." + n] for n in self.param_names]
        state = AdamState(params, [], [st["m." + n] for n in self.param_names],
                          [st["v." + n] for n in self.param_names],
                          [st["x." + n] for n in self.param_names] if self._amsgrad else None)
        opts = [s.params.optimizer for s in slots]
        clips = [s.params.clipping.mode for s in slots]
        return _Plan(state=state, rows=torch.arange(len(slots), device=self.device),
                     coupled=any(o.name == "adam" and o.weight_decay != 0 for o in opts),
                     decay=any(o.name == "adamw" and o.weight_decay != 0 for o in opts),
                     norm="norm" in clips, value="value" in clips)

    def _step(self, skeleton: nn.Module, plan: _Plan, xb: torch.Tensor,
              yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step of every slot on its batch (xb: B × K·C × H × W, yb: K × B). Returns each
        slot's (lr, loss, gradient norm before clipping, clipped) as [K] tensors on the device."""
        st, state, rows = self._stack, plan.state, plan.rows
        k, b = yb.shape
        index = st["step"].clamp(max=st["t.lr"].shape[1] - 1)
        lrs = st["t.lr"][rows, index]
        self._bind(skeleton)
        for p in state.params:
            p.grad = None
        with _autocast(self.device, self.settings):
            out = skeleton(xb)
        logits = out.float().view(b, k, self.data.num_classes).transpose(0, 1).contiguous()  # K × B × classes
        losses = _slot_losses(logits, yb, "mean", self.exact)  # K
        losses.sum().backward()
        state.grads = [p.grad for p in state.params]  # type: ignore[misc]
        with torch.no_grad():
            norm, was_clipped = packed_clip(state.grads, st["h.clip_norm"] if plan.norm else None,
                                            st["h.clip_value"] if plan.value else None)
            packed_adam_step(
                state, one_minus_beta1=st["h.w1"], beta2=st["h.b2"], one_minus_beta2=st["h.c2"], eps=st["h.eps"],
                step_size=st["t.step_size"][rows, index], bc2_sqrt=st["t.bc2_sqrt"][rows, index],
                coupled_wd=st["h.wd"] if plan.coupled else None,
                decay=st["t.decay"][rows, index] if plan.decay else None,
                amsgrad=st["h.ams"] if self._amsgrad else None)
            st["step"] += 1
        return lrs, losses.detach(), norm, was_clipped

    def probe(self, steps: int = 3) -> float:
        """Seconds per training step of this pack on its live slots (warm-up step excluded), on the
        first batch of the data. It trains the slots: probe throwaway trials (`pack_size`)."""
        self._restack()
        slots = [self.slots[k] for k in self._order]
        k = len(slots)
        skeleton = self._skeleton(k)
        skeleton.train()
        plan = self._plan(slots)
        data, b = self.data, min(self.training.batch_size, len(self.data.y_train))
        xb = normalize(torch.cat([data.x_train[:b]] * k, dim=1), data.mean.repeat(1, k, 1, 1),
                       data.std.repeat(1, k, 1, 1))
        yb = data.y_train[:b].expand(k, b)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self._step(skeleton, plan, xb, yb)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self._step(skeleton, plan, xb, yb)
        sync()
        return (time.perf_counter() - t0) / max(1, steps)

    def _evaluate(self, skeleton: nn.Module, k: int, x: torch.Tensor | None = None,
                  y: torch.Tensor | None = None) -> tuple[list[float], list[float]]:
        """Per slot (mean loss, accuracy) on the validation split (or x, y), as `train.evaluate`."""
        data, settings = self.data, self.settings
        x = data.x_val if x is None else x
        y = data.y_val if y is None else y
        skeleton.eval()
        total_loss = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        self._bind(skeleton)
        with torch.inference_mode(), _autocast(self.device, settings):
            for xb, yb in eval_batches(x, y, data, EVAL_BATCH, pad=settings.static_shapes):
                xk = torch.cat([xb] * k, dim=1).contiguous(memory_format=torch.channels_last)
                out = skeleton(xk)[:len(yb)].float().view(len(yb), k, data.num_classes).transpose(0, 1).contiguous()
                target = yb.expand(k, len(yb))
                total_loss += _slot_losses(out, target, "sum", self.exact)
                correct += (out.argmax(2) == target).sum(1)
        skeleton.train()
        count = max(1, len(y))
        return [v / count for v in total_loss.tolist()], [v / count for v in correct.tolist()]

    # -- per slot: model, checkpoint, result -----------------------------------------------------

    def model(self, key: Hashable) -> nn.Module:
        """A standalone model (the trial's architecture) holding the slot's weights and buffers."""
        slot = self.slots[key]
        model = copy.deepcopy(self.template)
        model.load_state_dict(self._state_dict(slot))
        return model

    def _state_dict(self, slot: _Slot) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for name in self.param_names:
            sd[name] = self._get(slot, "p." + name).detach()
        for name in self.buffer_names:
            sd[name] = self._get(slot, "b." + name).detach()
        done = slot.step - slot.step_at_add
        for name in self.counter_names:
            sd[name] = torch.tensor(slot.batches_tracked[name] + done, dtype=torch.long)
        return sd

    def optimizer(self, key: Hashable, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """A `torch.optim.Adam`/`AdamW` over `model`'s parameters (default: a new `model(key)`) holding
        the slot's Adam state, as `train.train`'s optimizer would hold it after the same steps."""
        slot = self.slots[key]
        model = model if model is not None else self.model(key)
        opt = build_optimizer(model.parameters(), slot.params.optimizer, self.device, fused=self.settings.fused_adam)
        group = opt.param_groups[0]
        group["lr"] = slot.last_lr
        if slot.step == 0:
            return opt
        fused = bool(group.get("fused")) or bool(group.get("capturable"))
        for name, p in zip(self.param_names, group["params"]):
            like_p = lambda t, p=p: torch.empty_like(p).copy_(t.detach().view(p.shape))  # noqa: E731 - p's layout
            state: dict[str, torch.Tensor] = {
                "step": torch.tensor(float(slot.step), dtype=torch.float32, device=self.device if fused else "cpu"),
                "exp_avg": like_p(self._get(slot, "m." + name)),
                "exp_avg_sq": like_p(self._get(slot, "v." + name)),
            }
            if slot.params.optimizer.amsgrad:
                state["max_exp_avg_sq"] = like_p(self._get(slot, "x." + name))
            opt.state[p] = state
        return opt

    def save_checkpoint(self, key: Hashable, path: str | Path) -> None:
        """The slot's state in `train.save_checkpoint`'s format: `train.train(resume_from=path)` and
        `Pack.add(resume_from=path)` both resume it."""
        slot = self.slots[key]
        model = self.model(key)
        save_checkpoint(path, params=slot.params, model=model, optimizer=self.optimizer(key, model),
                        generator=slot.generator, epoch=slot.epoch, step=slot.step, history=slot.history)

    def result(self, key: Hashable, *, evaluate_test: bool = False, keep_model: bool = False) -> TrainResult:
        """The slot's outcome as `train.train` returns it: "diverged", "completed" (all epochs) or
        "stopped" (taken out earlier, e.g. pruned)."""
        slot = self.slots[key]
        if slot.diverged_at is not None:
            outcome = "diverged"
        elif slot.epoch >= slot.params.training.epochs:
            outcome = "completed"
        else:
            outcome = "stopped"
        result = TrainResult(outcome=outcome, history=list(slot.history), epochs=len(slot.history),
                             seconds=slot.seconds, device=str(self.device), resumed_from_epoch=slot.resumed_from,
                             diverged_at=slot.diverged_at)
        if slot.history:
            result.val_accuracy = slot.history[-1]["val_accuracy"]
            result.val_loss = slot.history[-1]["val_loss"]
        if evaluate_test or keep_model:
            from tuner.training.train import evaluate

            model = self.model(key)
            if evaluate_test and outcome != "diverged":
                result.test_loss, result.test_accuracy = evaluate(model, model, self.data.x_test, self.data.y_test,
                                                                  self.data, self.settings)
            if keep_model:
                result.model = model
        return result


def _slot_losses(logits: torch.Tensor, target: torch.Tensor, reduction: str, exact: bool) -> torch.Tensor:
    """Per slot cross-entropy of K × B × classes logits: the batch mean ("mean") or sum ("sum"), [K].
    `exact` makes one `F.cross_entropy` call per slot, which reduces over the batch in the order it
    does for one model (bitwise `train.py`'s loss); otherwise one call for all slots, whose batch
    reduction may differ in the last bit."""
    if exact:
        return torch.stack([F.cross_entropy(x, y, reduction=reduction) for x, y in zip(logits, target)])
    k, b, classes = logits.shape
    per_image = F.cross_entropy(logits.reshape(k * b, classes), target.reshape(-1), reduction="none").view(k, b)
    return per_image.mean(1) if reduction == "mean" else per_image.sum(1)


def _moment(state: dict[str, Any], name: str, like: torch.Tensor) -> torch.Tensor:
    """An Adam moment from a checkpoint's optimizer state (zeros for a fresh trial), in `like`'s layout
    (as torch's Adam allocates it)."""
    if name in state:
        return torch.empty_like(like).copy_(state[name].detach().reshape(like.shape))
    return torch.zeros_like(like)


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack tensors along a new first dimension, each row keeping the memory layout of the first
    (a channels_last conv weight stays channels_last per slot: reductions over a slot's tensor then
    run in one model's memory order, and [K, Cout, ...] still views as a channels_last
    [K × Cout, ...] weight)."""
    first = rows[0]
    if first.dim() == 4 and not first.is_contiguous() and first.is_contiguous(memory_format=torch.channels_last):
        o, i, h, w = first.shape
        out = torch.empty((len(rows), o, h, w, i), dtype=first.dtype, device=first.device).permute(0, 1, 4, 2, 3)
        for n, row in enumerate(rows):
            out[n].copy_(row)
        return out
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# How many trials per pack
# ---------------------------------------------------------------------------------------------

AUTO_CAP = 32  # the most trials `auto` packs
AUTO_GAIN = 1.1  # `auto` doubles K while trial-steps per second grow by at least this factor
MEMORY_SHARE = 0.8  # of the free device memory a pack may plan to use
CPU_NOTE = ("packing does not pay on the CPU (2 cores: the grouped model runs no faster than the trials one "
            "after another; see the README, Trial packing)")


def pack_size(setting: int | str, training: TrainingParams, data: DeviceData,
              settings: DeviceSettings | None = None) -> tuple[int, str]:
    """(trials per pack, why) for a worker: `setting` is the study's or the flag's `pack` (a number,
    or "auto": 1 on the CPU, on CUDA sized from free memory and a short probe, see `auto_size`).
    Models that cannot be packed, and compiled runs, get 1 with the reason."""
    if setting == 1:
        return 1, "pack: 1 (packing off)"
    ok, why = packable(training.model)
    if not ok:
        return 1, why
    if training.compile and data.device.type == "cuda":
        return 1, "compile: true: compiled models are not packed"
    if setting != "auto":
        return int(setting), f"pack: {setting}"
    if data.device.type != "cuda":
        return 1, f"pack: auto: {CPU_NOTE}"
    return cuda_auto_size(training, data, settings)


def _probe_trials(training: TrainingParams, k: int) -> list[TrialParams]:
    return [TrialParams(training=TrainingParams(**{**training.__dict__, "seed": i})) for i in range(k)]


def cuda_auto_size(training: TrainingParams, data: DeviceData,
                   settings: DeviceSettings | None = None) -> tuple[int, str]:
    """`auto` on CUDA: measure one trial's memory (weights, Adam state and one step's activations)
    and its steps per second, then double K while the free memory (`torch.cuda.mem_get_info`) allows
    it and trial-steps per second keep growing; an out-of-memory probe stops at the K before."""
    device = data.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)

    def seconds_per_step(k: int) -> float:
        pack = Pack(data, k, training, settings=settings)
        for i, params in enumerate(_probe_trials(training, k)):
            pack.add(i, params)
        try:
            return pack.probe()
        finally:
            del pack
            torch.cuda.empty_cache()

    try:
        one = seconds_per_step(1)
    except torch.cuda.OutOfMemoryError:
        return 1, "pack: auto: one trial alone fills the GPU"
    per_trial = max(1, torch.cuda.max_memory_allocated(device) - base)
    k, why = auto_size(seconds_per_step, one_step=one, per_trial_bytes=per_trial, free_bytes=free)
    return k, why


def auto_size(seconds_per_step: Callable[[int], float], *, one_step: float, per_trial_bytes: int,
              free_bytes: int, cap: int = AUTO_CAP, gain: float = AUTO_GAIN) -> tuple[int, str]:
    """The doubling search of `auto`: K = 2, 4, 8, ... up to `cap` and to what MEMORY_SHARE of the free
    memory holds at `per_trial_bytes` each, kept while K / seconds_per_step(K) beats the best so far
    by `gain`. A probe that runs out of memory (torch.cuda.OutOfMemoryError, or any error saying
    "out of memory") ends the search at the K before it."""
    fits = max(1, int(MEMORY_SHARE * free_bytes // max(1, per_trial_bytes)))
    best_k, best_rate = 1, 1.0 / max(one_step, 1e-9)
    stopped = ""
    k = 2
    while k <= min(cap, fits):
        try:
            rate = k / max(seconds_per_step(k), 1e-9)
        except Exception as exc:  # noqa: BLE001 - only an out-of-memory error ends the search quietly
            if "out of memory" not in str(exc).lower() and not _is_oom(exc):
                raise
            stopped = f"; {k} ran out of memory"
            break
        if rate < gain * best_rate:
            break
        best_k, best_rate = k, rate
        k *= 2
    mib = per_trial_bytes / 2**20
    return best_k, (f"pack: auto: {best_k} trials per pack ({best_rate * one_step:.2f}x one trial's steps per "
                    f"second; {mib:.0f} MiB per trial, {free_bytes / 2**30:.1f} GiB free, room for {fits}{stopped})")


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def train_packed(trials: Iterable[TrialParams], data: DeviceData, *, capacity: int | None = None,
                 settings: DeviceSettings | None = None) -> list[TrainResult]:
    """Train `trials` (one study: the same model and batch size) in packs of `capacity` (default: all
    at once), refilling freed slots; each result as `train.train` would return it."""
    trials = list(trials)
    if not trials:
        return []
    pack = Pack(data, capacity or len(trials), trials[0].training, settings=settings)
    results: dict[int, TrainResult] = {}
    queue = list(enumerate(trials))
    while queue or len(pack):
        while queue and pack.free > 0:
            index, params = queue.pop(0)
            pack.add(index, params)
        for key, out in pack.run_epoch().items():
            if out.finished:
                results[int(key)] = pack.result(key)  # type: ignore[call-overload]
                pack.remove(key)
    return [results[i] for i in range(len(trials))]
