"""Image transforms (torchvision): resize, light augmentation, normalise."""
from __future__ import annotations

from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose([T.Resize((image_size, image_size), antialias=True), T.ToTensor(), T.Normalize(MEAN, STD)])


def train_transform(image_size: int, augment: bool) -> T.Compose:
    if not augment:
        return eval_transform(image_size)
    # No horizontal flip: captions say "left of" / "right of", and a flip would make them lie.
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
        T.ColorJitter(0.1, 0.1, 0.05),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
