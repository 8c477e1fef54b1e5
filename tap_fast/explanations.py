"""Appendix D: where a trained model's input gradients and activations lie, against the spurious masks.

For each image of a contaminated test set, the maps are the input gradient (|d/dX sum_k log_softmax_k|
summed over channels, the convention of :func:`tap_fast.annotations.saliency_maps` without its per-image
rescaling) and each tapped layer's activation map A^l = sum_c relu(Z^l_c) (eq. 6), upsampled to the input.

- Upsampling is nearest-neighbour (``F.interpolate``'s default): Appendix D only says "we upsample to match
  dimensions", and nearest adds no value that no activation has, so a top quartile is a union of whole
  activation cells (bilinear would spread a spurious cell's activation into its neighbours).
- The top quartile of a map is its pixels whose value is at least the k-th largest of the image, k =
  ceil(H * W / 4), and above zero. Ties at that value are all included (whole cells of an upsampled map; the
  set can exceed a quarter), and a pixel of value 0 is never "top by magnitude" (an all-zero map has an
  empty top quartile): the set does not depend on pixel order.
- Recall |top ∩ M| / |M| and precision |top ∩ M| / |top| (eq. 17) are pooled over the whole set: the counts
  are summed over all pixels of all images before dividing, as eq. 17's set sizes read (per-image ratios
  averaged would weigh a small mask like a large one; precision is the same either way when every top
  quartile has k pixels). A ratio with an empty denominator is 0.0.

:func:`overlap` gives the rows of Tables 4-5; :func:`maps_figure` draws Figure 1 / 11 / 12's grid.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from tap_fast.feeds import normalise
from tap_fast.input_gradients import input_gradient
from tap_fast.tapped_model import TappedModel

TOP_FRACTION = 0.25  # Appendix D's top quartile
GRADIENT = "input_gradient"  # the key of the input gradient's map, before the tap names
MIN_TILE = 112  # maps.png: each map is enlarged by an integer factor to at least this side
PAD = 4  # maps.png: light grey space around and between tiles (a white mask pixel stays visible)
HEADER = 20  # maps.png: height of the column labels
BACKGROUND = (200, 200, 200)


def explanation_maps(model: TappedModel, images: torch.Tensor, *, mean: float, std: float
                     ) -> dict[str, torch.Tensor]:
    """``{"input_gradient": E, tap name: A^l upsampled, ...}``, each (B, 1, H, W) fp32, for a uint8 (B, C, H, W)
    batch on the model's device: E = sum_c |d/dX sum_k log_softmax(f(X))_k| (eq. 4's explanation) and A^l =
    sum_c relu(Z^l_c) (eq. 6), upsampled nearest to (H, W). One eval-mode forward and backward (the model's
    mode is restored afterwards)."""
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        x = normalise(images, mean, std).requires_grad_(True)
        with torch.enable_grad():
            logits, activations = model(x)
            grad = input_gradient(logits, x)
    finally:
        model.train(was_training)
    maps = {GRADIENT: grad.abs().sum(1, keepdim=True)}
    for name, z in zip(model.tap_names, activations, strict=True):
        a = z.detach().float().relu().sum(1, keepdim=True)
        maps[name] = F.interpolate(a, size=tuple(x.shape[-2:]), mode="nearest")
    return maps


def top_quartile(maps: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Bool (B, 1, H, W): each image's pixels >= its k-th largest value (k = ceil(fraction * H * W)) and > 0,
    ties at the k-th value included (Appendix D's top quartile for ``fraction`` 0.25)."""
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be (B, 1, H, W), got {tuple(maps.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    flat = maps.flatten(1)
    kth = flat.topk(math.ceil(fraction * flat.shape[1]), dim=1).values[:, -1:]
    return ((flat >= kth) & (flat > 0)).view_as(maps)


def overlap_counts(maps: Mapping[str, torch.Tensor], masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per map name, the int64 counts (|top ∩ M|, |M|, |top|) summed over the batch, where top is the map's
    :func:`top_quartile` and M the pixels where ``masks`` (B, 1, H, W) is nonzero."""
    spurious = masks.ne(0)
    counts = {}
    for name, m in maps.items():
        if m.shape != spurious.shape:
            raise ValueError(f"map {name!r} has shape {tuple(m.shape)}, the masks {tuple(spurious.shape)}")
        top = top_quartile(m)
        counts[name] = torch.stack([(top & spurious).sum(), spurious.sum(), top.sum()])
    return counts


def recall_precision(counts: torch.Tensor) -> dict[str, float]:
    """Eq. 17 from pooled counts (|top ∩ M|, |M|, |top|): recall |top ∩ M| / |M|, precision |top ∩ M| / |top|
    (0.0 for an empty denominator)."""
    hit, spurious, top = (int(c) for c in counts.tolist())
    return {"recall": hit / spurious if spurious else 0.0, "precision": hit / top if top else 0.0}


def overlap(model: TappedModel, images: torch.Tensor, masks: torch.Tensor, *, mean: float, std: float,
            batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Appendix D / Tables 4-5: eq. 17's recall and precision of the top-quartile input gradients and of each
    tapped layer's upsampled activations against the spurious ``masks`` (N, 1, H, W), pooled over the uint8
    ``images`` (N, C, H, W) (both on the model's device). Returns ``{"input_gradient": {"recall": r,
    "precision": p}, tap name: {...}, ...}`` in that order."""
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} must be (N, 1, H, W) of images {tuple(images.shape)}")
    total: dict[str, torch.Tensor] = {}
    for i in range(0, images.shape[0], batch_size):
        maps = explanation_maps(model, images[i:i + batch_size], mean=mean, std=std)
        for name, c in overlap_counts(maps, masks[i:i + batch_size]).items():
            total[name] = c if name not in total else total[name] + c
    return {name: recall_precision(c) for name, c in total.items()}


def tile_side(side: int) -> int:
    """maps.png's tile side for images of ``side`` pixels: side times the least integer factor reaching
    ``MIN_TILE`` (28 -> 112, 64 -> 128, 224 -> 224), so each pixel is a square block."""
    return side * max(1, math.ceil(MIN_TILE / side))


def _scaled(values: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> [0, 1], each image to its own range (a constant image -> 0)."""
    flat = values.float().flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-30)).where(high > low, 0.0).view_as(values)


def _hot(v: torch.Tensor) -> torch.Tensor:
    """The "hot" colour map of [0, 1] values (N, 1, H, W): black, red, yellow, white; uint8 (N, 3, H, W)."""
    rgb = torch.cat([(3 * v - k).clamp(0, 1) for k in range(3)], 1)
    return (rgb * 255).round().to(torch.uint8)


def _label(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """``text`` shortened from the left (".." in front) until it fits in ``width`` pixels."""
    shown = text
    while len(shown) > 1 and draw.textlength(shown, font=font) > width:
        text = text[1:]
        shown = ".." + text
    return shown


def maps_figure(images: torch.Tensor, masks: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> Image.Image:
    """Figure 1 / 11 / 12 as a grid: one row per image, columns image, mask, then each of ``maps`` (the input
    gradient and the upsampled activation maps of :func:`explanation_maps`, in order), labelled in a header.

    ``images`` uint8 (N, C, H, W) (C 1 or 3), ``masks`` (N, 1, H, W); the mask and every map are scaled to
    their own range per image, the mask in grey, the maps in the "hot" colour map (black low, white high).
    Tiles are :func:`tile_side` pixels (nearest enlargement) with ``PAD`` around them: the image is
    ``cols * (tile + PAD) + PAD`` wide and ``HEADER + N * (tile + PAD)`` high.
    """
    n, c, h, w = images.shape
    if images.dtype != torch.uint8 or c not in (1, 3) or h != w:
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, H), got {images.dtype} {tuple(images.shape)}")
    columns: dict[str, torch.Tensor] = {"image": images.expand(n, 3, h, w) if c == 1 else images,
                                        "mask": (_scaled(masks) * 255).round().to(torch.uint8).expand(n, 3, h, w)}
    for name, m in maps.items():
        columns[name.replace("_", " ")] = _hot(_scaled(m))
    for name, t in columns.items():
        if t.shape != (n, 3, h, w):
            raise ValueError(f"{name} must be (N, 1, H, W) of images {tuple(images.shape)}, got {tuple(t.shape)}")
    tile = tile_side(h)
    figure = Image.new("RGB", (len(columns) * (tile + PAD) + PAD, HEADER + n * (tile + PAD)), BACKGROUND)
    draw, font = ImageDraw.Draw(figure), ImageFont.load_default()
    for j, (name, t) in enumerate(columns.items()):
        x0 = PAD + j * (tile + PAD)
        text = _label(draw, font, name, tile)
        draw.text((x0 + (tile - draw.textlength(text, font=font)) / 2, 4), text, fill="black", font=font)
        for i in range(n):
            cell = Image.fromarray(t[i].permute(1, 2, 0).cpu().numpy()).resize((tile, tile), Image.Resampling.NEAREST)
            figure.paste(cell, (x0, HEADER + i * (tile + PAD)))
    return figure


def write_maps(path: str | os.PathLike, images: torch.Tensor, masks: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> None:
    """Save :func:`maps_figure` of these images as a PNG at ``path``."""
    maps_figure(images, masks, maps).save(path, format="PNG")


def format_overlap(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Tables 4-5 as text: one line per map of :func:`overlap` with its recall and precision."""
    width = max(len("map"), *(len(n) for n in rows))
    lines = [f"{'map':<{width}} {'recall':>8} {'precision':>9}"]
    lines += [f"{n:<{width}} {r['recall']:>8.3f} {r['precision']:>9.3f}" for n, r in rows.items()]
    return "\n".join(lines)
