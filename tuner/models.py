"""Models, by name: a small fast CNN (default), ResNet-18 for 32×32, and a tiny net for tests.

Importing this module does not import torch: the registry's names are what validation needs (a
params file, a study file), and `tuner export` or `tuner --help` should not pay torch's start-up.
The `nn.Module` classes are defined on first use (`build_model`, or `tuner.models.FastCNN`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

_NETS = ("conv_bn", "FastCNN", "TinyNet")  # defined by `_nets()`, read as module attributes


@cache
def _nets() -> dict[str, Any]:
    """The torch parts of this module, defined once, on first use (torch is imported here)."""
    import torch
    from torch import nn

    def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())

    class FastCNN(nn.Module):
        """In the spirit of airbench: a conv-BN stem, then three blocks of (conv-BN, max-pool, conv-BN),
        global max-pool and a scaled linear head. `widths` sets the three block widths; the default
        is sized to train a few epochs on two CPU cores (use (64, 256, 256) on a GPU for ~94%)."""

        def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), stem: int = 24,
                     head_scale: float = 1 / 8) -> None:
            super().__init__()
            layers: list[nn.Module] = [conv_bn(3, stem)]
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

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, num_classes),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    nets: dict[str, Any] = {"conv_bn": conv_bn, "FastCNN": FastCNN, "TinyNet": TinyNet}
    for name, obj in nets.items():  # importable as tuner.models.<name> (pickle, reprs)
        obj.__qualname__ = name
        obj.__module__ = __name__
    return nets


def __getattr__(name: str) -> Any:
    if name in _NETS:
        return _nets()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a 3×3 stride-1 stem and no max-pool, for 32×32 inputs."""
    from torch import nn
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "fastcnn": lambda k: _nets()["FastCNN"](k),
    "fastcnn-wide": lambda k: _nets()["FastCNN"](k, widths=(64, 256, 256), stem=24),
    "resnet18": resnet18,
    "tiny": lambda k: _nets()["TinyNet"](k),
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model (initialisation follows the global torch seed)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r} (valid: {', '.join(sorted(MODELS))})") from None
    return builder(num_classes)
