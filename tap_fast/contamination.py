"""Spurious contaminations SC(X*, y) and SC(X*, permute(y)) of section 5.1 and Appendix F.

Each ``add_*`` function writes a label-revealing signal into a batch of uint8 images (N, C, H, W) and
returns the contaminated copy with its ground-truth annotation mask (N, 1, H, W) uint8, 1 on the pixels
written (a text tag's whole box by default, its ink with ``tag_mask="ink"``). ``signal`` is the label the
spurious signal encodes: the true label for SC(X*, y), a permuted one for SC(X*, permute(y))
(:func:`permuted_signal`). Positions are drawn from ``generator`` on its own device (the global
CPU generator when None) and moved to the images' device, so a seeded CPU generator gives the same
contamination on CPU and GPU.

Every contamination is a :class:`SignalPlacement`: a few templates (the pixels written, and the masks where
they differ), and per sample which template and which value. :func:`signal_placement` draws the one
:func:`contaminate` applies, without images, so a feed can contaminate each batch as it arrives
(``placement.apply(batch, samples)``) holding O(N) numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tap_fast.choices import PERMUTES, TAG_MASKS, TAG_STYLES
from tap_fast.glyphs import render

KINDS = ("decoy", "tag", "stripe")
VARIANTS = ("contaminated", "permuted", "clean")
PNEU_TAGS = ("ABC", "XYZ")
KNEE_TAGS = ("ABC", "DEF", "GHI", "JKL", "MNO")
DEFAULT_TAGS = {2: PNEU_TAGS, 5: KNEE_TAGS}

DECOY_SIZE = 4  # Ross et al. 2017: 4x4 patches on 28x28 MNIST
REFERENCE_SIZE = 224  # tag height, margin and stripe geometry are given for 224x224 images
TAG_HEIGHT, TAG_MARGIN = 22, 6
STRIPE_WIDTH, STRIPE_MAX_OFFSET = 6, 15
STRIPE_STEPS = {2: 127, 5: 51}  # Appendix F: PNEU 255 - y*127, KNEE 255 - y*51
SIGNAL_STREAM = 0x9E3779B9  # xor'ed into a set's seed for its permuted signal (signal_seed)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    return images


def _check_signal(signal: torch.Tensor, n: int, num_values: int, device: torch.device, name: str = "signal"
                  ) -> torch.Tensor:
    """``signal`` (n,) as int64 on ``device``; each entry must lie in [0, num_values)."""
    if not isinstance(signal, torch.Tensor) or signal.is_floating_point() or signal.is_complex() \
            or signal.dtype == torch.bool:
        got = signal.dtype if isinstance(signal, torch.Tensor) else type(signal).__name__
        raise TypeError(f"{name} must be an integer torch.Tensor, got {got}")
    if signal.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {tuple(signal.shape)}")
    if n and (int(signal.min()) < 0 or int(signal.max()) >= num_values):
        raise ValueError(f"{name} must lie in [0, {num_values}), got range "
                         f"[{int(signal.min())}, {int(signal.max())}]")
    return signal.to(device=device, dtype=torch.int64)


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")


def _scaled(length: int, size: int, minimum: int) -> int:
    """A length given for 224 px images, scaled to ``size`` px."""
    return max(minimum, round(length * size / REFERENCE_SIZE))


def _draw(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n uniform ints in [0, high), drawn on the generator's device and moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(high, (n,), generator=generator, device=gen_device).to(device)


@dataclass(frozen=True)
class SignalPlacement:
    """Sample i of a set gets ``values[i]`` on the pixels of ``templates[index[i]]`` and the ground-truth mask
    ``mask_templates[index[i]]``.

    templates: (P, H, W) bool (the pixels set to the value), or uint8 coverage A (a small image's text tags:
    out = round(((255 - A) x + A value) / 255), the value blended in as the area average of a larger image
    with it burnt in); index: (N,) int64 into templates; values: (N,) uint8; mask_templates: (P, H, W)
    bool, or None when the mask is the pixels written (nonzero coverage; a text tag's box mask covers more).
    """
    templates: torch.Tensor
    index: torch.Tensor
    values: torch.Tensor
    mask_templates: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> SignalPlacement:
        return SignalPlacement(self.templates.to(device), self.index.to(device), self.values.to(device),
                               None if self.mask_templates is None else self.mask_templates.to(device))

    def apply(self, images: torch.Tensor, samples: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The contaminated copy of ``images`` (n, C, H, W) uint8 and its uint8 mask (n, 1, H, W), where
        ``images`` are the samples ``samples`` ((n,) indices into the set; all N in order when None)."""
        images = _check_images(images)
        index, values = (self.index, self.values) if samples is None else (self.index[samples],
                                                                            self.values[samples])
        if index.shape[0] != images.shape[0] or tuple(images.shape[-2:]) != tuple(self.templates.shape[-2:]):
            raise ValueError(f"images must have shape ({index.shape[0]}, C, {self.templates.shape[-2]}, "
                             f"{self.templates.shape[-1]}) for this placement, got {tuple(images.shape)}")
        index = index.to(images.device)
        written = self.templates.to(images.device)[index].unsqueeze(1)
        if written.dtype == torch.bool:
            out = torch.where(written, values.to(images.device, torch.uint8).view(-1, 1, 1, 1), images)
        else:  # uint8 coverage: round(((255 - A) x + A v) / 255) in int32 (no ties: 255 is odd)
            a = written.to(torch.int32)
            blend = (255 - a) * images.to(torch.int32) + a * values.to(images.device, torch.int32).view(-1, 1, 1, 1)
            out = blend.add_(127).floor_divide_(255).to(torch.uint8)
            written = written > 0
        mask = written if self.mask_templates is None else self.mask_templates.to(images.device)[index].unsqueeze(1)
        return out, mask.to(torch.uint8)


def _corner_templates(bitmap: torch.Tensor, height: int, width: int, margin: int) -> torch.Tensor:
    """(4, H, W) bool: ``bitmap`` at ``margin`` px from the top-left, top-right, bottom-left, bottom-right."""
    h, w = bitmap.shape
    if h + 2 * margin > height or w + 2 * margin > width:
        raise ValueError(f"a {h}x{w} px signal with a {margin} px margin does not fit {height}x{width} images")
    out = torch.zeros(4, height, width, dtype=torch.bool)
    for i, (top, left) in enumerate([(margin, margin), (margin, width - margin - w),
                                     (height - margin - h, margin), (height - margin - h, width - margin - w)]):
        out[i, top:top + h, left:left + w] = bitmap
    return out


def add_decoys(images: torch.Tensor, signal: torch.Tensor, *, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST decoys (section 5.1, after Ross et al. 2017): a 4x4 patch in a random one of the four
    corners, value 255 - 25 * signal (signal in 0..10)."""
    images = _check_images(images)
    signal = _check_signal(signal, images.shape[0], 11, images.device)
    return _decoy_placement(signal, *images.shape[-2:], generator).apply(images)


def _decoy_placement(signal: torch.Tensor, height: int, width: int, generator: torch.Generator | None
                     ) -> SignalPlacement:
    patch = torch.ones(DECOY_SIZE, DECOY_SIZE, dtype=torch.bool)
    corner = _draw(4, signal.shape[0], generator, signal.device)
    return SignalPlacement(_corner_templates(patch, height, width, margin=0), corner,
                           (255 - 25 * signal).to(torch.uint8))


def add_text_tags(images: torch.Tensor, signal: torch.Tensor, tags: Sequence[str], *, height: int | None = None,
                  generator: torch.Generator | None = None, tag_mask: str = "box", tag_style: str = "font"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Medical text tags (section 5.1): tags[signal] in white (255) bold monospace, about 22 px high on
    224x224 images (round(22 H / 224), at least 5 px, unless ``height`` is given), in a random corner
    round(6 H / 224) px (at least 1) from the edges. Images too small for that height in the font (under
    its smallest, 8 px render: H < 77) get, without ``height``, the tag burnt into a 224 px high image
    and shrunk to H x W by area averaging: a grey, anti-aliased tag blended into the image (the box and
    ink masks are the pixels the shrunk box and ink touch).

    The mask is the tag's whole box with ``tag_mask="box"`` (annotators draw boxes; the released mask is the
    tag's box, 22 x 44 px at 224 in its font, 22 x 54 for three letters in this one), or only the pixels
    written with "ink"; the images are the same either way."""
    images = _check_images(images)
    _check_tags(tags)
    _check_choice("tag_mask", tag_mask, TAG_MASKS)
    _check_choice("tag_style", tag_style, TAG_STYLES)
    signal = _check_signal(signal, images.shape[0], len(tags), images.device)
    return _tag_placement(signal, tags, *images.shape[-2:], height, generator, tag_mask, tag_style).apply(images)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_tags(tags: Sequence[str]) -> None:
    if isinstance(tags, str) or not isinstance(tags, Sequence) or len(tags) < 2 \
            or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"tags must be a sequence of at least two non-empty strings, got {tags!r}")
    if len(set(tags)) != len(tags):
        raise ValueError(f"tags must be distinct so that each label gets its own signal, got {tags!r}")


def _tag_placement(signal: torch.Tensor, tags: Sequence[str], img_h: int, img_w: int, height: int | None,
                   generator: torch.Generator | None, tag_mask: str, tag_style: str) -> SignalPlacement:
    smallest = render(tags[0], 1).shape[0]  # the font's smallest render: scale 1 plus 1 px bold
    if tag_style == "shrunk" and height is None and _scaled(TAG_HEIGHT, img_h, 0) < smallest:
        templates, boxes = _shrunk_tag_templates(tags, img_h, img_w, tag_mask)
    else:
        height = _scaled(TAG_HEIGHT, img_h, 5) if height is None else height
        margin = _scaled(TAG_MARGIN, img_h, 1)
        bitmaps = [render(t, height) for t in tags]
        templates = torch.stack([_corner_templates(b, img_h, img_w, margin) for b in bitmaps]).flatten(0, 1)
        boxes = None if tag_mask == "ink" else torch.stack(
            [_corner_templates(torch.ones_like(b), img_h, img_w, margin) for b in bitmaps]).flatten(0, 1)
    corner = _draw(4, signal.shape[0], generator, signal.device)
    return SignalPlacement(templates, signal * 4 + corner, torch.full_like(signal, 255, dtype=torch.uint8), boxes)


def _shrunk_tag_templates(tags: Sequence[str], img_h: int, img_w: int, tag_mask: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(4 len(tags), H, W) uint8 coverage templates round(255 a) and bool masks: each tag rendered
    TAG_HEIGHT px high in the corners of a REFERENCE_SIZE x round(REFERENCE_SIZE W / H) canvas, TAG_MARGIN
    px from the edges, shrunk to H x W by area averaging (a = each pixel's ink coverage in [0, 1]). The
    masks are the pixels of nonzero coverage of the tag's box (tag_mask "box") or of its ink ("ink")."""
    ref_w = round(REFERENCE_SIZE * img_w / img_h)

    def shrunk(bitmap: torch.Tensor) -> torch.Tensor:  # (4, H, W) float coverage of the four corners
        try:
            canvas = _corner_templates(bitmap, REFERENCE_SIZE, ref_w, TAG_MARGIN)
        except ValueError as e:
            raise ValueError(f"{e} (the {REFERENCE_SIZE} px reference canvas of {img_h}x{img_w} images, "
                             f"whose tags are drawn there and shrunk)") from None
        return F.interpolate(canvas.float().unsqueeze(1), size=(img_h, img_w), mode="area").squeeze(1)

    templates, masks = [], []
    for tag in tags:
        bitmap = render(tag, TAG_HEIGHT)
        ink = shrunk(bitmap)
        templates.append(ink.mul(255).round_().to(torch.uint8))
        masks.append(ink > 0 if tag_mask == "ink" else shrunk(torch.ones_like(bitmap)) > 0)
    return torch.cat(templates), torch.cat(masks)


def stripe_step(num_classes: int) -> int:
    """Brightness step between classes of the stripe artefact: 127 for 2 classes and 51 for 5 (Appendix F),
    otherwise 255 // (num_classes - 1)."""
    _check_num_classes(num_classes)
    return STRIPE_STEPS.get(num_classes, 255 // (num_classes - 1))


def add_stripes(images: torch.Tensor, signal: torch.Tensor, num_classes: int, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stripe artefact (Appendix F): a full-height vertical stripe 6 px wide, at a uniformly random
    0..15 px from the left or the right edge (both scaled by W / 224; width at least 1 px), brightness
    255 - signal * stripe_step(num_classes)."""
    images = _check_images(images)
    signal = _check_signal(signal, images.shape[0], num_classes, images.device)
    return _stripe_placement(signal, num_classes, *images.shape[-2:], generator).apply(images)


def _stripe_placement(signal: torch.Tensor, num_classes: int, img_h: int, img_w: int,
                      generator: torch.Generator | None) -> SignalPlacement:
    step = stripe_step(num_classes)
    width, max_offset = _scaled(STRIPE_WIDTH, img_w, 1), _scaled(STRIPE_MAX_OFFSET, img_w, 0)
    if width + max_offset > img_w:
        raise ValueError(f"a {width} px stripe up to {max_offset} px from the edge does not fit width {img_w}")
    templates = torch.zeros(2, max_offset + 1, img_h, img_w, dtype=torch.bool)
    for d in range(max_offset + 1):
        templates[0, d, :, d:d + width] = True
        templates[1, d, :, img_w - d - width:img_w - d] = True
    position = _draw(2 * (max_offset + 1), signal.shape[0], generator, signal.device)
    return SignalPlacement(templates.flatten(0, 1), position, (255 - step * signal).to(torch.uint8))


def signal_permutation(num_classes: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random derangement of the labels (a permutation without fixed points: no label keeps its signal),
    uniform over the derangements (randperm draws, rejected while one has a fixed point; the swap for 2
    classes); int64 on CPU."""
    _check_num_classes(num_classes)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    identity = torch.arange(num_classes)
    while True:
        perm = torch.randperm(num_classes, generator=generator, device=gen_device).cpu()
        if not perm.eq(identity).any():
            return perm


def permuted_signal(labels: torch.Tensor, num_classes: int, *, permute: str = "random",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The signal of SC(X*, permute(y)) for ``labels`` (N,), int64 on the labels' device.

    permute "random" (section 5.1 "randomises the patch assignment", as the released code): each image's
    signal is uniform over the classes, independent of its label (it equals the label with probability
    1 / num_classes); 2 classes swap (1 - label), as the paper's binary tasks do. "derangement":
    perm[labels] for one :func:`signal_permutation` (no image keeps its signal)."""
    _check_num_classes(num_classes)
    _check_choice("permute", permute, PERMUTES)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D integer torch.Tensor, got {got}")
    labels = _check_signal(labels, labels.shape[0], num_classes, labels.device, "labels")
    if permute == "derangement":
        return signal_permutation(num_classes, generator=generator).to(labels.device)[labels]
    if num_classes == 2:
        return 1 - labels
    return _draw(num_classes, labels.shape[0], generator, labels.device)


def signal_seed(seed: int) -> int:
    """The seed of the permuted signal's generator for a set seeded ``seed``: a stream of its own (a CPU
    generator uses a seed's low 32 bits; with the positions' own stream, randint(K) and randint(4) of the
    same draws would share their parity, tying each image's signal to its corner)."""
    return (int(seed) ^ SIGNAL_STREAM) & 0xFFFFFFFF


def signal_placement(labels: torch.Tensor, kind: str, num_classes: int, *, height: int, width: int,
                     variant: str = "contaminated", seed: int = 0, tags: Sequence[str] | None = None,
                     permute: str = "random", tag_mask: str = "box", tag_style: str = "font"
                     ) -> SignalPlacement | None:
    """The placement :func:`contaminate` writes into N images of ``height`` x ``width`` px with labels
    ``labels`` (N,), on the labels' device; None for variant "clean". Arguments as :func:`contaminate`."""
    for name, value, allowed in (("kind", kind, KINDS), ("variant", variant, VARIANTS),
                                 ("permute", permute, PERMUTES), ("tag_mask", tag_mask, TAG_MASKS),
                                 ("tag_style", tag_style, TAG_STYLES)):
        _check_choice(name, value, allowed)
    if tags is not None and kind != "tag":
        raise ValueError(f"tags apply to kind='tag' only, got kind={kind!r}")
    _check_num_classes(num_classes)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
    if isinstance(labels, torch.Tensor) and labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)}")
    n = labels.shape[0] if isinstance(labels, torch.Tensor) else 0
    labels = _check_signal(labels, n, num_classes, getattr(labels, "device", None), "labels")
    if kind == "tag" and tags is None:
        if num_classes not in DEFAULT_TAGS:
            raise ValueError(f"tags must be given for kind='tag' with num_classes={num_classes} "
                             f"(defaults exist for {sorted(DEFAULT_TAGS)} classes)")
        tags = DEFAULT_TAGS[num_classes]
    if variant == "clean":
        return None
    signal = labels
    if variant == "permuted":
        signal = permuted_signal(labels, num_classes, permute=permute,
                                 generator=torch.Generator().manual_seed(signal_seed(seed)))
    generator = torch.Generator().manual_seed(seed)
    if kind == "decoy":
        return _decoy_placement(_check_signal(signal, n, 11, signal.device), height, width, generator)
    if kind == "tag":
        if len(tags) != num_classes:
            raise ValueError(f"tags must hold one string per class ({num_classes}), got {tags!r}")
        _check_tags(tags)
        return _tag_placement(signal, tags, height, width, None, generator, tag_mask, tag_style)
    return _stripe_placement(signal, num_classes, height, width, generator)


def contaminate(images: torch.Tensor, labels: torch.Tensor, kind: str, num_classes: int, *,
                variant: str = "contaminated", seed: int = 0, tags: Sequence[str] | None = None,
                permute: str = "random", tag_mask: str = "box", tag_style: str = "font"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """SC(X*, y) ("contaminated"), SC(X*, permute(y)) ("permuted") or X* ("clean": a copy of the images and
    an all-zero mask) with a contamination ``kind`` in KINDS: :func:`signal_placement` applied to ``images``.

    Positions come from a CPU generator seeded with ``seed`` and the permuted signal (``permute``, as
    :func:`permuted_signal`) from one seeded with ``signal_seed(seed)``, so the result does not depend on the
    device, and the permuted variant puts its signals at the same positions as the contaminated one.
    ``tags`` (kind "tag" only) default to PNEU_TAGS for 2 classes, KNEE_TAGS for 5; ``tag_mask`` is their
    mask, as :func:`add_text_tags`'s.
    """
    images = _check_images(images)
    n, _, h, w = images.shape
    if isinstance(labels, torch.Tensor):
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match the images, got {tuple(labels.shape)}")
        labels = labels.to(images.device)
    placement = signal_placement(labels, kind, num_classes, height=h, width=w, variant=variant, seed=seed,
                                 tags=tags, permute=permute, tag_mask=tag_mask, tag_style=tag_style)
    if placement is None:
        return images.clone(), torch.zeros(n, 1, h, w, dtype=torch.uint8, device=images.device)
    return placement.apply(images)
