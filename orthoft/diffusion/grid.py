"""Sample grids as PNG: labelled panels of images side by side (e.g. before / after fine-tuning)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, columns: int, scale: int = 4, padding: int = 2) -> Image.Image:
    """Images in [-1, 1] (N, C, H, W), row-major into ``columns`` columns, each pixel ``scale`` x ``scale``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: expected (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}.")
    n, channels, height, width = images.shape
    rows = -(-n // columns)
    cell_h, cell_w = height * scale + padding, width * scale + padding
    mode = "L" if channels == 1 else "RGB"
    canvas = Image.new(
        mode, (columns * cell_w + padding, rows * cell_h + padding), color=64 if mode == "L" else (64,) * 3
    )
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        array = pixels[i, :, :, 0] if channels == 1 else pixels[i]
        tile = Image.fromarray(array, mode=mode).resize((width * scale, height * scale), Image.NEAREST)
        canvas.paste(tile, (padding + (i % columns) * cell_w, padding + (i // columns) * cell_h))
    return canvas


def save_panels(
    panels: list[tuple[str, torch.Tensor]],
    path: str | Path,
    columns: int,
    column_labels: list[str] | None = None,
    scale: int = 4,
) -> Path:
    """Stack labelled grids vertically into one PNG; ``column_labels`` go above the first panel."""
    grids = [(title, image_grid(images, columns, scale)) for title, images in panels]
    width = max(g.width for _, g in grids)
    title_h, label_h = 14, 12 if column_labels else 0
    height = label_h + sum(title_h + g.height for _, g in grids)
    canvas = Image.new("RGB", (width, height), color=(255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    if column_labels:
        cell_w = (grids[0][1].width - 2) // columns
        for i, label in enumerate(column_labels):
            draw.text((2 + i * cell_w + 2, y), label, fill=(0, 0, 0))
        y += label_h
    for title, grid in grids:
        draw.text((2, y + 1), title, fill=(0, 0, 0))
        y += title_h
        canvas.paste(grid.convert("RGB"), (0, y))
        y += grid.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
