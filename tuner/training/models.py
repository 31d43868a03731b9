"""Models, by name: a small fast CNN (default), ResNet-18 for 32×32, and a tiny net for tests;
or your own, by reference: `package.module:callable` or `path/to/file.py:callable`.

Importing this module does not import torch: the registry's names are what validation needs (a
params file, a study file), and `tuner export` or `tuner --help` should not pay torch's start-up.
The `nn.Module` classes are defined on first use (`build_model`, or `tuner.training.models.FastCNN`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.errors import ConfigError, TunerError

if TYPE_CHECKING:
    from torch import nn

_NETS = ("conv_bn", "FastCNN", "TinyNet")  # defined by `_nets()`, read as module attributes


@cache
def _nets() -> dict[str, Any]:
    """The torch parts of this module, defined once, on first use (torch is imported here)."""
    import torch  # torch: when a net is first built; the read-side commands import this module, not torch
    from torch import nn  # torch: as above

    def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())

    class FastCNN(nn.Module):
        """In the spirit of airbench: a conv-BN stem, then three blocks of (conv-BN, max-pool, conv-BN),
        global max-pool and a scaled linear head. `widths` sets the three block widths; the default
        is sized to train a few epochs on two CPU cores (use (64, 256, 256) on a GPU for ~94%)."""

        def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), stem: int = 24,
                     head_scale: float = 1 / 8, in_channels: int = 3) -> None:
            super().__init__()
            layers: list[nn.Module] = [conv_bn(in_channels, stem)]
            c = stem
            for w in widths:
                layers += [conv_bn(c, w), nn.MaxPool2d(2), conv_bn(w, w)]
                c = w
            self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
            self.head = nn.Linear(c, num_classes, bias=False)
            self.head_scale = head_scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x)) * self.head_scale

    class TinyNet(nn.Module):
        """Two conv layers and a linear head: seconds per epoch on the CPU, for tests."""

        def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, num_classes),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    nets: dict[str, Any] = {"conv_bn": conv_bn, "FastCNN": FastCNN, "TinyNet": TinyNet}
    for name, obj in nets.items():  # importable as tuner.training.models.<name> (pickle, reprs)
        obj.__qualname__ = name
        obj.__module__ = __name__
    return nets


def __getattr__(name: str) -> Any:
    if name in _NETS:
        return _nets()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with a 3×3 stride-1 stem and no max-pool, for 32×32 inputs."""
    from torch import nn  # torch: only when a model is built (this module loads with every command)
    from torchvision.models import resnet18 as tv_resnet18  # torchvision: only for a ResNet-18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


# name -> builder(num_classes, in_channels=3)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "fastcnn": lambda k, in_channels=3: _nets()["FastCNN"](k, in_channels=in_channels),
    "fastcnn-wide": lambda k, in_channels=3: _nets()["FastCNN"](k, widths=(64, 256, 256), stem=24,
                                                                in_channels=in_channels),
    "resnet18": resnet18,
    "tiny": lambda k, in_channels=3: _nets()["TinyNet"](k, in_channels=in_channels),
}

# What a reference's callable may be given, from the dataset, when its signature accepts it.
SHAPE_KWARGS = ("num_classes", "in_channels", "image_size")
IN_PROCESS = "in-process:"  # the stored description of a callable passed to tuner.tune() in this process
_IN_PROCESS: dict[str, Callable[..., Any]] = {}


def is_reference(name: str) -> bool:
    """Whether a `model` value is a reference to a callable (not a registry name)."""
    return ":" in name


def check_reference_syntax(ref: str) -> str | None:
    """Why `ref` is not of the form `package.module:callable`, `path/file.py:callable` or an in-process
    description; None when it is."""
    if ref.startswith(IN_PROCESS):
        return None
    module, _, attr = ref.rpartition(":")
    if not module or not attr:
        return f"{ref!r} is not a reference (package.module:callable or path/to/file.py:callable)"
    if not all(part.isidentifier() for part in attr.split(".")):
        return f"{ref!r}: {attr!r} is not a Python name"
    if not module.endswith(".py") and not all(part.isidentifier() for part in module.split(".")):
        return f"{ref!r}: {module!r} is neither a module name nor a path to a .py file"
    return None


def register_in_process(fn: Callable[..., Any]) -> str:
    """Register a callable passed in-process (tuner.engine.sweep) and return the description stored for it:
    `in-process:module.qualname`, so a notebook cell run again continues the same study (the latest
    callable of that name is the one used)."""
    label = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    ref = f"{IN_PROCESS}{label}"
    _IN_PROCESS[ref] = fn
    return ref


def _load_file(path: Path) -> Any:
    key = f"tuner_user_model_{abs(hash(str(path))):x}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(key, None)
        raise
    return module


def resolve_reference(ref: str) -> Callable[..., Any]:
    """Import the callable named by `ref`. Raises `TunerError` (one line) when that fails: the caller
    decides the exit code (2 when a file is loaded, 1 in a worker on another machine)."""
    if ref.startswith(IN_PROCESS):
        if ref not in _IN_PROCESS:
            raise TunerError(f"model {ref!r} was passed in-process to tuner.tune() and cannot be rebuilt in "
                             "another process; use a reference (package.module:callable or file.py:callable)")
        return _IN_PROCESS[ref]
    problem = check_reference_syntax(ref)
    if problem:
        raise TunerError(problem)
    target, _, attr = ref.rpartition(":")
    quiet = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # checking a reference writes nothing (no __pycache__ beside the user's code)
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise TunerError(f"model {ref!r}: file {target} not found")
            module = _load_file(path)
        else:
            cwd = os.getcwd()  # like `python -m`: modules in the working directory import
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(target)
    except TunerError:
        raise
    except BaseException as exc:  # noqa: BLE001 - any import failure (SyntaxError, SystemExit, ...) is one line
        if isinstance(exc, KeyboardInterrupt):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise TunerError(f"model {ref!r}: cannot import {target} ({type(exc).__name__}: {reason})") from None
    finally:
        sys.dont_write_bytecode = quiet
    obj: Any = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise TunerError(f"model {ref!r}: {target} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TunerError(f"model {ref!r}: {attr} is not callable (it is a {type(obj).__name__})")
    return obj


def shape_kwargs(fn: Callable[..., Any], num_classes: int, in_channels: int,
                 image_size: int | tuple[int, int]) -> dict[str, Any]:
    """The dataset's shape, as the keyword arguments `fn`'s signature accepts (by name, or **kwargs)."""
    values = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: give nothing
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return values
    return {k: v for k, v in values.items()
            if k in params and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}


def build_model(name: str, num_classes: int = 10, *, options: Mapping[str, Any] | None = None,
                in_channels: int = 3, image_size: int | tuple[int, int] = 32) -> nn.Module:
    """A freshly initialised model (initialisation follows the global torch seed): a registry name,
    or a reference called with `options` and the shape keyword arguments its signature accepts."""
    from torch import nn  # torch: only when a model is built (this module loads with every command)

    if is_reference(name):
        fn = resolve_reference(name)
        kwargs = {**shape_kwargs(fn, num_classes, in_channels, image_size), **(options or {})}
        try:
            model = fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line
            raise TunerError(f"model {name!r}: calling it failed ({type(exc).__name__}: {exc})") from None
        if not isinstance(model, nn.Module):
            raise TunerError(f"model {name!r}: returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        builder = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r} (valid: {', '.join(sorted(MODELS))})") from None
    return builder(num_classes, in_channels=in_channels) if in_channels != 3 else builder(num_classes)


def check_model(name: str, options: Mapping[str, Any] | None, *, num_classes: int, in_channels: int,
                image_size: int | tuple[int, int], file: str | None, key: str = "model") -> None:
    """Import a reference, build one model on the CPU and run a forward pass on one dummy batch of two
    images: a failure is a `ConfigError` naming `file` and `key` (exit 2). Registry names pass."""
    if not is_reference(name):
        return
    import torch  # torch: only for a model reference, which needs it anyway

    try:
        model = build_model(name, num_classes, options=options, in_channels=in_channels, image_size=image_size)
    except TunerError as exc:
        raise ConfigError(str(exc), file=file, key=key) from None
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.randn(2, in_channels, h, w).contiguous(memory_format=torch.channels_last)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the user's code: one line
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"{name!r}: the forward pass on a dummy batch of 2×{in_channels}×{h}×{w} images failed "
                          f"({type(exc).__name__}: {reason})", file=file, key=key) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{name!r}: on a dummy batch of 2×{in_channels}×{h}×{w} images it returned {got}, "
                          f"expected logits of shape (2, {num_classes})", file=file, key=key)
