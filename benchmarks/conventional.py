"""The conventional input pipeline our engine is compared with: a torchvision-CIFAR10-style
`Dataset` over the same uint8 images, PIL-based transforms per image, and a `DataLoader`.

    RandomCrop(32, padding=4) -> RandomHorizontalFlip() -> ToTensor() -> Normalize(mean, std)
    DataLoader(batch_size=512, shuffle=True, num_workers=0 or 2)

Workers are persistent (started once, not per epoch) and their first epoch is discarded as
warm-up, which is the most favourable way to run this pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tuner.training.data import DeviceData


class ConventionalCIFAR(Dataset):
    """Like `torchvision.datasets.CIFAR10.__getitem__`: HWC uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images = images  # N×32×32×3 uint8
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def conventional_dataset(data: DeviceData) -> ConventionalCIFAR:
    """The engine's training split (same images, same mean/std) as a conventional Dataset."""
    from torchvision import transforms as T

    images = np.ascontiguousarray(data.x_train.permute(0, 2, 3, 1).cpu().numpy())
    labels = data.y_train.cpu().numpy()
    mean = (data.mean.flatten().cpu() / 255).tolist()
    std = (data.std.flatten().cpu() / 255).tolist()
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    return ConventionalCIFAR(images, labels, transform)


def conventional_loader(dataset: ConventionalCIFAR, batch_size: int, workers: int,
                        device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(0))
