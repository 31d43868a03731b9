"""The CUDA path, on a GPU only (skipped with a reason elsewhere, so never run in CI): the fused
Adam/AdamW kernels the engine uses on CUDA against the foreach implementation across the optimizer
knobs and clipping modes; host syncs per epoch; the initial weights of compiled trials; resume
against an uninterrupted run. `benchmarks/gpu_check.sh` runs this file on a GPU machine; by hand:
`python -m pytest -q tests/test_cuda.py` (or `-m cuda`). Nothing here is timed."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks.gpu_check import count_syncs
from tuner.study.params import ClippingParams, OptimizerParams, TrialParams, parse_params
from tuner.training.data import load_dataset
from tuner.training.models import build_model
from tuner.training.optim import OPTIMIZER_CLASSES, build_optimizer, clip_gradients
from tuner.training.train import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (benchmarks/gpu_check.sh runs it on a GPU machine)"),
]

CUDA = torch.device("cuda")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (resume test); read at first use


def make_params(epochs: int = 2, **sections: dict[str, Any]) -> TrialParams:
    training = {"model": "tiny", "epochs": epochs, "batch_size": 64, "dataset": "synthetic", "seed": 0,
                **sections.pop("training", {})}
    return parse_params({"training": training, **sections})


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights, by name (a compiled wrapper's `_orig_mod.` prefix dropped)."""
    return {k.removeprefix("_orig_mod."): v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Fused Adam
# ---------------------------------------------------------------------------------------------

CLIPS = {"none": ClippingParams(), "norm": ClippingParams("norm", 0.05), "value": ClippingParams("value", 1e-3)}


@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_adam_matches_foreach(name: str, amsgrad: bool, weight_decay: float, clip: str) -> None:
    """Six steps of the engine's CUDA optimizer (fused) and of the foreach one on the same
    gradients, clipped by `clip_gradients` as the engine does: same weights and state."""
    opt = OptimizerParams(name=name, lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad)
    torch.manual_seed(0)
    model = build_model("tiny", 10).to(CUDA).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    fused = build_optimizer(model.parameters(), opt, CUDA)
    assert fused.defaults.get("fused") is True, "the engine's CUDA optimizer should be the fused one"
    foreach = OPTIMIZER_CLASSES[name](ref.parameters(), **opt.torch_kwargs(), foreach=True)
    mine, theirs = list(model.parameters()), list(ref.parameters())
    start = [p.detach().clone() for p in mine]
    gen = torch.Generator(device=CUDA).manual_seed(1)
    clipped = []
    for _ in range(6):
        x = torch.randn(32, 3, 32, 32, device=CUDA, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (32,), device=CUDA, generator=gen)
        fused.zero_grad(set_to_none=True)
        foreach.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for p, q in zip(mine, theirs):
            q.grad = p.grad.detach().clone()  # identical gradients: only the optimizers differ
        norm_a, was_a = clip_gradients(mine, CLIPS[clip])
        norm_b, was_b = clip_gradients(theirs, CLIPS[clip])
        assert torch.equal(norm_a, norm_b) and torch.equal(was_a, was_b)
        clipped.append(bool(was_a.item()))
        fused.step()
        foreach.step()
    for p, q in zip(mine, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        a, b = fused.state[p], foreach.state[q]
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-9)
        assert float(a["step"]) == float(b["step"]) == 6
    assert max((p - s).abs().max().item() for p, s in zip(mine, start)) > 1e-3  # the steps moved the weights
    assert any(clipped) == (clip != "none")  # the thresholds are small enough to clip


# ---------------------------------------------------------------------------------------------
# Host syncs
# ---------------------------------------------------------------------------------------------

def test_an_epoch_syncs_about_once_per_16_steps() -> None:
    data = load_dataset("synthetic:5000", CUDA)  # 4,500 training images: 71 steps at batch 64
    steps = math.ceil(len(data.y_train) / 64)
    per_epoch = count_syncs(make_params(epochs=3, clipping={"mode": "norm", "threshold": 1.0}), data)
    assert len(per_epoch) == 3
    # epochs 2 and 3 are steady: the divergence check every 16 steps, plus a few at the epoch's end
    # (loss, gradient-norm stats, validation); the first also holds the trial's set-up
    for n in per_epoch[1:]:
        assert 1 <= n <= steps // 16 + 8, per_epoch


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

def test_two_compiled_trials_with_seed_0_start_from_the_same_weights() -> None:
    """With lr 1e-12 a trial's final weights are its initial ones (Adam moves each weight by about
    lr per step), so the weights the trials return show where they started: the first compiled
    trial builds the module, the second reuses and re-initialises it."""
    from torch._dynamo.utils import counters

    data = load_dataset("synthetic:400", CUDA)  # 360 training images: a partial last batch at 64
    params = make_params(epochs=1, optimizer={"lr": 1e-12}, training={"compile": True})
    counters.clear()
    first = parameters(train(params, data).model)  # a copy now: the next trial may reuse the module
    second = parameters(train(params, data).model)
    assert counters["stats"]["unique_graphs"] >= 1, "the trials were not compiled"
    torch.manual_seed(0)
    fresh = {k: v.detach().to(CUDA) for k, v in build_model("tiny", data.num_classes).named_parameters()}
    assert first.keys() == second.keys() == fresh.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-9, msg=f"{key}: trial 2 vs trial 1")
        torch.testing.assert_close(first[key], fresh[key], rtol=0, atol=1e-9, msg=f"{key}: trial 1 vs a fresh build")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def test_resume_on_cuda_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The CPU test (tests/test_train.py) asks for bit-equality; on CUDA the comparison allows for
    rounding, with cuDNN and PyTorch held to deterministic algorithms."""
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        data = load_dataset("synthetic:1000", CUDA)
        params = make_params(epochs=3, schedule={"name": "step", "gamma": 0.5, "milestones": [0.4]},
                             clipping={"mode": "norm", "threshold": 1.0})
        full = train(params, data, evaluate_test=True)
        full_weights = parameters(full.model)
        assert full.outcome == "completed"

        ckpt = tmp_path / "ckpt.pt"
        first = train(params, data, checkpoint_path=ckpt, on_epoch=lambda rec: rec.epoch == 1)
        assert first.outcome == "stopped" and first.epochs == 1 and ckpt.is_file()
        torch.manual_seed(999)
        torch.cuda.manual_seed_all(999)  # the resumed run must restore the generators itself
        resumed = train(params, data, checkpoint_path=ckpt, resume_from=ckpt, evaluate_test=True)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    assert resumed.outcome == "completed" and resumed.resumed_from_epoch == 1 and resumed.epochs == 3
    assert resumed.history[0] == first.history[0]  # the first epoch's record comes from the checkpoint
    for got, want in zip(resumed.history[1:], full.history[1:]):
        for key in ("train_loss", "val_loss", "lr", "grad_norm_p50", "grad_norm_max"):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), (got["epoch"], key)
        assert abs(got["val_accuracy"] - want["val_accuracy"]) <= 1 / len(data.y_val) + 1e-9
    weights = parameters(resumed.model)
    for key in full_weights:
        torch.testing.assert_close(weights[key], full_weights[key], rtol=1e-3, atol=1e-4, msg=key)
    assert resumed.test_loss == pytest.approx(full.test_loss, rel=1e-3)
