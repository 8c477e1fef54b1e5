"""A 5x7 bitmap font (A-Z, 0-9, space) embedded in the source, for the medical text tags of section 5.1.

Tags are rendered bold and monospace, scaled by integer nearest-neighbour replication, so no font file
or font library is needed (the paper's tags are about 22 px high on 224x224 images).
"""
from __future__ import annotations

import torch

GLYPH_ROWS, GLYPH_COLS = 7, 5

# Each glyph: 7 rows of 5 columns, "#" = ink.
_FONT_ROWS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    " ": (".....",) * GLYPH_ROWS,
}
CHARS = "".join(_FONT_ROWS)


def glyph(char: str) -> torch.Tensor:
    """The unscaled (7, 5) bool bitmap of one supported character."""
    if not isinstance(char, str) or char not in _FONT_ROWS:
        raise ValueError(f"char must be one of {CHARS!r}, got {char!r}")
    return torch.tensor([[c == "#" for c in row] for row in _FONT_ROWS[char]], dtype=torch.bool)


def scale_for_height(height: int) -> tuple[int, int]:
    """(scale, bold) whose rendered height 7 * scale + bold is nearest ``height`` (ties: smaller);
    bold = max(1, scale // 3) px of stroke thickening. height 22 -> (3, 1), i.e. exactly 22 px."""
    if not isinstance(height, int) or isinstance(height, bool) or height < 1:
        raise ValueError(f"height must be a positive int, got {height!r}")
    best = min(range(1, height + 1), key=lambda s: abs(GLYPH_ROWS * s + max(1, s // 3) - height))
    return best, max(1, best // 3)


def render(text: str, height: int) -> torch.Tensor:
    """Render ``text`` as a (h, w) CPU bool tensor: bold monospace 5x7 glyphs replicated by an integer
    scale s, each thickened by b = max(1, s // 3) px to the right and down (a (b+1)x(b+1) dilation),
    with s px between glyphs; so h = 7s + b and w = n (5s + b) + (n - 1) s for n characters."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {text!r}")
    bad = sorted({c for c in text if c not in _FONT_ROWS})
    if bad:
        raise ValueError(f"text {text!r} has characters without a glyph: {bad}; supported: {CHARS!r}")
    scale, bold = scale_for_height(height)
    cell_h, cell_w = GLYPH_ROWS * scale + bold, GLYPH_COLS * scale + bold
    out = torch.zeros(cell_h, len(text) * (cell_w + scale) - scale, dtype=torch.bool)
    for i, c in enumerate(text):
        g = glyph(c).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        x0 = i * (cell_w + scale)
        for dy in range(bold + 1):
            for dx in range(bold + 1):
                out[dy:dy + cell_h - bold, x0 + dx:x0 + dx + cell_w - bold] |= g
    return out
