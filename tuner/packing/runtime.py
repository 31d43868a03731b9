"""The pack at run time: K trials' stacked weights, Adam state and data order, trained one epoch
at a time (the epoch-engine interface of tuner.training.train), with per-slot records, divergence,
checkpoints and results."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuner.packing.adam import AdamState, adam_tables, packed_adam_step, packed_clip
from tuner.packing.modules import check_structure, packable, packed_model, packed_shape
from tuner.study.params import TrainingParams, TrialParams
from tuner.training.data import DeviceData, batch_spans, epoch_images, eval_batches, normalize
from tuner.training.optim import build_optimizer
from tuner.training.train import (
    DIVERGENCE_FACTOR,
    EVAL_BATCH,
    DeviceSettings,
    SlotEpoch,
    TrainResult,
    TrialProgress,
    autocast,
    device_settings,
    epoch_record,
    epoch_steps,
    evaluate,
    initial_model,
    load_checkpoint,
    restore_generator,
    retain_cpu_memory,
    save_checkpoint,
)

# ---------------------------------------------------------------------------------------------
# The pack
# ---------------------------------------------------------------------------------------------

class PackError(ValueError):
    """A trial that cannot join this pack (full, another model or batch size, not packable)."""


@dataclass
class _Plan:
    """What every step of one epoch needs: the stacked tensors and which optional ops any slot uses."""

    state: AdamState
    rows: torch.Tensor
    coupled: bool  # some slot is Adam with weight decay (the L2 term in the gradient)
    decay: bool  # some slot is AdamW with weight decay
    norm: bool  # some slot clips by norm
    value: bool  # some slot clips by value


@dataclass(kw_only=True)
class _Slot(TrialProgress):
    """A trial in the pack: its epoch accounting (TrialProgress) and where its tensors are."""

    key: Hashable
    generator: torch.Generator
    steps_per_epoch: int
    own: dict[str, torch.Tensor] | None = None  # its tensors while it is not in the stack
    batches_tracked: dict[str, int] = field(default_factory=dict)  # batch norms' counters at `add`
    step_at_add: int = 0


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
        check_structure(self.template)
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
            restore_generator(gen, state["rng_data"], t.seed, int(state["epoch"]))
            slot.resume(state)
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
        own.update(self._scalars(params.at_epoch(slot.epoch)))
        own.update(self._tables(params, spe))
        own["step"] = torch.tensor(slot.step, dtype=torch.long, device=self.device)
        slot.own = own
        self.slots[key] = slot

    def _scalars(self, params: TrialParams) -> dict[str, torch.Tensor]:
        """A slot's hyperparameters (the values in force: `params.at_epoch(...)`) as 0-d tensors, float32
        like torch casts."""
        opt, clip, dev = params.optimizer, params.clipping, self.device
        f32 = lambda v: torch.tensor(float(v), dtype=torch.float64).to(dev, torch.float32)  # noqa: E731
        inf = math.inf
        return {
            "h.w1": f32(1 - opt.betas[0]), "h.b2": f32(opt.betas[1]), "h.c2": f32(1 - opt.betas[1]),
            "h.eps": f32(opt.eps), "h.wd": f32(opt.weight_decay if opt.name == "adam" else 0.0),
            "h.ams": torch.tensor(bool(opt.amsgrad), device=dev),
            "h.clip_norm": f32(clip.threshold if clip.mode == "norm" else inf),
            "h.clip_value": f32(clip.threshold if clip.mode == "value" else inf),
        }

    def _tables(self, params: TrialParams, steps_per_epoch: int) -> dict[str, torch.Tensor]:
        """A slot's per-step tables (lr, step size, bias correction, AdamW decay), intervals applied."""
        dev = self.device
        tables = adam_tables(params, params.training.epochs * steps_per_epoch, steps_per_epoch)
        return {
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
            setattr(mods[owner], attr, t.view(packed_shape(t)) if t.dim() > 2 else t.view(-1))
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
        drawn = [epoch_images(data, s.generator, s.params.training.augmentation) for s in slots]
        x_all = torch.stack([x.permute(0, 2, 3, 1) for x, _ in drawn], dim=3)  # N × H × W × K × C
        n, h, w = x_all.shape[:3]
        x_all = x_all.reshape(n, h, w, k * data.in_channels)
        y_all = torch.stack([y for _, y in drawn])  # K × N
        del drawn
        mean, std = data.mean.repeat(1, k, 1, 1), data.std.repeat(1, k, 1, 1)
        spans = batch_spans(n, batch_size, drop_last=settings.static_shapes)

        for pos, s in enumerate(slots):  # an interval that begins now: its values into the slot's row
            if s.params.intervals:
                for name, value in self._scalars(s.params.at_epoch(s.epoch)).items():
                    self._stack[name][pos] = value
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
                out_by_slot[s.key] = s.diverge(diverged[pos])
                continue
            record = epoch_record(s.epoch + 1, sums[pos], n_steps, val_loss[pos], val_acc[pos], last_lrs[pos],
                                  seconds, norm_t[:, pos], clip_t[:, pos])
            out_by_slot[s.key] = s.advance(record, n_steps)
        return out_by_slot

    def _plan(self, slots: list[_Slot]) -> _Plan:
        st = self._stack
        params = [st["p." + n] for n in self.param_names]
        state = AdamState(params, [], [st["m." + n] for n in self.param_names],
                          [st["v." + n] for n in self.param_names],
                          [st["x." + n] for n in self.param_names] if self._amsgrad else None)
        opts = [s.params.at_epoch(s.epoch).optimizer for s in slots]
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
        with autocast(self.device, self.settings):
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
        with torch.inference_mode(), autocast(self.device, settings):
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
        in_force = slot.params.at_epoch(max(0, slot.epoch - 1)).optimizer  # the last epoch's values, as train's
        opt = build_optimizer(model.parameters(), in_force, self.device, fused=self.settings.fused_adam)
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

    def result(self, key: Hashable, *, outcome: str | None = None, evaluate_test: bool = False,
               keep_model: bool = False) -> TrainResult:
        """The slot's outcome as `train.train` returns it (TrialProgress.result)."""
        result = self.slots[key].result(self.device, outcome)
        if evaluate_test or keep_model:
            model = self.model(key)
            if evaluate_test and result.outcome != "diverged":
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
