"""The CUDA path, checked on the CPU where a CPU can show it (issue: the CUDA path made correct):
re-initialisation of a compiled model, static shapes under torch.compile, the precision settings,
host syncs per epoch, and a resume across device types. The GPU-only checks are tests/test_cuda.py
and benchmarks/gpu_check.sh."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tuner.study.params import parse_params
from tuner.training import train as engine
from tuner.training.data import load_dataset
from tuner.training.models import MODELS, build_model
from tuner.training.train import (
    EVAL_BATCH,
    device_settings,
    initial_model,
    load_checkpoint,
    save_checkpoint,
    train,
)

CPU = torch.device("cpu")


def make_params(model: str = "tiny", epochs: int = 2, batch_size: int = 32, dataset: str = "synthetic:200",
                **training):
    return parse_params({"training": {"model": model, "epochs": epochs, "batch_size": batch_size,
                                      "dataset": dataset, "seed": 0, **training}})


def compiled_cpu_settings(static: bool = True):
    """What `device_settings` gives a CUDA run with `compile: true`, on the CPU (where tuner does not
    compile by default). The backend is dynamo's "eager" (see `eager_compile`): the graphs and
    recompiles are dynamo's, whatever the backend."""
    return dataclasses.replace(device_settings(CPU, "fp32"), compile=True, static_shapes=static)


@pytest.fixture
def eager_compile(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(engine, "COMPILE_BACKEND", "eager")
    engine._COMPILED.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    engine._COMPILED.clear()
    torch._dynamo.reset()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# 1-3. Re-initialisation of a compiled model equals a fresh build, for every model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_compiled_model_is_reinitialised_exactly_as_a_fresh_build(name, eager_compile):
    data = load_dataset("synthetic:200")
    params = make_params(model=name)
    settings = compiled_cpu_settings()
    torch.manual_seed(0)
    first, fn = engine._model_for(params, data, CPU, settings)
    with torch.no_grad():  # the first trial trains it: every weight and running statistic moves
        for value in first.state_dict().values():
            value.add_(1) if value.is_floating_point() else value.add_(7)
    torch.manual_seed(0)
    again, fn_again = engine._model_for(params, data, CPU, settings)
    assert again is first and fn_again is fn  # the compiled module is reused, not rebuilt
    torch.manual_seed(0)
    fresh = build_model(name, data.num_classes)  # what `tuner train` / `tuner verify` start from
    assert_equal_states(state(again), state(fresh))
    # and channels_last is kept on the reused module's 4-d weights
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in again.parameters() if p.dim() == 4)


def test_resnet18_starts_from_torchvisions_init_in_every_trial(eager_compile):
    """Module.reset_parameters is not torchvision's init (kaiming_uniform(a=√5) instead of
    kaiming_normal(fan_out)): the conv weights of a reused model must keep the fresh build's spread."""
    data = load_dataset("synthetic:200")
    params = make_params(model="resnet18")
    settings = compiled_cpu_settings()
    stds = []
    for _ in range(2):
        torch.manual_seed(0)
        model, _fn = engine._model_for(params, data, CPU, settings)
        stds.append(float(model.layer1[0].conv1.weight.detach().std()))
    fan_out = 64 * 3 * 3
    assert stds[0] == stds[1]
    assert abs(stds[1] - (2 / fan_out) ** 0.5) < 0.005, stds  # kaiming_normal(fan_out): 0.059


def test_two_compiled_trials_with_one_seed_start_equal_and_return_their_own_models(eager_compile):
    data = load_dataset("synthetic:200")
    params = make_params(model="tiny", epochs=1)
    settings = compiled_cpu_settings()
    starts = []
    real = engine._model_for

    def recorded(*args, **kwargs):
        model, fn = real(*args, **kwargs)
        starts.append(state(model))
        return model, fn

    engine._model_for = recorded
    try:
        a = train(params, data, settings=settings)
        b = train(params, data, settings=settings)
    finally:
        engine._model_for = real
    assert_equal_states(starts[0], starts[1])
    torch.manual_seed(0)
    assert_equal_states(starts[0], state(initial_model("tiny", data.num_classes, CPU, settings)))
    # each result owns its model: the second trial did not overwrite the first one's weights
    assert a.model is not b.model
    assert_equal_states(state(a.model), state(b.model))  # same seed, same data: the same training
    with torch.no_grad():
        next(b.model.parameters()).add_(1)
    assert not torch.equal(next(a.model.parameters()), next(b.model.parameters()))


def test_a_failed_compile_is_not_kept(eager_compile, monkeypatch):
    """Inductor compiles at the first call (where a missing C compiler shows): the broken compiled
    module must not be cached for the worker's next trials."""
    data = load_dataset("synthetic:200")
    params = make_params(model="tiny", epochs=1)

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C compiler found (as in a slim image)")

    monkeypatch.setattr(engine, "COMPILE_BACKEND", no_compiler)
    with pytest.raises(RuntimeError, match="no C compiler"):
        train(params, data, settings=compiled_cpu_settings())
    assert engine._COMPILED == {}
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "eager")
    assert train(params, data, settings=compiled_cpu_settings()).outcome == "completed"


# ---------------------------------------------------------------------------------------------
# 11. Static shapes: a bounded number of compiled graphs, whatever the batch arithmetic
# ---------------------------------------------------------------------------------------------

def _graphs(counters) -> int:
    return int(counters["stats"]["unique_graphs"])


def test_static_shapes_compile_one_training_and_one_evaluation_graph(eager_compile):
    counters = eager_compile
    # 540 training images at batch 64 leave a partial batch of 28; 60 validation and 1,000 test
    # images are each one partial evaluation batch of other sizes
    data = load_dataset("synthetic:600")
    assert len(data.y_train) % 64 and len(data.y_val) < EVAL_BATCH and len(data.y_test) < EVAL_BATCH
    params = make_params(epochs=2, batch_size=64, dataset="synthetic:600")
    train(params, data, settings=compiled_cpu_settings(), evaluate_test=True)
    after_one = _graphs(counters)
    train(params, data, settings=compiled_cpu_settings(), evaluate_test=True)  # a worker's next trial
    assert _graphs(counters) == after_one  # nothing new for later trials
    assert after_one <= 2, dict(counters["stats"])  # training mode and eval mode


def test_without_static_shapes_the_partial_batches_compile_more_graphs(eager_compile):
    """The control: the same run with dynamic batch sizes compiles more (what static shapes avoid)."""
    counters = eager_compile
    data = load_dataset("synthetic:600")
    params = make_params(epochs=1, batch_size=64, dataset="synthetic:600")
    train(params, data, settings=compiled_cpu_settings(static=False), evaluate_test=True)
    assert _graphs(counters) > 2, dict(counters["stats"])


def test_static_shapes_drop_the_partial_training_batch_and_score_only_real_rows():
    data = load_dataset("synthetic:600")
    params = make_params(epochs=1, batch_size=64, dataset="synthetic:600")
    static = dataclasses.replace(device_settings(CPU, "fp32"), static_shapes=True)
    result = train(params, data, settings=static)
    # 540 images: 8 full batches, the 28 left over are dropped (another epoch's shuffle has them)
    assert engine._steps_per_epoch(540, 64, drop_last=True) == 8
    assert engine._steps_per_epoch(540, 64) == 9
    # padded evaluation scores the same as unpadded: padding rows are not counted
    torch.manual_seed(0)
    model = result.model
    plain = engine.evaluate(model, model, data.x_val, data.y_val, data, device_settings(CPU, "fp32"))
    padded = engine.evaluate(model, model, data.x_val, data.y_val, data, static)
    assert padded[1] == plain[1] and padded[0] == pytest.approx(plain[0], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 9-10. One settings helper keyed on precision and device
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
@pytest.mark.parametrize("bf16_native", [True, False])
def test_device_settings_for_every_precision_and_device(device, precision, bf16_native):
    s = device_settings(torch.device(device), precision, compile=True, bf16_supported=bf16_native)
    cuda = device == "cuda"
    expected = {("fp32", True): None, ("bf16", True): torch.bfloat16,
                ("auto", True): torch.bfloat16 if bf16_native else None,
                ("fp32", False): None, ("bf16", False): torch.bfloat16, ("auto", False): None}
    assert s.autocast_dtype == expected[precision, cuda]
    assert s.tf32 is (cuda and precision != "fp32")  # "fp32" is IEEE float32, not TF32
    assert s.compile is cuda and s.static_shapes is cuda
    assert s.fused_adam is cuda and s.cudnn_benchmark is cuda


def test_settings_apply_sets_tf32_from_the_precision_and_leaves_the_cpu_alone():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark)
    try:
        device_settings(torch.device("cuda"), "fp32", bf16_supported=True).apply(torch.device("cuda"))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert torch.backends.cudnn.benchmark is True
        device_settings(torch.device("cuda"), "bf16", bf16_supported=True).apply(torch.device("cuda"))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        matmul.fp32_precision = "ieee"
        device_settings(CPU, "auto").apply(CPU)  # a CPU run changes no CUDA flag
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark = before


def test_auto_precision_does_not_count_emulated_bf16(monkeypatch):
    """V100 and T4 emulate bf16 (slower than float32): `auto` must not pick it there."""
    calls = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return including_emulation  # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert engine.bf16_native() is False and calls == [False]
    assert device_settings(torch.device("cuda"), "auto").autocast_dtype is None


def test_a_malformed_device_is_a_usage_error():
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        engine.resolve_device("gpu:0")
    assert info.value.exit_code == 2 and "--device" in str(info.value)


# ---------------------------------------------------------------------------------------------
# 16. Host syncs per epoch: one loss read every 16 steps on CUDA, plus a few per epoch
# ---------------------------------------------------------------------------------------------

def _host_reads(params, data, settings) -> int:
    """Reads of a device value by the host (`.item()`, `.cpu()` of a scalar, `float(t)`): on CUDA
    each one is a sync. On the CPU they show as aten::_local_scalar_dense in the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(params, data, settings=settings)

    def in_optimizer(event) -> bool:  # Adam's own reads on the CPU (fused CUDA Adam makes none)
        while event is not None:
            if event.name.startswith("Optimizer."):
                return True
            event = event.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense" and not in_optimizer(e))


def test_the_cuda_step_loop_reads_the_loss_once_every_16_steps():
    data = load_dataset("synthetic:2000")
    params = make_params(epochs=1, batch_size=16, dataset="synthetic:2000")
    steps = engine._steps_per_epoch(len(data.y_train), 16)
    assert steps >= 100
    cuda_like = dataclasses.replace(device_settings(CPU, "fp32"), divergence_check_every=16, fused_adam=True)
    reads = _host_reads(params, data, cuda_like)
    per_epoch = 12  # loss sum and max, val loss and accuracy, 4 gradient-norm quantiles, clip fraction
    assert reads <= steps // 16 + per_epoch, (reads, steps)
    # the CPU's own setting (a read every step, which costs nothing there) is what the probe sees
    assert _host_reads(params, data, device_settings(CPU, "fp32")) >= steps


# ---------------------------------------------------------------------------------------------
# 6. A checkpoint resumes on another device type
# ---------------------------------------------------------------------------------------------

def _as_if_saved_on_cuda(path: Path) -> None:
    """Rewrite a CPU checkpoint the way a CUDA run writes it: a CUDA data generator's state (16
    bytes: seed and offset) and fused-Adam flags in the optimizer state."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["rng_data"] = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    saved["rng_cuda"] = saved["rng_data"].clone()
    for group in saved["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=None, capturable=False)
    torch.save(saved, path)


def test_a_checkpoint_written_on_cuda_resumes_on_a_cpu(tmp_path):
    data = load_dataset("synthetic:200")
    params = make_params(epochs=3)
    ckpt = tmp_path / "ckpt.pt"
    first = train(params, data, checkpoint_path=ckpt, checkpoint_when=lambda rec: rec.epoch == 1,
                  on_epoch=lambda rec: rec.epoch == 1)
    assert first.outcome == "stopped" and load_checkpoint(ckpt, params)["epoch"] == 1
    exact = train(params, data, resume_from=ckpt)  # same device type: the exact continuation
    _as_if_saved_on_cuda(ckpt)
    with pytest.raises(RuntimeError):  # what made such a trial FAIL before
        torch.Generator().set_state(load_checkpoint(ckpt, params)["rng_data"])
    moved = train(params, data, resume_from=ckpt)
    assert moved.outcome == "completed" and moved.resumed_from_epoch == 1 and moved.epochs == 3
    # the weights and Adam state carry over (epoch 1 is the checkpoint's); the data order after it
    # comes from a generator seeded by (seed, epoch), so epochs 2-3 differ from the exact resume
    assert moved.history[0] == exact.history[0]
    assert [r["epoch"] for r in moved.history] == [1, 2, 3]


def test_the_optimizer_state_takes_the_flags_of_the_device_that_loads_it():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0].update(fused=True, foreach=None)
    fixed = engine.optimizer_state_for(optimizer, saved)
    assert fixed["param_groups"][0]["fused"] in (None, False) and fixed["param_groups"][0]["foreach"] is True
    assert saved["param_groups"][0]["fused"] is True  # the checkpoint's own dict is not changed
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    fresh.load_state_dict(fixed)
    fresh.step()  # loads and steps on the CPU


def test_save_checkpoint_keeps_working_with_the_settings_helper(tmp_path):
    """A checkpoint's params are checked on resume: a resume with other precision is refused."""
    data = load_dataset("synthetic:200")
    params = make_params(epochs=1)
    result = train(params, data)
    opt = torch.optim.Adam(result.model.parameters())
    save_checkpoint(tmp_path / "c.pt", params=params, model=result.model, optimizer=opt,
                    generator=torch.Generator(), epoch=1, step=6, history=result.history)
    other = make_params(epochs=1, precision="bf16")
    from tuner.errors import CheckpointError

    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "c.pt", other)
