"""scikit-learn digits as a tiny text-to-image data set: upsampled 8x8 images with prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROMPT_TEMPLATE = "a photo of digit {digit}"


def digit_prompt(digit: int, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(digit=digit)


@dataclass
class DigitImages:
    """Images in [-1, 1] of shape (N, 1, size, size) with their digit labels and prompts."""

    images: torch.Tensor
    labels: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | list[int]) -> DigitImages:
        index = torch.as_tensor(index, dtype=torch.long)
        return DigitImages(self.images[index], self.labels[index], [self.prompts[i] for i in index.tolist()])


def load_digits(
    image_size: int = 16, digits: list[int] | tuple[int, ...] | None = None, template: str = PROMPT_TEMPLATE
) -> DigitImages:
    """scikit-learn's 1797 8x8 digits, bilinearly upsampled to ``image_size`` and scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    if image_size < 8 or image_size % 8:
        raise ValueError(
            f"load_digits: image_size {image_size} must be a multiple of 8 (the digits are 8x8). Fix: use 16 or 32."
        )
    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # values 0..16
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if digits is not None:
        keep = torch.isin(labels, torch.tensor(list(digits)))
        images, labels = images[keep], labels[keep]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    return DigitImages(images, labels, [digit_prompt(int(d), template) for d in labels])


def split(data: DigitImages, validation: int | float, seed: int = 0) -> tuple[DigitImages, DigitImages]:
    """(train, validation) by a seeded shuffle; ``validation`` is a count or a fraction."""
    n_val = int(round(len(data) * validation)) if isinstance(validation, float) else int(validation)
    if not 0 < n_val < len(data):
        raise ValueError(
            f"split: validation={validation} leaves no train or no validation items of {len(data)}. "
            f"Fix: pick 0 < n < {len(data)}."
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_val:]), data.subset(order[:n_val])
