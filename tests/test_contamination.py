"""Contaminations of section 5.1 / Appendix F and the embedded glyph font: exact pixels, masks, randomness."""
import pytest
import torch
import torch.nn.functional as F

from tap_fast.contamination import (KINDS, KNEE_TAGS, PNEU_TAGS, add_decoys, add_stripes, add_text_tags,
                                    contaminate, permuted_signal, signal_permutation, signal_placement, signal_seed,
                                    stripe_step)
from tap_fast.glyphs import CHARS, glyph, render, scale_for_height


def _images(n, h, w, c=1, seed=0):
    """Random uint8 images over the full 0..255 range (so a written value can coincide with the old one)."""
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _bbox(mask2d):
    rows, cols = mask2d.any(1).nonzero().flatten(), mask2d.any(0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _corner(mask2d, bitmap, margin):
    """Which corner (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) ``mask2d`` holds ``bitmap``
    at, ``margin`` px from both edges; None if it is not exactly that."""
    (h, w), (H, W) = bitmap.shape, mask2d.shape
    for i, (top, left) in enumerate([(margin, margin), (margin, W - margin - w), (H - margin - h, margin),
                                     (H - margin - h, W - margin - w)]):
        expected = torch.zeros(H, W, dtype=torch.bool)
        expected[top:top + h, left:left + w] = bitmap
        if torch.equal(mask2d.bool(), expected):
            return i
    return None


def _check_written(x, out, mask, values):
    """out equals values (per image) exactly on the mask and x everywhere else."""
    assert out.dtype == torch.uint8 and mask.dtype == torch.uint8
    assert mask.shape == (x.shape[0], 1, *x.shape[-2:]) and out.shape == x.shape
    assert set(mask.unique().tolist()) <= {0, 1}
    m = mask.bool().expand_as(x)
    expected = torch.where(m, values.to(torch.uint8).view(-1, 1, 1, 1).expand_as(x), x)
    assert torch.equal(out, expected)


# --- glyphs ---------------------------------------------------------------------------------------------

def test_font_has_distinct_glyphs_for_all_letters_and_digits():
    assert set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") <= set(CHARS)
    bitmaps = {c: glyph(c) for c in CHARS if c != " "}
    for c, g in bitmaps.items():
        assert g.shape == (7, 5) and g.dtype == torch.bool and g.any(), c
    keys = [tuple(g.flatten().tolist()) for g in bitmaps.values()]
    assert len(set(keys)) == len(keys)
    assert not glyph(" ").any()


def test_render_is_scaled_and_thickened_glyphs():
    for text, height in [("ABC", 22), ("XYZ", 22), ("MNO", 45), ("Q7", 8)]:
        scale, bold = scale_for_height(height)
        out = render(text, height)
        assert out.dtype == torch.bool
        assert out.shape == (7 * scale + bold, len(text) * (5 * scale + bold) + (len(text) - 1) * scale)
        for i, c in enumerate(text):
            x0 = i * (6 * scale + bold)
            big = glyph(c).repeat_interleave(scale, 0).repeat_interleave(scale, 1).float()[None, None]
            # bold: dilation by a (bold+1)^2 square towards the bottom-right
            ref = F.max_pool2d(F.pad(big, (bold, bold, bold, bold)), bold + 1, stride=1)[0, 0]
            assert torch.equal(out[:, x0:x0 + 5 * scale + bold], ref.bool()), (text, c)
            if i:  # an empty gap of `scale` columns between glyphs
                assert not out[:, x0 - scale:x0].any()


def test_render_height_is_22_px_at_224_and_monospace():
    assert render("ABC", 22).shape == (22, 54)
    assert render("III", 22).shape == render("MMM", 22).shape == render("ABC", 22).shape
    i = render("I", 22)
    assert int(i[10].sum()) == 4  # the stem of "I": 3 px scaled + 1 px bold
    for height in range(1, 60):
        scale, bold = scale_for_height(height)
        h = 7 * scale + bold
        for other in (scale - 1, scale + 1):
            if other >= 1:
                assert abs(h - height) <= abs(7 * other + max(1, other // 3) - height)


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="without a glyph"):
        render("abc", 22)
    with pytest.raises(ValueError, match="text"):
        render("", 22)
    with pytest.raises(ValueError, match="height"):
        render("A", 0)
    with pytest.raises(ValueError, match="char"):
        glyph("?")


# --- decoys ---------------------------------------------------------------------------------------------

def test_decoys_write_a_4x4_patch_valued_255_minus_25y_in_a_corner():
    x = _images(64, 28, 28)
    signal = torch.arange(64) % 10
    out, mask = add_decoys(x, signal, generator=torch.Generator().manual_seed(1))
    _check_written(x, out, mask, 255 - 25 * signal)
    for m in mask[:, 0]:
        top, bottom, left, right = _bbox(m)
        assert int(m.sum()) == 16 and (bottom - top, right - left) == (4, 4)
        assert top in (0, 24) and left in (0, 24)


def test_decoy_corners_are_random_and_seeded():
    x, signal = _images(400, 28, 28), torch.randint(0, 10, (400,))
    _, mask = add_decoys(x, signal, generator=torch.Generator().manual_seed(3))
    corners = [(_bbox(m)[0], _bbox(m)[2]) for m in mask[:, 0]]
    counts = {c: corners.count(c) for c in set(corners)}
    assert set(counts) == {(0, 0), (0, 24), (24, 0), (24, 24)} and min(counts.values()) > 60
    again = add_decoys(x, signal, generator=torch.Generator().manual_seed(3))
    other = add_decoys(x, signal, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again[1], mask) and not torch.equal(other[1], mask)


def test_decoys_write_every_channel():
    x = _images(8, 28, 28, c=3)
    signal = torch.arange(8)
    out, mask = add_decoys(x, signal, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (8, 1, 28, 28)
    _check_written(x, out, mask, 255 - 25 * signal)


# --- text tags ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tags", [PNEU_TAGS, KNEE_TAGS])
def test_tags_write_white_glyphs_of_the_signal_in_a_corner(tags):
    x = _images(24, 224, 224)
    signal = torch.arange(24) % len(tags)
    out, mask = add_text_tags(x, signal, tags, generator=torch.Generator().manual_seed(2), tag_mask="ink")
    _check_written(x, out, mask, torch.full((24,), 255))
    corners = []
    for m, s in zip(mask[:, 0], signal.tolist()):
        glyphs = render(tags[s], 22)
        assert glyphs.shape[0] == 22  # "about 22 px high" on 224x224
        corners.append(_corner(m, glyphs, margin=6))
    assert None not in corners and len(set(corners)) > 1


def test_tags_differ_by_label():
    x = _images(2, 224, 224)
    masks = [add_text_tags(x, torch.full((2,), s), KNEE_TAGS, generator=torch.Generator().manual_seed(0),
                           tag_mask="ink")[1] for s in range(5)]
    for a in range(5):
        for b in range(a + 1, 5):
            assert not torch.equal(masks[a], masks[b])


@pytest.mark.parametrize("size", [224, 80])  # 80: the smallest scaled font (below, tags are shrunk 224 px ones)
def test_box_masks_cover_the_tags_box_and_ink_masks_its_pixels(size):
    """tag_mask "box" (the default: annotators draw boxes, and the released mask is the tag's box) masks the
    tag's whole rendered box, in the corner of its ink; "ink" the pixels written; the images are the same."""
    x, signal = _images(12, size, size), torch.arange(12) % 2
    out_box, box = add_text_tags(x, signal, PNEU_TAGS, generator=torch.Generator().manual_seed(1))
    out_ink, ink = add_text_tags(x, signal, PNEU_TAGS, generator=torch.Generator().manual_seed(1), tag_mask="ink")
    assert torch.equal(out_box, out_ink)
    _check_written(x, out_ink, ink, torch.full((12,), 255))
    height, margin = max(5, round(22 * size / 224)), max(1, round(6 * size / 224))
    for b, i, s in zip(box[:, 0], ink[:, 0], signal.tolist()):
        glyphs = render(PNEU_TAGS[s], height)
        corner = _corner(i, glyphs, margin)
        assert corner is not None and _corner(b, torch.ones_like(glyphs), margin) == corner
    assert bool((box >= ink).all()) and box.sum() > ink.sum()
    if size == 224:  # ABC / XYZ: 642 / 516 px of ink in a 22 x 54 box
        assert box.sum((1, 2, 3)).tolist() == [22 * 54] * 12
        assert ink.sum((1, 2, 3)).tolist() == [642, 516] * 6
    _, default = contaminate(x, signal, "tag", 2, seed=1)
    _, default_ink = contaminate(x, signal, "tag", 2, seed=1, tag_mask="ink")
    assert bool((default >= default_ink).all()) and int(default.sum()) == 12 * render("ABC", height).numel()


def test_tag_corners_are_random_and_seeded():
    x, signal = _images(200, 80, 80), torch.randint(0, 2, (200,))
    def ink(seed):
        return add_text_tags(x, signal, PNEU_TAGS, generator=torch.Generator().manual_seed(seed), tag_mask="ink")[1]

    mask = ink(5)
    corners = [_corner(m, render(PNEU_TAGS[s], 8), margin=2) for m, s in zip(mask[:, 0], signal.tolist())]
    assert sorted(set(corners)) == [0, 1, 2, 3] and min(corners.count(c) for c in range(4)) > 25
    assert torch.equal(ink(5), mask) and not torch.equal(ink(6), mask)


@pytest.mark.parametrize("size", [80, 96, 112, 160])  # below 77 px: test_small_images_get_shrunk_224px_tags
def test_tag_height_and_margin_scale_with_image_size(size):
    x = _images(6, size, size)
    signal = torch.arange(6) % 2
    out, mask = add_text_tags(x, signal, PNEU_TAGS, generator=torch.Generator().manual_seed(0), tag_mask="ink")
    _check_written(x, out, mask, torch.full((6,), 255))
    target = max(5, round(22 * size / 224))
    margin = max(1, round(6 * size / 224))
    scale, bold = scale_for_height(target)
    for m, s in zip(mask[:, 0], signal.tolist()):
        glyphs = render(PNEU_TAGS[s], target)
        assert glyphs.shape[0] == 7 * scale + bold
        assert _corner(m, glyphs, margin) is not None
    _, mask = add_text_tags(x, signal, PNEU_TAGS, height=8, generator=torch.Generator().manual_seed(0))
    assert all(_bbox(m)[1] - _bbox(m)[0] == 8 for m in mask[:, 0])


def test_tags_reject_bad_arguments():
    x = _images(2, 64, 64)
    with pytest.raises(ValueError, match="distinct"):
        add_text_tags(x, torch.tensor([0, 1]), ("ABC", "ABC"))
    with pytest.raises(ValueError, match="tags"):
        add_text_tags(x, torch.tensor([0, 1]), "ABC")
    with pytest.raises(ValueError, match="signal"):
        add_text_tags(x, torch.tensor([0, 2]), PNEU_TAGS)
    with pytest.raises(ValueError, match="does not fit"):
        add_text_tags(_images(2, 10, 10), torch.tensor([0, 1]), PNEU_TAGS, height=8)
    with pytest.raises(ValueError, match="does not fit 224x45 images .*reference canvas of 40x8 images"):
        add_text_tags(_images(2, 40, 8), torch.tensor([0, 1]), PNEU_TAGS, tag_style="shrunk")  # shrunk: too narrow at 224 px too


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tags", [PNEU_TAGS, KNEE_TAGS])
def test_small_images_get_shrunk_224px_tags(tags):
    """With tag_style "shrunk", below 77 px (round(22 H / 224) under the font's smallest, 8 px render) a tag is the 224 px one burnt
    into the image upsampled x8 and area-averaged back to 28 px, within a grey level (coverage is stored as
    round(255 a)); the same seed draws the same corners at both sizes, and the tag keeps its 224 px share."""
    n = 40
    small, signal = _images(n, 28, 28, c=3, seed=4), torch.arange(n) % len(tags)
    big = small.repeat_interleave(8, 2).repeat_interleave(8, 3)  # nearest x8
    big_out, big_ink = add_text_tags(big, signal, tags, generator=_seeded(3), tag_mask="ink")
    _check_written(big, big_out, big_ink, torch.full((n,), 255))  # the bool path at 224
    corners = [_corner(m, render(tags[s], 22), margin=6) for m, s in zip(big_ink[:, 0], signal.tolist())]
    assert None not in corners and len(set(corners)) == 4
    out, mask = add_text_tags(small, signal, tags, generator=_seeded(3), tag_style="shrunk")
    assert out.dtype == torch.uint8 and out.shape == small.shape
    assert (out.float() - F.avg_pool2d(big_out.float(), 8).round()).abs().max() <= 1
    outside = ~mask.bool().expand_as(small)
    assert torch.equal(out[outside], small[outside]) and bool((out != small).any((1, 2, 3)).all())
    placement = signal_placement(signal, "tag", len(tags), height=28, width=28, tags=tags, tag_style="shrunk")
    assert placement.templates.dtype == torch.uint8 and placement.templates.shape == (4 * len(tags), 28, 28)
    ink_224 = torch.tensor([float(render(t, 22).sum()) for t in tags]).repeat_interleave(4)
    assert torch.allclose(placement.templates.float().sum((1, 2)) / 255, ink_224 / 64, atol=0.1)


def test_small_tag_masks_are_the_pixels_the_shrunk_box_and_ink_touch():
    """At 28 px the box mask is the 22 x 54 box of the 224 px corner (6 px margin) shrunk by 8: every pixel it
    touches (2.75 x 6.75 px at 0.75 px from the edges: 4 x 8 pixels in the corner); ink is inside it."""
    n, f = 24, 224 // 28
    x, signal = _images(n, 28, 28), torch.arange(n) % 2
    _, box = add_text_tags(x, signal, PNEU_TAGS, generator=_seeded(7), tag_style="shrunk")
    out, ink = add_text_tags(x, signal, PNEU_TAGS, generator=_seeded(7), tag_mask="ink", tag_style="shrunk")
    _, big_box = add_text_tags(_images(n, 224, 224), signal, PNEU_TAGS, generator=_seeded(7))  # same corners
    h, w = render(PNEU_TAGS[0], 22).shape
    assert render(PNEU_TAGS[1], 22).shape == (h, w)
    corners = []
    for b, bb in zip(box[:, 0], big_box[:, 0]):
        corner = _corner(bb, torch.ones(h, w, dtype=torch.bool), margin=6)
        top, left = (6, 6, 224 - 6 - h, 224 - 6 - h)[corner], (6, 224 - 6 - w, 6, 224 - 6 - w)[corner]
        expected = torch.zeros(28, 28, dtype=torch.bool)
        expected[top // f:-(-(top + h) // f), left // f:-(-(left + w) // f)] = True
        assert torch.equal(b.bool(), expected)
        corners.append(corner)
    assert len(set(corners)) == 4
    assert box.dtype == ink.dtype == torch.uint8 and set(box.unique().tolist()) == {0, 1}
    assert bool((box >= ink).all()) and box.sum() > ink.sum() and bool(ink.any((1, 2, 3)).all())
    outside = ~ink.bool()
    assert torch.equal(out[outside], x[outside])


@pytest.mark.parametrize("tags", [PNEU_TAGS, KNEE_TAGS])
def test_small_tags_stay_distinguishable(tags):
    """At 28 px every tag gives a different image on the same background and corner (same seed)."""
    for x in (_images(6, 28, 28, seed=9), torch.zeros(6, 1, 28, 28, dtype=torch.uint8)):
        outs = [add_text_tags(x, torch.full((6,), s), tags, generator=_seeded(0), tag_style="shrunk")[0]
                for s in range(len(tags))]
        for a in range(len(tags)):
            for b in range(a + 1, len(tags)):
                assert bool((outs[a] != outs[b]).any((1, 2, 3)).all()), (tags[a], tags[b])


def test_small_non_square_images_get_shrunk_tags():
    """30 x 41 px: tags drawn on a 224 x round(224 * 41 / 30) canvas and shrunk; masks have the image's shape,
    boxes sit in a corner, the coverage keeps the tag's share of the image, and a placement applied per
    batch equals contaminate."""
    n, size = 16, (30, 41)
    x, signal = _images(n, *size, c=3, seed=5), torch.arange(n) % 5
    out, box = add_text_tags(x, signal, KNEE_TAGS, generator=_seeded(2), tag_style="shrunk")
    out_ink, ink = add_text_tags(x, signal, KNEE_TAGS, generator=_seeded(2), tag_mask="ink", tag_style="shrunk")
    assert torch.equal(out, out_ink) and out.shape == x.shape and out.dtype == torch.uint8
    assert box.shape == ink.shape == (n, 1, *size) and box.dtype == ink.dtype == torch.uint8
    assert bool((box >= ink).all()) and bool(ink.any((1, 2, 3)).all())
    outside = ~ink.bool().expand_as(x)
    assert torch.equal(out[outside], x[outside])
    for b in box[:, 0]:
        r0, r1, c0, c1 = _bbox(b)
        assert (r0 == 0 or r1 == size[0]) and (c0 == 0 or c1 == size[1]) and int(b.sum()) == (r1 - r0) * (c1 - c0)
    placement = signal_placement(signal, "tag", 5, height=size[0], width=size[1], seed=11, tag_style="shrunk")
    ref_w = round(224 * size[1] / size[0])
    ink_224 = torch.tensor([float(render(t, 22).sum()) for t in KNEE_TAGS]).repeat_interleave(4)
    share = placement.templates.float().sum((1, 2)) / 255 / (size[0] * size[1])
    assert torch.allclose(share, ink_224 / (224 * ref_w), rtol=0.1)
    want_x, want_m = contaminate(x, signal, "tag", 5, seed=11, tag_style="shrunk")
    samples = torch.tensor([3, 0, 3, 15])
    got_x, got_m = placement.apply(x[samples], samples)
    assert torch.equal(got_x, want_x[samples]) and torch.equal(got_m, want_m[samples])


@pytest.mark.parametrize("size, height, margin", [(224, 22, 6), (96, 8, 3), (77, 8, 2)])
def test_larger_images_and_explicit_heights_keep_the_scaled_font(size, height, margin):
    """With tag_style "shrunk": from 77 px up (round(22 H / 224) >= 8) and with an explicit height, tags are bool templates: pixels are
    255 or the original, the tag the scaled font in its corner; 76 px is the first shrunk size."""
    x, signal = _images(12, size, size), torch.arange(12) % 2
    placement = signal_placement(signal, "tag", 2, height=size, width=size, seed=1, tag_mask="ink",
                                 tag_style="shrunk")
    assert placement.templates.dtype == torch.bool
    out, ink = contaminate(x, signal, "tag", 2, seed=1, tag_mask="ink", tag_style="shrunk")
    _check_written(x, out, ink, torch.full((12,), 255))
    assert set(out[out != x].unique().tolist()) == {255}
    assert all(_corner(m, render(PNEU_TAGS[s], height), margin) is not None
               for m, s in zip(ink[:, 0], signal.tolist()))
    assert signal_placement(signal, "tag", 2, height=76, width=76, tag_style="shrunk").templates.dtype == torch.uint8
    small = _images(12, 28, 28)
    out, ink = add_text_tags(small, signal, PNEU_TAGS, height=8, generator=_seeded(1), tag_mask="ink",
                             tag_style="shrunk")
    _check_written(small, out, ink, torch.full((12,), 255))
    assert all(_corner(m, render(PNEU_TAGS[s], 8), margin=1) is not None for m, s in zip(ink[:, 0], signal.tolist()))


def test_small_images_default_to_the_fonts_smallest_render():
    """tag_style "font" (the default): at 28 px a tag is the font's 8 px render (bool, white, 1 px from the
    edge), a stronger signal than the shrunk grey one; any other style is refused by name."""
    x, signal = _images(12, 28, 28), torch.arange(12) % 2
    assert signal_placement(signal, "tag", 2, height=28, width=28).templates.dtype == torch.bool
    out, ink = add_text_tags(x, signal, PNEU_TAGS, generator=_seeded(1), tag_mask="ink")
    assert torch.equal(out, add_text_tags(x, signal, PNEU_TAGS, height=5, generator=_seeded(1), tag_mask="ink")[0])
    _check_written(x, out, ink, torch.full((12,), 255))
    assert all(_corner(m, render(PNEU_TAGS[s], 8), margin=1) is not None for m, s in zip(ink[:, 0], signal.tolist()))
    for call in (lambda: add_text_tags(x, signal, PNEU_TAGS, tag_style="tiny"),
                 lambda: contaminate(x, signal, "tag", 2, tag_style="tiny")):
        with pytest.raises(ValueError, match="tag_style must be one of"):
            call()


# --- stripes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes, step", [(2, 127), (5, 51)])
def test_stripes_are_6px_full_height_near_an_edge_with_class_brightness(num_classes, step):
    x = _images(200, 32, 224)  # stripe geometry follows the width; a short height keeps this fast
    signal = torch.arange(200) % num_classes
    out, mask = add_stripes(x, signal, num_classes, generator=torch.Generator().manual_seed(7))
    _check_written(x, out, mask, 255 - step * signal)
    positions = []
    for m in mask[:, 0].bool():
        cols = m.any(0).nonzero().flatten()
        assert len(cols) == 6 and int(cols[-1] - cols[0]) == 5  # one contiguous 6 px stripe
        assert m[:, cols].all()  # full height
        left, right = int(cols[0]), 224 - int(cols[-1]) - 1
        assert min(left, right) <= 15
        positions.append(("L", left) if left <= 15 else ("R", right))
    assert {side for side, _ in positions} == {"L", "R"}
    assert len(set(positions)) >= 24  # 32 possible (side, offset) pairs
    assert {off for _, off in positions} == set(range(16))


def test_stripe_step_and_small_images():
    assert [stripe_step(k) for k in (2, 3, 5, 11)] == [127, 127, 51, 25]
    x = _images(40, 28, 28)
    signal = torch.arange(40) % 3
    out, mask = add_stripes(x, signal, 3, generator=torch.Generator().manual_seed(0))
    _check_written(x, out, mask, 255 - 127 * signal)
    for m in mask[:, 0].bool():
        cols = m.any(0).nonzero().flatten().tolist()
        assert len(cols) == 1 and min(cols[0], 27 - cols[0]) <= 2  # width 6*28/224 -> 1, offset 15*28/224 -> 2
    with pytest.raises(ValueError, match="num_classes"):
        stripe_step(1)


# --- permutations ---------------------------------------------------------------------------------------

def _table(rows, cols, shape):
    """The contingency table (counts) of the pairs (rows[i], cols[i])."""
    table = torch.zeros(shape, dtype=torch.long)
    return table.index_put_((rows, cols), torch.ones_like(rows), accumulate=True)


def _chi_square(table):
    """Pearson's chi-square statistic of ``table`` against independent uniform rows and columns."""
    expected = table.sum() / table.numel()
    return float(((table - expected) ** 2 / expected).sum())


def test_signal_permutation_is_a_derangement():
    assert signal_permutation(2).tolist() == [1, 0]
    perms = set()
    for k in (3, 5, 10):
        for seed in range(30):
            p = signal_permutation(k, generator=torch.Generator().manual_seed(seed))
            assert sorted(p.tolist()) == list(range(k)) and not p.eq(torch.arange(k)).any()  # no fixed point
            perms.add(tuple(p.tolist()))
    assert len(perms) > 50
    assert {tuple(signal_permutation(3, generator=torch.Generator().manual_seed(s)).tolist())
            for s in range(30)} == {(1, 2, 0), (2, 0, 1)}  # the only derangements of 3


def test_derangement_maps_each_label_to_one_other_signal():
    labels = torch.randint(0, 5, (300,))
    signal = permuted_signal(labels, 5, permute="derangement", generator=torch.Generator().manual_seed(0))
    perm = [int(signal[labels == y].unique().item()) for y in range(5)]  # one signal per label
    assert sorted(perm) == list(range(5)) and all(p != y for y, p in enumerate(perm))
    assert torch.equal(signal, signal_permutation(5, generator=torch.Generator().manual_seed(0))[labels])
    with pytest.raises(ValueError, match="labels"):
        permuted_signal(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="permute must be one of"):
        permuted_signal(labels, 5, permute="shuffle")


def test_random_permuted_signal_is_uniform_and_independent_of_the_label():
    """permute="random": a signal per image uniform over the classes whatever its label (section 5.1
    "randomises the patch assignment"). Seed 0, 400 images per label: the label x signal counts below
    (80 expected per cell; the diagonal, images that keep their own signal, holds 420 of 2000, about 1/5)."""
    labels = torch.arange(2000) % 5
    signal = permuted_signal(labels, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(signal, torch.randint(5, (2000,), generator=torch.Generator().manual_seed(0)))
    table = _table(labels, signal, (5, 5))
    assert table.tolist() == [[100, 76, 65, 84, 75], [77, 81, 83, 85, 74], [83, 73, 73, 88, 83],
                              [83, 83, 82, 81, 71], [79, 84, 84, 68, 85]]
    assert _chi_square(table) == pytest.approx(15.6) and _chi_square(table) < 32.0  # 16 dof: p > 0.01
    assert int(table.diag().sum()) == 420


@pytest.mark.parametrize("permute", ["random", "derangement"])
def test_binary_tasks_swap(permute):
    labels = torch.tensor([0, 1, 1, 0, 1])
    signal = permuted_signal(labels, 2, permute=permute, generator=torch.Generator().manual_seed(4))
    assert torch.equal(signal, 1 - labels)


def test_permuted_decoys_are_independent_of_label_and_corner():
    """The permuted signal is drawn from its own stream (signal_seed): drawn from the positions' stream,
    randint(10) and randint(4) of the same draws would share their parity, tying signal to corner."""
    assert signal_seed(3) == 3 ^ 0x9E3779B9 and signal_seed(-1) == 0xFFFFFFFF ^ 0x9E3779B9
    labels = torch.arange(2000) % 10
    placement = signal_placement(labels, "decoy", 10, height=28, width=28, variant="permuted", seed=3)
    signal, corner = (255 - placement.values.long()) // 25, placement.index
    want = permuted_signal(labels, 10, generator=torch.Generator().manual_seed(signal_seed(3)))
    assert torch.equal(signal, want)
    contaminated = signal_placement(labels, "decoy", 10, height=28, width=28, seed=3)
    assert torch.equal(corner, contaminated.index)  # the same positions as the contaminated set
    assert _chi_square(_table(signal, corner, (10, 4))) < 47.0  # 27 dof: p > 0.01 (measured 40.2)
    assert _chi_square(_table(labels, signal, (10, 10))) < 113.5  # 81 dof: p > 0.01 (measured 87.7)
    same_stream = torch.randint(10, (2000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(same_stream % 2, corner % 2)  # what a signal from the positions' stream would be


# --- contaminate ----------------------------------------------------------------------------------------

def _data(kind, n=60, num_classes=5):
    size = 28 if kind == "decoy" else 96
    return _images(n, size, size, seed=11), torch.arange(n) % num_classes


@pytest.mark.parametrize("kind", KINDS)
def test_clean_variant_returns_unchanged_images(kind):
    x, y = _data(kind)
    out, mask = contaminate(x, y, kind, 5, variant="clean", seed=3)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert mask.shape == (60, 1, *x.shape[-2:]) and mask.dtype == torch.uint8 and not mask.any()


def _signal_values(out, mask):
    """The value written at each image's masked pixels (one per image)."""
    return torch.stack([o[0][m[0].bool()].unique().squeeze() for o, m in zip(out, mask)])


@pytest.mark.parametrize("permute", ["random", "derangement"])
@pytest.mark.parametrize("kind", ["decoy", "stripe"])
def test_permuted_variant_changes_the_assignment_at_the_same_positions(kind, permute):
    x, y = _data(kind)
    out, mask = contaminate(x, y, kind, 5, variant="contaminated", seed=4)
    pout, pmask = contaminate(x, y, kind, 5, variant="permuted", seed=4, permute=permute)
    step = 25 if kind == "decoy" else 51
    assert torch.equal(_signal_values(out, mask), 255 - step * y)
    assert torch.equal(pmask, mask)  # same positions, other signal
    values = _signal_values(pout, pmask)
    want = permuted_signal(y, 5, permute=permute, generator=torch.Generator().manual_seed(signal_seed(4)))
    assert torch.equal(values, 255 - step * want)
    if permute == "derangement":
        assert not want.eq(y).any()
    else:
        assert 0 < int(want.eq(y).sum()) < 60 and len(want[y == 0].unique()) > 1  # no longer a function of y
    _check_written(x, pout, pmask, values)


@pytest.mark.parametrize("num_classes, tags", [(2, PNEU_TAGS), (5, KNEE_TAGS)])
def test_tag_variants_use_default_tags_and_permute_them(num_classes, tags):
    x, y = _data("tag", num_classes=num_classes)
    glyphs = [render(t, round(22 * 96 / 224)) for t in tags]

    def carried(mask):
        return torch.tensor([next(i for i, g in enumerate(glyphs) if _corner(m, g, margin=3) is not None)
                             for m in mask[:, 0]])

    out, mask = contaminate(x, y, "tag", num_classes, seed=1, tag_mask="ink")
    assert torch.equal(carried(mask), y)
    _check_written(x, out, mask, torch.full((60,), 255))
    pout, pmask = contaminate(x, y, "tag", num_classes, variant="permuted", seed=1, tag_mask="ink")
    signal = carried(pmask)
    want = 1 - y if num_classes == 2 else permuted_signal(
        y, num_classes, generator=torch.Generator().manual_seed(signal_seed(1)))
    assert torch.equal(signal, want) and not torch.equal(signal, y)
    _check_written(x, pout, pmask, torch.full((60,), 255))
    custom, cmask = contaminate(x, y, "tag", num_classes, seed=1, tags=tuple("QRSTUVWXYZ"[:num_classes]),
                                tag_mask="ink")
    assert not torch.equal(cmask, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_contaminate_is_deterministic_per_seed(kind):
    x, y = _data(kind)
    for variant in ("contaminated", "permuted"):
        a = contaminate(x, y, kind, 5, variant=variant, seed=8)
        b = contaminate(x, y, kind, 5, variant=variant, seed=8)
        c = contaminate(x, y, kind, 5, variant=variant, seed=9)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], c[1])


def test_contaminate_rejects_bad_arguments():
    x, y = _data("decoy")
    with pytest.raises(ValueError, match="kind must be one of"):
        contaminate(x, y, "patch", 5)
    with pytest.raises(ValueError, match="variant"):
        contaminate(x, y, "decoy", 5, variant="shuffled")
    with pytest.raises(ValueError, match=r"permute must be one of \('random', 'derangement'\)"):
        contaminate(x, y, "decoy", 5, variant="permuted", permute="swap")
    with pytest.raises(ValueError, match=r"tag_mask must be one of \('box', 'ink'\)"):
        contaminate(x, y, "decoy", 5, tag_mask="outline")
    with pytest.raises(TypeError, match="uint8"):
        contaminate(x.float(), y, "decoy", 5)
    with pytest.raises(ValueError, match="shape"):
        contaminate(x[:, 0], y, "decoy", 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        contaminate(x, y + 1, "decoy", 5)
    with pytest.raises(ValueError, match="labels must have shape"):
        contaminate(x, y[:-1], "decoy", 5)
    with pytest.raises(TypeError, match="integer"):
        contaminate(x, y.float(), "decoy", 5)
    with pytest.raises(ValueError, match="tags apply"):
        contaminate(x, y, "decoy", 5, tags=KNEE_TAGS)
    with pytest.raises(ValueError, match="tags must be given"):
        contaminate(x, y % 3, "tag", 3)
    with pytest.raises(ValueError, match="one string per class"):
        contaminate(_images(60, 96, 96), y, "tag", 5, tags=PNEU_TAGS)
    with pytest.raises(ValueError, match="num_classes"):
        contaminate(x, y * 0, "decoy", 1)
    with pytest.raises(ValueError, match=r"signal must lie in \[0, 11\)"):
        add_decoys(x[:2], torch.tensor([0, 11]))


def test_empty_batch():
    out, mask = contaminate(_images(0, 28, 28), torch.zeros(0, dtype=torch.long), "decoy", 10)
    assert out.shape == (0, 1, 28, 28) and mask.shape == (0, 1, 28, 28)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    x, y = _data(kind)
    for variant in ("contaminated", "permuted", "clean"):
        cpu = contaminate(x, y, kind, 5, variant=variant, seed=2)
        gpu = contaminate(x.cuda(), y.cuda(), kind, 5, variant=variant, seed=2)
        assert gpu[0].is_cuda and gpu[1].is_cuda
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    generator = torch.Generator(device="cuda").manual_seed(0)
    out, mask = add_decoys(_images(4, 28, 28).cuda(), torch.arange(4, device="cuda"), generator=generator)
    assert out.is_cuda and int(mask.sum()) == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_for_shrunk_tags():
    x, y = _images(30, 28, 28, c=3, seed=2), torch.arange(30) % 5
    for tag_mask in ("box", "ink"):
        cpu = contaminate(x, y, "tag", 5, variant="permuted", seed=2, tag_mask=tag_mask, tag_style="shrunk")
        gpu = contaminate(x.cuda(), y.cuda(), "tag", 5, variant="permuted", seed=2, tag_mask=tag_mask,
                          tag_style="shrunk")
        assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


@pytest.mark.parametrize("kind,classes,size", [("decoy", 10, (28, 28)), ("tag", 5, (97, 131)), ("tag", 2, (28, 28)),
                                               ("stripe", 2, (224, 224))])
@pytest.mark.parametrize("variant", ["contaminated", "permuted"])
def test_placement_applied_per_batch_equals_contaminate(kind, classes, size, variant):
    """A feed's per-batch contamination (any subset of samples, in any order) equals contaminate's rows, and
    the placement holds a few templates plus two numbers per sample instead of N masks."""
    n = 23
    images = _images(n, *size, seed=3)
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(4))
    want_x, want_m = contaminate(images, labels, kind, classes, variant=variant, seed=11)
    placement = signal_placement(labels, kind, classes, height=size[0], width=size[1], variant=variant, seed=11)
    assert placement.index.shape == placement.values.shape == (n,)
    assert placement.templates.shape[0] <= 2 * (15 * size[1] // 224 + 2) * classes
    assert want_m.sum() > 0
    for samples in (torch.tensor([7]), torch.tensor([22, 0, 13, 13, 5]), torch.arange(n)):
        x, m = placement.apply(images[samples], samples)
        assert torch.equal(x, want_x[samples]) and torch.equal(m, want_m[samples])
    assert signal_placement(labels, kind, classes, height=size[0], width=size[1], variant="clean") is None


def test_placement_bad_inputs():
    labels = torch.tensor([0, 1, 1])
    placement = signal_placement(labels, "stripe", 2, height=40, width=50)
    with pytest.raises(ValueError, match=r"images must have shape \(3, C, 40, 50\)"):
        placement.apply(_images(3, 40, 49))
    with pytest.raises(ValueError, match=r"images must have shape \(2, C, 40, 50\)"):
        placement.apply(_images(3, 40, 50), torch.tensor([0, 2]))
    for size in (dict(height=0, width=50), dict(height=40, width=28.0)):
        with pytest.raises(ValueError, match="(height|width) must be a positive int"):
            signal_placement(labels, "stripe", 2, **size)
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        signal_placement(labels.view(3, 1), "stripe", 2, height=40, width=50)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        signal_placement(torch.tensor([0, 2]), "stripe", 2, height=40, width=50)
