"""An example of your own model for tuner: `model: examples/my_model.py:build` in a study file.

tuner calls `build` with `model_options` as keyword arguments, plus `num_classes`, `in_channels`
and `image_size` from the dataset because the signature names them. The module returns N×C×H×W
float images → N×num_classes logits.
"""

from __future__ import annotations

from torch import nn


def build(num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.0) -> nn.Module:
    """Three conv-BN-ReLU blocks (width, 2×width, 4×width), each halving the image, then a linear head."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(c, num_classes))
