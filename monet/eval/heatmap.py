"""Where a latent "looks": cosine similarity of each latent vector to the image's visual tokens.

The visual tokens are the vision tower's outputs after the patch merger — the vectors that replace
the image-pad tokens in the language model's input (``model.model.get_image_features(pixel_values,
image_grid_thw)``, one ``[N_i, D]`` block per image). Image ``i`` with grid ``(t, h, w)`` (in
14-pixel patches) has ``N_i = t * (h/m) * (w/m)`` tokens (``m`` = the spatial merge size, 2 for
Qwen2.5-VL) in raster order of the merged ``(h/m, w/m)`` grid, frame by frame; each covers a
``14m x 14m`` square of the resized image the processor produced (``14h x 14w`` pixels).

For latents ``Z`` ([n, D]) and tokens ``V`` ([N, D]) the map of latent ``j`` is
``cos(Z[j], V[k])`` for every token ``k``, reshaped to the grid (computed in float64);
:func:`plot_latent_heatmaps` draws one panel per latent over the resized image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

PATCH = 14


def cosine_matrix(latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, N]`` float64 cosine of every latent row with every token row (a zero vector gives 0)."""
    if latents.dim() != 2 or tokens.dim() != 2 or latents.shape[1] != tokens.shape[1]:
        raise ValueError(f"cosine_matrix: need [n, D] latents and [N, D] tokens, got {tuple(latents.shape)} "
                         f"and {tuple(tokens.shape)}")
    z = latents.detach().to("cpu", torch.float64)
    v = tokens.detach().to("cpu", torch.float64)
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(1e-300)
    vn = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return zn @ vn.T


@dataclass
class ImageHeatmaps:
    """Maps of one image: ``maps`` [n_latents, frames, rows, cols] cosines, ``grid`` its (t, h, w)
    in patches, ``size`` the resized image (width, height) in pixels the tokens cover."""

    maps: torch.Tensor
    grid: tuple[int, int, int]
    size: tuple[int, int]


def merged_grid(grid_thw: Sequence[int], merge: int) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"image grid {(t, h, w)} is not divisible by the merge size {merge}")
    return t, h // merge, w // merge


@torch.no_grad()
def latent_heatmaps(model: Any, processor: Any, images: Sequence[Any], latents: torch.Tensor) -> list[ImageHeatmaps]:
    """Cosine maps of ``latents`` ([n, D]) over each image's merged visual-token grid.

    ``images`` are PIL images as given to the model (the processor resizes them the same way)."""
    if latents.dim() != 2 or latents.shape[0] == 0:
        raise ValueError(f"latent_heatmaps: need [n >= 1, D] latents, got {tuple(latents.shape)}")
    if not images:
        raise ValueError("latent_heatmaps: the sample has no image")
    enc = processor.image_processor(images=list(images), return_tensors="pt")
    device = next(model.parameters()).device
    pixel_values = enc["pixel_values"].to(device)
    grid = enc["image_grid_thw"].to(device)
    feats = model.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output
    merge = int(model.model.visual.spatial_merge_size)
    out = []
    for g, f in zip(grid.tolist(), feats):
        t, rows, cols = merged_grid(g, merge)
        if f.shape[0] != t * rows * cols:
            raise ValueError(f"image with grid {g} gave {f.shape[0]} visual tokens, expected {t * rows * cols}")
        cos = cosine_matrix(latents, f)
        out.append(ImageHeatmaps(cos.reshape(latents.shape[0], t, rows, cols), (t, g[1], g[2]),
                                 (g[2] * PATCH, g[1] * PATCH)))
    return out


def plot_latent_heatmaps(image: Any, heat: ImageHeatmaps, path: str | os.PathLike, *, max_panels: int = 16,
                         title: str = "") -> Path:
    """One panel per latent (at most ``max_panels``, first frame): the heatmap over the resized
    image, all panels on one colour scale. Writes a PNG; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(heat.maps.shape[0], max_panels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    w, h = heat.size
    shown = image.convert("RGB").resize((w, h))
    maps = heat.maps[:n, 0].numpy()
    vmin, vmax = float(maps.min()), float(maps.max())
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 1e-3, vmax + 1e-3
    fig = Figure(figsize=(2.4 * cols + 1.2, 2.4 * rows * h / max(w, 1) + 0.7), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(shown, extent=(0, w, h, 0))
        im = ax.imshow(maps[k], extent=(0, w, h, 0), cmap="magma", alpha=0.6, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(f"latent {k}", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="cosine to visual token")
    if title:
        fig.suptitle(title, fontsize=9)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(p, format="png", dpi=100)
    return p
