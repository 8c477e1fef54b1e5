"""GPU-resident in-memory feed: clean uint8 images held on the device, contaminated per batch.

The set stays clean (60k x 28 x 28 uint8 is 47 MB) beside its labels and the
:class:`~tap_fast.contamination.SignalPlacement` that the reference :func:`tap_fast.contamination.contaminate`
would write (Section 5: decoys, tags, stripes; "permuted" variants): a few template masks and, per sample, a
template index and a value. Each batch is an index gather of the shuffled indices, the placement's share for
those indices (contaminated pixels and the (B, 1, H, W) mask) and the uint8 -> float normalisation, all on
the device, so every batch equals ``contaminate(all images, ...)[indices]`` exactly. Batches have static
shapes (the last partial batch is dropped by default) and need no host sync, so a training step can be
captured in a CUDA graph.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tap_fast.contamination import KINDS, VARIANTS, SignalPlacement, signal_placement


def epoch_order(n: int, *, epoch: int, seed: int, shuffle: bool = True, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """Sample indices (CPU int64) that ``rank`` reads in ``epoch``.

    Every rank draws the same permutation from a CPU generator seeded by (seed, epoch), so the order does
    not depend on the device; rank r takes elements r, r + world_size, ... of its first
    world_size * (n // world_size), so shares are disjoint and equal and together cover all but
    n % world_size samples (DistributedSampler(drop_last=True) semantics).
    """
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.arange(n)
    share = n // world_size
    return perm[rank: share * world_size: world_size]


def check_sharding(rank: int, world_size: int) -> None:
    """Raise for a rank outside [0, world_size) or a non-positive world size."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def check_normalisation(mean: float | None, std: float | None) -> tuple[float, float] | tuple[None, None]:
    """Return (mean, std) as floats; std must be positive (both on the [0, 1] pixel scale). Both None (a feed
    of uint8 batches for a step that normalises them itself) stay None."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError(f"mean and std must both be numbers (normalised batches) or both be None (uint8 "
                         f"batches), got mean={mean!r}, std={std!r}")
    mean, std = float(mean), float(std)
    if not std > 0:
        raise ValueError(f"std must be positive (on the [0, 1] pixel scale), got {std}")
    return mean, std


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels -> float32 (x / 255 - mean) / std, in a new tensor (float input is not modified)."""
    return images.float().div(255.0).sub_(mean).div_(std)


def contaminate_and_normalise(images: torch.Tensor, samples: torch.Tensor, placement: SignalPlacement | None,
                              mean: float | None, std: float | None, masks: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's normalised float32 images (uint8 as they are when mean and std are None) and float32 mask
    (B, 1, H, W) from its clean uint8 ``images`` (B, C, H, W), the samples' indices into the set (B,), the
    set's ``placement`` (None: clean images) and the batch's own ``masks`` (B, 1, H, W) (users' or a
    teacher's annotations; None: none). The mask is the union (elementwise max) of the given masks and the
    placement's; neither gives a zero mask. No host sync."""
    mask = None if masks is None else masks.float()
    if placement is not None:
        images, signal = placement.apply(images, samples)
        mask = signal.float() if mask is None else torch.maximum(mask, signal.float())
    if mask is None:
        mask = images.new_zeros((images.shape[0], 1, *images.shape[2:]), dtype=torch.float32)
    return (images if mean is None else normalise(images, mean, std)), mask


class DeviceFeed:
    """Shuffled static-shape batches ``(x, y, mask)`` of an in-memory uint8 set held on ``device``.

    Args:
        images_uint8: (N, H, W) or (N, C, H, W) uint8 clean images (C = 1 or 3).
        labels: (N,) integer labels in [0, num_classes).
        kind: contamination, one of ``KINDS`` ("decoy", "tag", "stripe"), or None for none (zero masks).
        num_classes: number of classes.
        variant: "contaminated" (signal = label), "permuted" (signal = permuted label) or "clean".
        batch_size: samples per batch (per rank).
        mean, std: normalisation constants on the [0, 1] pixel scale; both None: ``x`` is the contaminated
            uint8 batch, as :func:`tap_fast.compiled_step.make_step` takes it (the step normalises).
        seed: seeds the shuffling and, unless ``contamination_seed`` is given, the contamination (as
            ``contaminate(..., seed=seed)``).
        contamination_seed: seeds the contamination when it differs from the shuffling's seed.
        masks: (N, 1, H, W) masks given with the set (users' annotations, or a teacher's: uint8 0/1 or float
            in [0, 1]), held on ``device``; a batch's mask is their union with the contamination's.
        device: where the set lives and batches are made.
        drop_last: drop the last partial batch (static shapes for CUDA graphs).
        shuffle: reshuffle each epoch (see :meth:`set_epoch`); False reads in index order.
        rank, world_size: DDP sharding; each rank reads a disjoint equal share of each epoch.
        tags: text tags per class for kind="tag" (defaults of :func:`contaminate` when None).
        permute, tag_mask, tag_style: the permuted variant's signal, the tags' masks and small images' tags,
            as :func:`~tap_fast.contamination.contaminate`'s ("random", "box" and "font" by default).

    Iterating gives one epoch of ``x`` float32 (B, C, H, W) normalised (or uint8), ``y`` int64 (B,) and ``mask``
    float32 (B, 1, H, W) (1 = spurious pixel), all on ``device``; the next iteration reads the next epoch.
    The feed holds ``images`` (N, C, H, W) uint8 clean, ``masks``, ``labels`` (N,) int64 and ``placement`` (the
    :class:`~tap_fast.contamination.SignalPlacement` of ``contaminate(..., seed=seed)``, None when kind is
    None or variant is "clean") on ``device``.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, *, kind: str | None,
                 num_classes: int, variant: str = "contaminated", batch_size: int, mean: float | None,
                 std: float | None, seed: int = 0, device: torch.device | str = "cuda", drop_last: bool = True,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 tags: Sequence[str] | None = None, contamination_seed: int | None = None,
                 masks: torch.Tensor | None = None, permute: str = "random", tag_mask: str = "box",
                 tag_style: str = "font") -> None:
        images = _check_images(images_uint8)
        if masks is not None and (not isinstance(masks, torch.Tensor)
                                  or tuple(masks.shape) != (images.shape[0], 1, *images.shape[2:])):
            raise ValueError(f"masks must be a ({images.shape[0]}, 1, {images.shape[2]}, {images.shape[3]}) tensor "
                             f"(one mask per image), got {tuple(getattr(masks, 'shape', ())) or type(masks).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
            raise TypeError("labels must be a 1-D integer torch.Tensor, got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)} "
                            f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but images_uint8 has {images.shape[0]}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        check_sharding(rank, world_size)
        self.mean, self.std = check_normalisation(mean, std)
        share = images.shape[0] // world_size
        if batch_size > share and drop_last:
            raise ValueError(f"batch_size={batch_size} exceeds this rank's share of {share} samples "
                             "(drop_last=True would give no batches)")
        self.device = torch.device(device)
        self.batch_size, self.drop_last, self.shuffle = batch_size, drop_last, shuffle
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, int(seed), 0
        placement = None if kind is None else signal_placement(
            labels, kind, num_classes, height=images.shape[2], width=images.shape[3], variant=variant,
            seed=self.seed if contamination_seed is None else int(contamination_seed), tags=tags, permute=permute,
            tag_mask=tag_mask, tag_style=tag_style)
        self.placement = None if placement is None else placement.to(self.device)
        self.images, self.labels = images.to(self.device), labels.to(self.device, torch.int64)
        self.masks = None if masks is None else masks.to(self.device)

    def __len__(self) -> int:
        share = self.images.shape[0] // self.world_size
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration reads (iterating advances it by one)."""
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """Indices (into the full set) of the samples this rank reads in the next epoch, in batch order."""
        idx = epoch_order(self.images.shape[0], epoch=self.epoch, seed=self.seed, shuffle=self.shuffle,
                          rank=self.rank, world_size=self.world_size)
        return idx[: len(self) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.order().to(self.device, non_blocking=True)
        self.epoch += 1
        for idx in order.split(self.batch_size):
            x, mask = contaminate_and_normalise(self.images[idx], idx, self.placement, self.mean, self.std,
                                                None if self.masks is None else self.masks[idx])
            yield x, self.labels[idx], mask


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError("images_uint8 must be a uint8 torch.Tensor, got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images_uint8 must have shape (N, H, W) or (N, C, H, W) with C = 1 or 3 and N > 0, got "
                         f"{tuple(images.shape)}")
    return images
