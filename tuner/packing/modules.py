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
model (see docs/packing.md).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuner.training.models import MODELS, is_reference

PACKABLE_MODELS = ("fastcnn", "fastcnn-wide", "resnet18", "tiny")

# Leaf modules that act on each channel (or each sample) on its own: the same module serves K slots
# whose channels sit side by side.
_CHANNELWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout)


def packable(model_name: str) -> tuple[bool, str]:
    """Whether trials of `model_name` can be packed, and why (or why not)."""
    if is_reference(model_name):
        return False, (f"model {model_name!r} is a model by reference: tuner cannot tell whether its forward "
                       "mixes channels")
    if model_name not in MODELS:
        return False, f"unknown model {model_name!r}"
    if model_name not in PACKABLE_MODELS:
        return False, f"model {model_name!r} has no packed form"
    return True, f"model {model_name!r} packs as grouped convolutions"


def check_structure(model: nn.Module) -> None:
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
    check_structure(template)
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


def packed_shape(t: torch.Tensor) -> tuple[int, ...]:
    """A stacked [K, d0, d1, ...] tensor as the packed module sees it: [K × d0, d1, ...]."""
    return (t.shape[0] * t.shape[1], *t.shape[2:])
