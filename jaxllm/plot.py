"""A loss-curve PNG written with numpy and zlib: no plotting library to install.

Lines, axes, tick labels in a 3x5 pixel font and a legend; enough to see whether a run
went down, flattened or overfit.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Sequence

import numpy as np

# 3x5 glyphs, one string per row, "#" = ink. Only what tick labels and the legend need.
_GLYPHS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"],
    "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"],
    "3": ["###", "..#", "###", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"],
    "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"],
    "7": ["###", "..#", "..#", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"],
    "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."],
    "-": ["...", "...", "###", "...", "..."],
    "e": ["...", "##.", "###", "#..", ".##"],
    "k": ["#..", "#.#", "##.", "#.#", "#.#"],
    "a": ["...", "##.", "..#", "###", "###"],
    "i": [".#.", "...", ".#.", ".#.", ".#."],
    "l": ["##.", ".#.", ".#.", ".#.", "###"],
    "n": ["...", "##.", "#.#", "#.#", "#.#"],
    "r": ["...", "#.#", "##.", "#..", "#.."],
    "t": [".#.", "###", ".#.", ".#.", ".##"],
    "v": ["...", "#.#", "#.#", "#.#", ".#."],
    " ": ["...", "...", "...", "...", "..."],
}
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
SCALE = 2  # font pixels per glyph pixel


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """rgb: uint8 [H, W, 3] -> an 8-bit truecolor PNG file."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def _text(img: np.ndarray, x: int, y: int, s: str, color=(0, 0, 0)) -> None:
    """Draws `s` with its top-left corner at (x, y); characters without a glyph are skipped."""
    for ch in s:
        glyph = _GLYPHS.get(ch)
        if glyph is None:
            continue
        for r, row in enumerate(glyph):
            for c, px in enumerate(row):
                if px == "#":
                    y0, x0 = y + r * SCALE, x + c * SCALE
                    img[max(y0, 0) : y0 + SCALE, max(x0, 0) : x0 + SCALE] = color
        x += 4 * SCALE


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    h, w, _ = img.shape
    ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    for dy in (0, 1):  # two pixels thick
        img[np.clip(ys[ok] + dy, 0, h - 1), xs[ok]] = color


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10000 or abs(v) < 0.01:
        return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.3g}"


def loss_curve(
    path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]], width: int = 720, height: int = 420
) -> None:
    """series: {name: (steps, values)} -> a PNG with one line per series (non-finite points dropped)."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 20, 40
    pts = {}
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if ok.any():
            pts[name] = (xs[ok], ys[ok])
    if pts:
        all_x = np.concatenate([p[0] for p in pts.values()])
        all_y = np.concatenate([p[1] for p in pts.values()])
        x_lo, x_hi = float(all_x.min()), float(all_x.max())
        y_lo, y_hi = float(all_y.min()), float(all_y.max())
    else:
        x_lo, x_hi, y_lo, y_hi = 0.0, 1.0, 0.0, 1.0
    x_hi, y_hi = max(x_hi, x_lo + 1e-9), max(y_hi, y_lo + 1e-9)
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    pw, ph = width - left - right, height - top - bottom

    def to_px(x, y):
        return left + (x - x_lo) / (x_hi - x_lo) * pw, top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    grey, black = (225, 225, 225), (0, 0, 0)
    for i in range(6):
        y = y_lo + (y_hi - y_lo) * i / 5
        _, py = to_px(x_lo, y)
        _line(img, left, py, left + pw, py, grey)
        _text(img, 4, int(py) - 5, _label(y))
        x = x_lo + (x_hi - x_lo) * i / 5
        px, _ = to_px(x, y_lo)
        _line(img, px, top, px, top + ph, grey)
        s = _label(round(x))
        _text(img, int(px) - 4 * SCALE * len(s) // 2, top + ph + 8, s)
    _line(img, left, top, left, top + ph, black)
    _line(img, left, top + ph, left + pw, top + ph, black)
    for k, (name, (xs, ys)) in enumerate(pts.items()):
        color = COLORS[k % len(COLORS)]
        coords = [to_px(x, y) for x, y in zip(xs, ys)]
        for (ax, ay), (bx, by) in zip(coords, coords[1:]):
            _line(img, ax, ay, bx, by, color)
        if len(coords) == 1:
            _line(img, coords[0][0] - 2, coords[0][1], coords[0][0] + 2, coords[0][1], color)
        lx, ly = left + pw - 120, top + 10 + 16 * k
        img[ly + 3 : ly + 7, lx : lx + 20] = color
        _text(img, lx + 26, ly, name)
    write_png(path, img)
