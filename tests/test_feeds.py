"""DeviceFeed (GPU-resident in-memory feed, contaminated per batch) against the reference contaminate(...) of
the whole set."""
import pytest
import torch

from tap_fast.contamination import VARIANTS, contaminate
from tap_fast.feeds import DeviceFeed, epoch_order, normalise

MEAN, STD = 0.1307, 0.3081
WORLD_SIZE = 2

# kind, num_classes, (H, W), N, batch size, tags: odd sizes and counts; the batch size does not divide a
# rank's share of N // WORLD_SIZE samples except in the batch-1 case
CASES = [
    ("decoy", 10, (27, 29), 37, 5, None),
    ("tag", 5, (61, 67), 23, 4, None),
    ("tag", 3, (45, 51), 21, 4, ("AB", "CD", "EF")),
    ("stripe", 2, (47, 53), 19, 4, None),
    ("stripe", 5, (9, 31), 7, 1, None),
]
CASE_IDS = ["decoy", "tag-default", "tag-custom", "stripe", "stripe-batch1"]


def make_set(n, h, w, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, h, w), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    return images, labels


def reference_x(images):
    """The training step's normalisation (tap_fast.train_step): (x / 255 - mean) / std."""
    return images.float().div(255.0).sub(MEAN).div(STD)


def feed_for(images, labels, kind, num_classes, **kw):
    kw = {"variant": "contaminated", "batch_size": 4, "seed": 3, "device": "cpu", "mean": MEAN, "std": STD, **kw}
    return DeviceFeed(images, labels, kind=kind, num_classes=num_classes, **kw)


@pytest.mark.parametrize("drop_last", [True, False], ids=["drop_last", "keep_last"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_batches_equal_reference_contamination(case, variant, drop_last):
    """Every batch of both ranks, two epochs: x, y, mask bit-exact against contaminate() of the whole set
    indexed by the feed's order."""
    kind, num_classes, (h, w), n, b, tags = case
    images, labels = make_set(n, h, w, num_classes)
    ref_x, ref_m = contaminate(images, labels, kind, num_classes, variant=variant, seed=3, tags=tags)
    if variant == "clean":
        assert torch.equal(ref_x, images) and not ref_m.any()
    else:  # the comparison is not vacuous: every sample carries a signal that changed its pixels
        assert ref_m.flatten(1).any(1).all() and not torch.equal(ref_x, images)
    share = n // WORLD_SIZE
    sizes = [b] * (share // b) + ([share % b] if share % b and not drop_last else [])
    for rank in range(WORLD_SIZE):
        feed = feed_for(images, labels, kind, num_classes, variant=variant, batch_size=b, tags=tags,
                        drop_last=drop_last, rank=rank, world_size=WORLD_SIZE)
        assert torch.equal(feed.images, images)  # held clean: contaminated per batch
        orders = []
        for _ in range(2):
            order = feed.order()
            batches = list(feed)
            assert [len(y) for _, y, _ in batches] == sizes and len(feed) == len(sizes)
            assert len(order) == sum(sizes)
            for k, (x, y, m) in enumerate(batches):
                idx = order[k * b:(k + 1) * b]
                assert x.shape == m.shape == (len(idx), 1, h, w)
                assert x.dtype == m.dtype == torch.float32 and y.dtype == torch.int64
                assert torch.equal(x, reference_x(ref_x[idx]))
                assert torch.equal(m, ref_m[idx].float())
                assert torch.equal(y, labels[idx])
            orders.append(order)
        assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch


def test_permuted_variant_moves_the_signal_not_the_positions():
    images, labels = make_set(40, 28, 28, 10)
    batches = {v: next(iter(feed_for(images, labels, "decoy", 10, variant=v, shuffle=False)))
               for v in ("contaminated", "permuted")}
    (xc, _, mc), (xp, _, mp) = batches["contaminated"], batches["permuted"]
    assert torch.equal(mc, mp) and not torch.equal(xc, xp)


@pytest.mark.parametrize("permute,tag_mask,tag_style", [("derangement", "ink", "shrunk"), ("random", "box", "font")])
def test_permute_and_tag_mask_reach_the_placement(permute, tag_mask, tag_style):
    """The feed's permuted tags equal contaminate(..., permute, tag_mask, tag_style) of the whole set; the
    defaults are random, box and font."""
    images, labels = make_set(20, 61, 67, 5)
    ref_x, ref_m = contaminate(images, labels, "tag", 5, variant="permuted", seed=3, permute=permute,
                               tag_mask=tag_mask, tag_style=tag_style)
    other_x, other_m = contaminate(images, labels, "tag", 5, variant="permuted", seed=3,
                                   permute="random" if permute == "derangement" else "derangement",
                                   tag_mask="box" if tag_mask == "ink" else "ink",
                                   tag_style="font" if tag_style == "shrunk" else "shrunk")
    assert not torch.equal(ref_x, other_x) and not torch.equal(ref_m, other_m)
    kw = {} if permute == "random" else {"permute": permute, "tag_mask": tag_mask, "tag_style": tag_style}
    feed = feed_for(images, labels, "tag", 5, variant="permuted", batch_size=20, shuffle=False, **kw)
    x, _, m = next(iter(feed))
    assert torch.equal(x, reference_x(ref_x)) and torch.equal(m, ref_m.float())


def test_no_contamination_gives_zero_masks_and_clean_images():
    images, labels = make_set(17, 13, 11, 3)
    feed = feed_for(images, labels, None, 3, batch_size=17, shuffle=False)
    (x, y, m), = list(feed)
    assert torch.equal(x, reference_x(images)) and torch.equal(y, labels) and not m.any()


def test_drop_last_false_keeps_the_partial_batch():
    images, labels = make_set(23, 28, 28, 10)
    feed = feed_for(images, labels, "decoy", 10, batch_size=5, drop_last=False, shuffle=False)
    sizes = [len(y) for _, y, _ in feed]
    assert sizes == [5, 5, 5, 5, 3] and len(feed) == 5


def test_epochs_advance_and_replay():
    images, labels = make_set(30, 28, 28, 10)
    feed = feed_for(images, labels, "decoy", 10, batch_size=6)
    first = [y for _, y, _ in feed]
    second = [y for _, y, _ in feed]  # iterating advanced to epoch 1
    feed.set_epoch(0)
    replay = [y for _, y, _ in feed]
    assert all(torch.equal(a, b) for a, b in zip(first, replay))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    other_seed = feed_for(images, labels, "decoy", 10, batch_size=6, seed=4)
    assert not torch.equal(other_seed.order(), feed_for(images, labels, "decoy", 10, batch_size=6).order())
    ordered = feed_for(images, labels, "decoy", 10, batch_size=6, shuffle=False)
    assert torch.equal(ordered.order(), torch.arange(30))


@pytest.mark.parametrize("world_size,n,b", [(2, 29, 4), (3, 31, 3), (4, 16, 4)])
def test_ddp_shards_are_disjoint_equal_and_cover(world_size, n, b):
    images, labels = make_set(n, 28, 28, 10)
    share = n // world_size
    for epoch in (0, 1):
        shares, counts = [], []
        for rank in range(world_size):
            feed = feed_for(images, labels, "decoy", 10, batch_size=b, drop_last=False, rank=rank,
                            world_size=world_size)
            feed.set_epoch(epoch)
            order = feed.order()
            ys = torch.cat([y for _, y, _ in feed])
            assert torch.equal(ys, labels[order])  # the batches are the reported order
            shares.append(order)
            counts.append(len(feed_for(images, labels, "decoy", 10, batch_size=b, rank=rank,
                                       world_size=world_size)))
        assert all(len(s) == share for s in shares)
        union = torch.cat(shares)
        assert len(union.unique()) == world_size * share  # disjoint
        perm = epoch_order(n, epoch=epoch, seed=3)  # the same permutation on every rank
        assert torch.equal(union.sort().values, perm[:world_size * share].sort().values)
        assert len(set(counts)) == 1 and counts[0] == share // b  # equal batch counts (drop_last)


def test_feed_on_device_matches_cpu_reference_on_real_mnist():
    """The MNIST set of the paper if present beside the checkout (../shared/data), else skipped."""
    import os

    import numpy as np
    from conftest import SHARED_DATA
    path = os.path.join(SHARED_DATA, "mnist", "mnist.npz")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    with np.load(path) as data:
        images = torch.from_numpy(data["x_train"][:2000]).unsqueeze(1)
        labels = torch.from_numpy(data["y_train"][:2000].astype(np.int64))
    ref_x, ref_m = contaminate(images, labels, "decoy", 10, seed=5)
    feed = feed_for(images, labels, "decoy", 10, batch_size=256, seed=5)
    idx = feed.order()[:256]
    x, y, m = next(iter(feed))
    assert torch.equal(x, reference_x(ref_x[idx])) and torch.equal(m, ref_m[idx].float())
    assert torch.equal(y, labels[idx])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_feed_equals_cpu_reference_without_host_syncs(case):
    kind, num_classes, (h, w), n, b, tags = case
    images, labels = make_set(n, h, w, num_classes)
    ref_x, ref_m = contaminate(images, labels, kind, num_classes, variant="permuted", seed=3, tags=tags)
    feed = feed_for(images, labels, kind, num_classes, variant="permuted", batch_size=b, device="cuda",
                    rank=1, world_size=2, tags=tags)
    order = feed.order()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the per-batch path must stay CUDA-graph friendly
    try:
        batches = list(feed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == len(feed) > 0
    for k, (x, y, m) in enumerate(batches):
        idx = order[k * b:(k + 1) * b]
        assert x.is_cuda and torch.equal(x.cpu(), reference_x(ref_x[idx]))
        assert torch.equal(m.cpu(), ref_m[idx].float()) and torch.equal(y.cpu(), labels[idx])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"images_uint8": torch.zeros(4, 1, 8, 8)}, TypeError, "images_uint8 must be a uint8"),
    ({"images_uint8": torch.zeros(4, 2, 8, 8, dtype=torch.uint8)}, ValueError, r"\(N, C, H, W\) with C = 1 or 3"),
    ({"masks": torch.zeros(4, 1, 28, 27)}, ValueError, r"masks must be a \(4, 1, 28, 28\) tensor"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, ValueError, "labels has 3 entries"),
    ({"labels": torch.zeros(4)}, TypeError, "labels must be a 1-D integer"),
    ({"kind": "blur"}, ValueError, "kind must be one of"),
    ({"variant": "shuffled"}, ValueError, "variant must be one of"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ({"batch_size": 5}, ValueError, "exceeds this rank's share of 4"),
    ({"rank": 2, "world_size": 2}, ValueError, r"rank must be an int in \[0, world_size=2\)"),
    ({"world_size": 0}, ValueError, "world_size must be a positive int"),
    ({"std": 0.0}, ValueError, "std must be positive"),
])
def test_bad_inputs(kwargs, error, match):
    args = {"images_uint8": torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8),
            "labels": torch.tensor([0, 1, 2, 3]), "kind": "decoy", "num_classes": 10, "batch_size": 2,
            "mean": MEAN, "std": STD, "device": "cpu"}
    args.update(kwargs)
    images, labels = args.pop("images_uint8"), args.pop("labels")
    with pytest.raises(error, match=match):
        DeviceFeed(images, labels, **args)


def test_normalise_leaves_its_input_alone():
    """normalise returns a new float32 tensor; a float input (already float32) is not changed in place."""
    x = torch.tensor([[0.0, 127.5, 255.0]])
    before = x.clone()
    out = normalise(x, 0.5, 0.25)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, torch.tensor([[-2.0, 0.0, 2.0]]))
    u8 = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    torch.testing.assert_close(normalise(u8, 0.0, 1.0), torch.tensor([[0.0, 0.2, 1.0]]))


def test_uint8_feed_drives_the_training_step():
    """mean = std = None gives the contaminated uint8 batches that make_step takes: training from the feed
    equals training on contaminate() of the whole set indexed by the feed's order (losses and weights)."""
    import copy

    from tap_fast.compiled_step import make_step
    from tap_fast.models import build_model, tap_points
    from tap_fast.tapped_model import TappedModel

    images, labels = make_set(24, 28, 28, 10)
    feed = feed_for(images, labels, "decoy", 10, batch_size=8, mean=None, std=None)
    ref_x, ref_m = contaminate(images, labels, "decoy", 10, seed=3)
    torch.manual_seed(0)
    models = [TappedModel(build_model("cnn2", 10), tap_points("cnn2"))]
    models.append(copy.deepcopy(models[0]))
    steps = [make_step(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), method="tap", lam=0.1,
                       mean=MEAN, std=STD) for m in models]
    order = feed.order()
    for (x, y, m), idx in zip(feed, order.split(8)):
        assert x.dtype == torch.uint8 and torch.equal(x, ref_x[idx]) and m.any()
        ours = steps[0](x, y, m)
        ref = steps[1](ref_x[idx], labels[idx], ref_m[idx].float())
        assert all(torch.equal(a, b) for a, b in zip(ours, ref)) and ours[2] > 0
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_mean_and_std_go_together():
    images, labels = make_set(8, 9, 9, 2)
    with pytest.raises(ValueError, match="mean and std must both be numbers .* or both be None"):
        DeviceFeed(images, labels, kind=None, num_classes=2, batch_size=2, mean=None, std=0.3, device="cpu")


@pytest.mark.parametrize("channels", [1, 3])
def test_given_masks_are_united_with_the_contamination(channels):
    """A set's own masks (users' annotations) ride with their images; a batch's mask is their union with the
    contamination's, and the images are contaminated as contaminate() does on every channel."""
    g = torch.Generator().manual_seed(3)
    n, size = 9, 28
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    given = (torch.rand(n, 1, size, size, generator=g) < 0.05).to(torch.uint8)
    feed = DeviceFeed(images, labels, kind="decoy", num_classes=10, batch_size=4, mean=None, std=None, seed=5,
                      contamination_seed=11, device="cpu", masks=given)
    ref_x, ref_m = contaminate(images, labels, "decoy", 10, seed=11)
    order = feed.order()
    seen = 0
    for (x, y, m), idx in zip(feed, order.split(4)):
        assert x.shape == (4, channels, size, size) and m.shape == (4, 1, size, size)
        assert torch.equal(x, ref_x[idx]) and torch.equal(y, labels[idx])
        assert torch.equal(m, torch.maximum(ref_m[idx], given[idx]).float())
        seen += 1
    assert seen == 2 and torch.equal(order, epoch_order(n, epoch=0, seed=5)[:8])
    plain = DeviceFeed(images, labels, kind=None, num_classes=10, batch_size=4, mean=None, std=None, seed=5,
                       device="cpu", masks=given)
    x, _, m = next(iter(plain))
    idx = epoch_order(n, epoch=0, seed=5)[:4]
    assert torch.equal(x, images[idx]) and torch.equal(m, given[idx].float())
