"""Pictures of alignDRAW's outputs, drawn with Pillow + numpy (no plotting library).

Mansimov et al., "Generating Images from Captions with Attention", ICLR 2016
(https://arxiv.org/abs/1511.02793). The paper's three kinds of figure: sample grids with
captions (`image_grid`); the canvas after each step with its write-attention box
(`canvas_frames`, `save_gif`, `steps_strip`); the words each step attended to
(`alignment_heatmap`). Functions are pure: numpy arrays or torch tensors in [0, 1] in
(out-of-range values clipped, NaN drawn as 0), new `PIL.Image`s out.

Symbols: B batch, T steps, L words, C/H/W image channels/height/width.
Boxes are `(x0, y0, x1, y1)` in pixel-index coordinates (pixel centres at integers, as
DRAW's filterbank means are); a box covers pixels x0..x1 and y0..y1 inclusive.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ArrayLike = np.ndarray | torch.Tensor
RGB = tuple[int, int, int]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

RED: RGB = (255, 0, 0)
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
# Heatmap colour stops (weight -> RGB): white, a mid blue, near-black. Darkness grows
# monotonically with the weight, so the figure also reads in grayscale print.
_HEAT_STOPS = (0.0, 0.6, 1.0)
_HEAT_COLOURS = ((255, 255, 255), (33, 102, 172), (8, 10, 40))
_FONT_SIZE = 12


def to_numpy(x: ArrayLike) -> np.ndarray:
    """Any array or tensor (any device, with or without grad) -> float32 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 in [0, 255]; clips out-of-range values, NaN -> 0."""
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_images(images: np.ndarray, name: str) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, C, H, W) with C in {{1, 3}}, "
                         f"got {tuple(images.shape)}")


def _to_pil(image: np.ndarray, scale: int = 1) -> Image.Image:
    """One image (C, H, W) in [0, 1] -> RGB PIL image upscaled by `scale` (nearest)."""
    hwc = _to_uint8(image).transpose(1, 2, 0)  # (H, W, C)
    if hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)  # grayscale shown as RGB: (H, W, 3)
    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    if scale > 1:
        # Nearest-neighbour upscaling by block repetition keeps pixels crisp and exact.
        hwc = hwc.repeat(scale, axis=0).repeat(scale, axis=1)  # (H*s, W*s, 3)
    return Image.fromarray(np.ascontiguousarray(hwc), mode="RGB")


def _font() -> Font:
    """Pillow's bundled font; at 12 px its word gaps stay visible (at 10 px they vanish)."""
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    return font.getbbox("Ag|")[3] + 2


def _wrap(text: str, font: Font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is cut by characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > width and len(word) > 1:
            cut = max(1, sum(1 for i in range(1, len(word) + 1)
                             if font.getlength(word[:i]) <= width))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return lines + [line] if line else lines


def _tile(tiles: Sequence[Image.Image], nrow: int, padding: int,
          background: RGB = WHITE) -> Image.Image:
    """Paste equal-sized tiles into a grid with `nrow` tiles per row and `padding` px gaps."""
    w, h = tiles[0].size
    rows = math.ceil(len(tiles) / nrow)
    grid = Image.new("RGB", (nrow * (w + padding) + padding, rows * (h + padding) + padding),
                     background)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid.paste(tile, (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def _add_caption(tile: Image.Image, lines: list[str], height: int, font: Font) -> Image.Image:
    """Return `tile` with a white panel of `height` px below it holding `lines` of text."""
    out = Image.new("RGB", (tile.width, tile.height + height), WHITE)
    out.paste(tile, (0, 0))
    draw = ImageDraw.Draw(out)
    line_h = _line_height(font)
    for k, line in enumerate(lines):
        draw.text((2, tile.height + 2 + k * line_h), line, fill=BLACK, font=font)
    return out


def image_grid(images: ArrayLike, *, nrow: int | None = None, padding: int = 2,
               scale: int | None = None, captions: Sequence[str] | None = None) -> Image.Image:
    """Tile a batch of images into one picture, optionally with each caption underneath.

    Args:
        images: (B, C, H, W) in [0, 1], C = 1 (shown as gray) or C = 3 (RGB).
        nrow: tiles per row; default ceil(sqrt(B)).
        padding: white gap in pixels between tiles and around the border.
        scale: nearest-neighbour upscaling of each tile; default 3 with captions (so the
            text fits under a 60×60 MNIST tile), else 1.
        captions: B strings, each wrapped to its tile's width below it.

    Returns:
        RGB image of width nrow*(W*scale + padding) + padding and height
        rows*(H*scale + caption_height + padding) + padding, rows = ceil(B / nrow).
    """
    arr = to_numpy(images)
    _check_images(arr, "images")
    n = arr.shape[0]
    nrow = nrow if nrow is not None else max(1, math.ceil(math.sqrt(n)))
    scale = scale if scale is not None else (3 if captions is not None else 1)
    if n == 0 or nrow < 1 or scale < 1 or padding < 0:
        raise ValueError(f"need B >= 1, nrow >= 1, scale >= 1, padding >= 0; got B={n}, "
                         f"nrow={nrow}, scale={scale}, padding={padding}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images")
    tiles = [_to_pil(image, scale) for image in arr]
    if captions is not None:
        font = _font()
        wrapped = [_wrap(c, font, tiles[0].width - 4) for c in captions]
        # Every panel gets the height of the longest caption so the grid stays regular.
        height = max(len(lines) for lines in wrapped) * _line_height(font) + 4
        pairs = zip(tiles, wrapped, strict=True)
        tiles = [_add_caption(tile, lines, height, font) for tile, lines in pairs]
    return _tile(tiles, nrow, padding)


def draw_box(img: Image.Image, box: ArrayLike | Sequence[float], scale: int = 1,
             color: RGB = RED, width: int = 1) -> Image.Image:
    """Draw the outline of `box` on `img` (in place) and return `img`.

    Args:
        img: image `scale` times larger than the one the box refers to.
        box: (4,) = (x0, y0, x1, y1) in the unscaled image's pixel indices, covering pixels
            x0..x1, y0..y1 inclusive (may be fractional, may lie partly or fully outside).
        scale: the upscaling factor between the box's image and `img`.
        color: outline colour; width: outline thickness in pixels of `img`.
    """
    x0, y0, x1, y1 = to_numpy(box).reshape(4).tolist()
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return img
    # Outer edges of the covered pixels' scale×scale blocks in `img` coordinates.
    left, top = round(min(x0, x1) * scale), round(min(y0, y1) * scale)
    right = round((max(x0, x1) + 1) * scale) - 1
    bottom = round((max(y0, y1) + 1) * scale) - 1
    w, h = img.size
    if right < 0 or bottom < 0 or left > w - 1 or top > h - 1:
        return img  # wholly outside: nothing visible to draw
    # Clip to the image; a clipped side is drawn along the border it runs past.
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, w - 1), min(bottom, h - 1)
    ImageDraw.Draw(img).rectangle((left, top, right, bottom), outline=color, width=width)
    return img


def _check_steps(canvases: np.ndarray, windows: np.ndarray | None) -> None:
    _check_images(canvases, "canvases")
    steps = canvases.shape[0] - 1
    if windows is not None and windows.shape != (steps, 4):
        raise ValueError(f"write_windows must have shape (T, 4) = ({steps}, 4) for "
                         f"{steps + 1} canvases, got {tuple(windows.shape)}")


def canvas_frames(canvases: ArrayLike, write_windows: ArrayLike | None = None, *,
                  scale: int = 4, color: RGB = RED) -> list[Image.Image]:
    """One frame per canvas: the drawing process as a list of images (e.g. for a GIF).

    Args:
        canvases: (T+1, C, H, W) in [0, 1]; index 0 is the initial canvas, index t the
            canvas after step t.
        write_windows: (T, 4) write-attention box (x0, y0, x1, y1) of each step, or None.
        scale: nearest-neighbour upscaling so the box outline stays thin next to pixels.

    Returns:
        T+1 RGB images of size (W*scale, H*scale); frame t >= 1 shows step t's box.
    """
    arr = to_numpy(canvases)
    windows = None if write_windows is None else to_numpy(write_windows)
    _check_steps(arr, windows)
    frames = [_to_pil(canvas, scale) for canvas in arr]
    if windows is not None:
        width = max(1, scale // 2)
        for t, box in enumerate(windows, start=1):  # step t wrote the canvas of frame t
            draw_box(frames[t], box, scale, color, width)
    return frames


def steps_strip(canvases: ArrayLike, write_windows: ArrayLike | None = None, *,
                every: int = 1, scale: int = 2, padding: int = 2) -> Image.Image:
    """The canvas after steps every, 2*every, ..., T side by side, each labelled "t=...".

    Args:
        canvases: (T+1, C, H, W) in [0, 1] (index 0, the initial canvas, is not shown).
        write_windows: (T, 4) write boxes, or None.
        every: show every `every`-th step; the final step T is always shown.

    Returns:
        One-row RGB image, like the paper's figure of the drawing process.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    frames = canvas_frames(canvases, write_windows, scale=scale)
    steps = len(frames) - 1
    if steps < 1:
        raise ValueError("canvases must hold at least 2 entries (T >= 1)")
    shown = list(range(every, steps + 1, every))
    if shown[-1:] != [steps]:
        shown.append(steps)
    font = _font()
    label_h = _line_height(font) + 2
    tiles = []
    for t in shown:
        tile = Image.new("RGB", (frames[t].width, frames[t].height + label_h), WHITE)
        tile.paste(frames[t], (0, label_h))
        ImageDraw.Draw(tile).text((tile.width // 2, 1), f"t={t}", fill=BLACK, font=font,
                                  anchor="ma")
        tiles.append(tile)
    return _tile(tiles, len(tiles), padding)


def _atomic_write(path: str | os.PathLike, suffix: str,
                  write: Callable[[str], None]) -> Path:
    """Run `write(tmp_path)` on a temp file beside `path`, then rename it onto `path`.

    Readers (a web page polling a GIF, a dashboard) never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}"))
    # os.open rather than tempfile.mkstemp: mkstemp makes the file 0600, while this lets the
    # umask decide, as a plain open() would.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_gif(frames: Sequence[Image.Image], path: str | os.PathLike, *,
             duration_ms: int = 80, final_hold_ms: int = 1000) -> Path:
    """Write `frames` as an animated GIF that loops forever and holds its last frame.

    Pillow merges a frame identical to the one before it into that frame (adding up the
    durations), so a run of unchanged canvases gives fewer GIF frames than `len(frames)`.
    """
    if not frames:
        raise ValueError("frames is empty")
    durations = [duration_ms] * (len(frames) - 1) + [final_hold_ms]

    def write(tmp: str) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]),
                       duration=durations, loop=0)

    return _atomic_write(path, ".gif", write)


def save_image(img: Image.Image, path: str | os.PathLike) -> Path:
    """Save `img` as PNG atomically (temp file in the same directory, then os.replace)."""
    return _atomic_write(path, ".png", lambda tmp: img.save(tmp, format="PNG"))


def _heat_colours(values: np.ndarray) -> np.ndarray:
    """Weights (...) in [0, 1] -> RGB uint8 (..., 3) on the white → blue → black scale."""
    channels = [np.interp(values, _HEAT_STOPS, [c[k] for c in _HEAT_COLOURS])
                for k in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)  # (..., 3)


def _label_every(steps: int, cell: int, font: Font) -> int:
    """Smallest of 1, 2, 5, 10, 20, 50, ... steps between labels so that labels don't touch."""
    need = font.getlength(str(steps)) + 4  # widest label plus a small gap
    for every in (1, 2, 5, 10, 20, 50, 100, 200, 500):
        if every * cell >= need:
            return every
    return steps


def alignment_heatmap(alignments: ArrayLike, words: Sequence[str], *, cell: int = 14,
                      normalize: bool = True) -> Image.Image:
    """Words × steps picture of the alignment weights alpha, as in the paper's figures.

    Args:
        alignments: (T, L') weight of each word at each step; only the first L = len(words)
            columns are used (the rest is padding of a batched caption).
        words: the caption's L real words, one row each, labelled on the left.
        cell: side of one (word, step) cell in pixels.
        normalize: divide by the largest weight shown so the strongest cell is darkest;
            without it 1.0 is darkest.

    Returns:
        RGB image: white = 0, dark = high weight; columns are steps 1..T, labelled on top.
        The cells fill its bottom-right (L*cell, T*cell) block inside a 2 px border.
    """
    arr = to_numpy(alignments)
    n_words = len(words)
    if arr.ndim != 2 or n_words == 0 or arr.shape[1] < n_words:
        raise ValueError(f"alignments must be (T, L) with L >= len(words) = {n_words} >= 1, "
                         f"got {tuple(arr.shape)}")
    weights = np.nan_to_num(arr[:, :n_words].T, nan=0.0)  # (L, T)
    if normalize and weights.max() > 0:
        weights = weights / weights.max()
    colours = _heat_colours(np.clip(weights, 0.0, 1.0))  # (L, T, 3)
    heat = Image.fromarray(colours.repeat(cell, axis=0).repeat(cell, axis=1), mode="RGB")

    font = _font()
    steps = weights.shape[1]
    left = int(max(font.getlength(w) for w in words)) + 6
    top = _line_height(font) + 4
    out = Image.new("RGB", (left + heat.width + 2, top + heat.height + 2), WHITE)
    out.paste(heat, (left, top))
    draw = ImageDraw.Draw(out)
    for j, word in enumerate(words):  # right-aligned word labels, centred on their row
        draw.text((left - 4, top + j * cell + cell // 2), word, fill=BLACK, font=font,
                  anchor="rm")
    every = _label_every(steps, cell, font)
    for t in range(1, steps + 1):
        if t % every == 0 or every == 1:
            draw.text((left + (t - 1) * cell + cell // 2, top - 2), str(t), fill=BLACK,
                      font=font, anchor="md")
    draw.rectangle((left - 1, top - 1, left + heat.width, top + heat.height), outline=BLACK)
    return out


def comparison_grid(rows: Sequence[tuple[str, ArrayLike]], captions: Sequence[str], *,
                    scale: int = 2, padding: int = 2) -> Image.Image:
    """One row of samples per model under one header of captions (the report's figure).

    Args:
        rows: (name, images) per model; images (K, C, H, W) in [0, 1], one per caption.
        captions: the K captions, wrapped above their column.
        scale: nearest-neighbour upscaling of each tile.

    Returns:
        RGB image: a name column on the left, a caption row on top, then the models' rows.
    """
    if not rows or not captions:
        raise ValueError("comparison_grid needs at least one model row and one caption")
    strips = []
    for name, images in rows:
        arr = to_numpy(images)
        _check_images(arr, f"images of {name!r}")
        if arr.shape[0] != len(captions):
            raise ValueError(f"{name!r} has {arr.shape[0]} images for {len(captions)} captions")
        strips.append(_tile([_to_pil(a, scale) for a in arr], len(captions), padding))
    font, line_h = _font(), _line_height(_font())
    tile_w = (strips[0].width - padding) // len(captions)
    wrapped = [_wrap(c, font, tile_w - 4) for c in captions]
    head_h = max(map(len, wrapped)) * line_h + 4
    label_w = max(int(ImageDraw.Draw(strips[0]).textlength(name, font=font)) for name, _ in rows) + 8
    out = Image.new("RGB", (label_w + strips[0].width, head_h + sum(s.height for s in strips)), WHITE)
    draw = ImageDraw.Draw(out)
    for k, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            draw.text((label_w + padding + k * tile_w + 2, 2 + j * line_h), line, fill=BLACK, font=font)
    y = head_h
    for (name, _), strip in zip(rows, strips, strict=True):
        out.paste(strip, (label_w, y))
        draw.text((4, y + strip.height // 2 - line_h // 2), name, fill=BLACK, font=font)
        y += strip.height
    return out
