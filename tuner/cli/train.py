"""`tuner train PARAMS_FILE`: one training run from a params file (or an exported best config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuner.cli.app import app
from tuner.cli.common import DataDirOpt, DatasetOpt, Debug, DeviceOpt, interactive, say
from tuner.errors import DivergedError
from tuner.study.params import check_override, check_training_model, load_params

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from tuner.training.train import EpochRecord


@app.command("train")
def train_command(
    params_file: Annotated[Path, typer.Argument(help="Params YAML (the format `tuner export` writes).")],
    dataset: DatasetOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override training.epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Override training.batch_size.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override training.seed.")] = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Save the full state here every epoch; resume from it if it exists.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of lines.")] = False,
    debug: Debug = False,
) -> None:
    """Train one model with the params file's Adam settings; report val accuracy per epoch and the
    final test accuracy."""
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        check_override(name, value)
    check_override("--seed", seed, ge=0)
    params = load_params(params_file, check_model=False).with_training(dataset=dataset, epochs=epochs,
                                                                       batch_size=batch_size, seed=seed)

    check_training_model(params.training, file=str(params_file), data_dir=data_dir)  # a model reference
    from tuner.training.data import load_dataset  # torch: only once the params file is known to be good
    from tuner.training.train import load_checkpoint, resolve_device, train  # torch: only when training

    dev = resolve_device(device)
    data = load_dataset(params.training.dataset, dev, data_dir=data_dir,
                        val_fraction=params.training.val_fraction, image_size=params.training.image_size)
    resume = None
    if checkpoint is not None and checkpoint.exists():
        load_checkpoint(checkpoint, params)  # fails early, with one line, if it is corrupt or foreign
        resume = checkpoint
    t = params.training
    if not as_json:
        say(f"training {t.model} on {data.name} ({len(data.y_train)} train / {len(data.y_val)} val / "
            f"{len(data.y_test)} test) on {dev}: {params.optimizer.name} lr={params.optimizer.lr:g} "
            f"{params.schedule.name} schedule, {t.epochs} epochs, batch {t.batch_size}")

    progress = _Progress(t.epochs, enabled=not as_json and interactive())

    def on_epoch(rec: EpochRecord) -> bool:
        line = (f"epoch {rec.epoch}/{t.epochs}  train_loss {rec.train_loss:.4f}  val_loss {rec.val_loss:.4f}  "
                f"val_acc {rec.val_accuracy:.4f}  lr {rec.lr:.3g}  grad_p90 {rec.grad_norm_p90:.3g}  "
                f"clipped {rec.clip_fraction:.0%}  {rec.seconds:.1f}s")
        progress.epoch_done(line) if progress.enabled else (None if as_json else say(line))
        return False

    with progress:
        result = train(params, data, on_epoch=on_epoch, checkpoint_path=checkpoint, resume_from=resume,
                       evaluate_test=True, on_step=progress.step if progress.enabled else None)
    if result.outcome == "diverged":
        at = result.diverged_at or {}
        raise DivergedError(f"training diverged: loss {at.get('loss'):.3g} at epoch {at.get('epoch')}, "
                            f"step {at.get('step')} with lr={params.optimizer.lr:g}; lower the learning rate "
                            "or enable clipping")
    if as_json:
        out = result.to_dict()
        out["params"] = params.to_dict()
        print(json.dumps(out))
        return
    if result.resumed_from_epoch:
        say(f"resumed from epoch {result.resumed_from_epoch} ({checkpoint})")
    say(f"test_accuracy {result.test_accuracy:.4f}  val_accuracy {result.val_accuracy:.4f}  "
        f"epochs {result.epochs}  {result.seconds:.1f}s")


class _Progress:
    """A Rich progress bar over the steps of all epochs, on a terminal only."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn  # ~20 ms: a bar only

            self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("epoch 1", total=None)
        return self

    def step(self, i: int, per_epoch: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=per_epoch * self.epochs, advance=1)

    def epoch_done(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


