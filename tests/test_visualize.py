"""Tests for aligndraw.visualize: layout arithmetic, exact pixels, boxes, GIF/PNG files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aligndraw import visualize as V

RED = np.array([255, 0, 0], dtype=np.uint8)


def _red_mask(img: Image.Image) -> np.ndarray:
    """(H, W) bool: pixels that are exactly the box colour."""
    return np.all(np.asarray(img) == RED, axis=-1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) inclusive of the True pixels, or None when there are none."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _steps(T: int = 3, H: int = 12, W: int = 12, seed: int = 0) -> np.ndarray:
    """(T+1, 1, H, W) distinct gray canvases (never pure red)."""
    return np.random.default_rng(seed).random((T + 1, 1, H, W)).astype(np.float32)


# --------------------------------------------------------------------------- image_grid


@pytest.mark.parametrize(
    ("B", "nrow", "padding", "scale", "size"),
    [
        (6, 3, 2, 1, (3 * (10 + 2) + 2, 2 * (8 + 2) + 2)),
        (7, 3, 2, 2, (3 * (20 + 2) + 2, 3 * (16 + 2) + 2)),  # 7 images -> 3 rows
        (4, None, 0, 3, (2 * 30, 2 * 24)),  # default nrow = ceil(sqrt(4)) = 2
        (5, 5, 1, 1, (5 * 11 + 1, 9 + 1)),
    ],
)
def test_grid_size_arithmetic(B, nrow, padding, scale, size):
    images = np.zeros((B, 1, 8, 10))  # H=8, W=10
    assert V.image_grid(images, nrow=nrow, padding=padding, scale=scale).size == size


def test_grid_pixel_equals_input_pixel():
    images = np.zeros((6, 1, 8, 10), dtype=np.float32)
    images[4, 0, 5, 7] = 0.6  # tile 4 sits in row 1, column 1 with nrow=3
    grid = np.asarray(V.image_grid(images, nrow=3, padding=2, scale=2))
    x0, y0 = 2 + 1 * (10 * 2 + 2), 2 + 1 * (8 * 2 + 2)  # tile origin
    block = grid[y0 + 5 * 2 : y0 + 5 * 2 + 2, x0 + 7 * 2 : x0 + 7 * 2 + 2]  # (2, 2, 3)
    assert np.all(block == round(0.6 * 255))
    assert np.all(grid[y0 + 4 * 2, x0 + 7 * 2] == 0)  # the pixel above is still black
    assert np.all(grid[0, :] == 255)  # padding is white


def test_grid_grayscale_and_rgb():
    gray = np.full((1, 1, 4, 4), 0.2)
    assert V.image_grid(gray, padding=0).mode == "RGB"
    assert tuple(np.asarray(V.image_grid(gray, padding=0))[1, 1]) == (51, 51, 51)
    rgb = np.zeros((1, 3, 4, 4))
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = 1.0, 0.5, 0.0
    assert tuple(np.asarray(V.image_grid(rgb, padding=0))[1, 1]) == (255, 128, 0)


def test_grid_clips_out_of_range_and_nan():
    images = np.array([[[[-1.0, 2.0, np.nan]]]])  # (1, 1, 1, 3)
    assert np.asarray(V.image_grid(images, padding=0))[0, :, 0].tolist() == [0, 255, 0]


def test_captions_make_grid_taller_with_text_below_tiles():
    images = np.zeros((4, 1, 20, 20))
    plain = V.image_grid(images, nrow=2, scale=3)
    short = V.image_grid(images, nrow=2, scale=3, captions=["a 1", "b", "c", "d"])
    long = V.image_grid(images, nrow=2, scale=3,
                        captions=["the digit 3 is at the top of the digit 1 ."] * 4)
    assert short.width == plain.width
    assert short.height > plain.height
    assert long.height > short.height  # the long caption wraps onto more lines
    panel = np.asarray(short)[2 + 60 :, 2 : 2 + 60]  # below the first tile (scale 3 -> 60 px)
    assert (panel[: panel.shape[0] // 2] < 128).any()  # dark text on the white panel


def test_grid_default_scale_is_three_with_captions():
    images = np.zeros((1, 1, 10, 10))
    assert V.image_grid(images, padding=0, captions=["x"]).width == 30
    assert V.image_grid(images, padding=0).width == 10


@pytest.mark.parametrize(
    ("images", "kwargs"),
    [
        (np.zeros((2, 2, 4, 4)), {}),  # C=2
        (np.zeros((1, 4, 4)), {}),  # missing batch axis
        (np.zeros((2, 1, 4, 4)), {"captions": ["only one"]}),
        (np.zeros((2, 1, 4, 4)), {"nrow": 0}),
    ],
)
def test_grid_rejects_bad_inputs(images, kwargs):
    with pytest.raises(ValueError):
        V.image_grid(images, **kwargs)


# --------------------------------------------------------------------------- boxes, frames


def test_canvas_frames_count_and_box_position():
    canvases = _steps(T=3)
    windows = np.array([[2, 3, 5, 6], [0, 0, 11, 11], [4, 4, 4, 4]], dtype=np.float32)
    frames = V.canvas_frames(canvases, windows, scale=4)
    assert len(frames) == 4
    assert all(f.size == (48, 48) for f in frames)
    assert _bbox(_red_mask(frames[0])) is None  # the initial canvas has no box
    # Pixels 2..5 x 3..6 inclusive -> their 4x4 blocks span x 8..23, y 12..27.
    mask = _red_mask(frames[1])
    assert _bbox(mask) == (8, 12, 23, 27)
    assert mask[20, 8] and mask[12, 15]  # left and top edges
    assert not mask[20, 15]  # the inside of the box shows the canvas
    assert _bbox(_red_mask(frames[2])) == (0, 0, 47, 47)
    assert _bbox(_red_mask(frames[3])) == (16, 16, 19, 19)


def test_canvas_frames_without_windows_has_no_red():
    frames = V.canvas_frames(_steps(T=2), None, scale=2)
    assert len(frames) == 3
    assert not any(_red_mask(f).any() for f in frames)


def test_boxes_outside_image_are_clipped():
    windows = np.array([[-5, -5, 3, 3], [8, 8, 40, 40], [100, 100, 120, 120]], dtype=float)
    frames = V.canvas_frames(_steps(T=3), windows, scale=4)
    assert _bbox(_red_mask(frames[1])) == (0, 0, 15, 15)
    assert _bbox(_red_mask(frames[2])) == (32, 32, 47, 47)
    assert _bbox(_red_mask(frames[3])) is None  # wholly outside: nothing drawn


def test_draw_box_ignores_non_finite_box():
    img = Image.new("RGB", (10, 10))
    V.draw_box(img, (np.nan, 0, 3, 3))
    assert not _red_mask(img).any()


def test_canvas_frames_rejects_mismatched_windows():
    with pytest.raises(ValueError, match="write_windows"):
        V.canvas_frames(_steps(T=3), np.zeros((2, 4)))


def test_steps_strip_shows_every_kth_step_and_the_last():
    T, H, W, scale, padding = 5, 12, 12, 2, 2
    strip = V.steps_strip(_steps(T=T), np.zeros((T, 4)), every=2, scale=scale)
    # Steps 2, 4 and 5 are shown.
    assert strip.width == 3 * (W * scale + padding) + padding
    assert strip.height > H * scale + 2 * padding  # room for the "t=..." labels
    assert _red_mask(strip).any()
    one = V.steps_strip(_steps(T=T), None, every=1, scale=scale)
    assert one.width == T * (W * scale + padding) + padding


# --------------------------------------------------------------------------- files


def test_save_gif_round_trip(tmp_path):
    T = 4
    frames = V.canvas_frames(_steps(T=T), np.tile([[1, 1, 6, 6]], (T, 1)), scale=2)
    path = V.save_gif(frames, tmp_path / "draw.gif", duration_ms=70, final_hold_ms=900)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draw.gif"]  # no temp file left
    with Image.open(path) as gif:
        assert gif.n_frames == T + 1
        assert gif.info["loop"] == 0
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
    assert durations == [70] * T + [900]


def test_save_image_round_trip_and_replace(tmp_path):
    img = V.image_grid(np.random.default_rng(0).random((2, 3, 5, 5)), padding=1)
    path = tmp_path / "sub" / "grid.png"
    V.save_image(Image.new("RGB", (3, 3)), path)
    V.save_image(img, path)  # replaces the existing file
    with Image.open(path) as back:
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_failed_save_leaves_no_temp_file(tmp_path):
    with pytest.raises(ValueError):
        V.save_gif([], tmp_path / "x.gif")

    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        V.save_image(Broken(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- alignments


def _heat_cells(img: Image.Image, T: int, L: int, cell: int) -> np.ndarray:
    """(L, T) luminance at each cell centre; cells fill the bottom-right block inside 2 px."""
    arr = np.asarray(img).astype(float).mean(axis=-1)
    x0, y0 = img.width - 2 - T * cell, img.height - 2 - L * cell
    ys = y0 + np.arange(L) * cell + cell // 2
    xs = x0 + np.arange(T) * cell + cell // 2
    return arr[np.ix_(ys, xs)]


def test_heatmap_size_depends_on_steps_and_words():
    cell = 10
    words3 = ["aa", "bb", "cc"]
    words4 = words3 + ["aa"]  # same widest label, so the left margin stays the same
    a = V.alignment_heatmap(np.ones((5, 3)), words3, cell=cell)
    b = V.alignment_heatmap(np.ones((9, 3)), words3, cell=cell)
    c = V.alignment_heatmap(np.ones((5, 4)), words4, cell=cell)
    assert b.width - a.width == 4 * cell and b.height == a.height
    assert c.height - a.height == cell and c.width == a.width


def test_heatmap_darkest_cell_is_the_attended_word():
    words = ["the", "digit", "3", "is", "at", "the", "top"]
    T, L, cell = 9, len(words), 14
    target = np.array([0, 1, 2, 6, 5, 4, 3, 2, 1])
    alignments = np.full((T, L + 2), 0.02)  # two padding columns beyond the real words
    alignments[np.arange(T), target] = 0.9
    alignments[:, L:] = 5.0  # padding must be ignored, also by the normalisation
    img = V.alignment_heatmap(alignments, words, cell=cell)
    lum = _heat_cells(img, T, L, cell)  # (L, T)
    assert lum.argmin(axis=0).tolist() == target.tolist()
    assert lum.min() < 40 and lum.max() > 200  # dark for high weight, near-white for low
    trimmed = V.alignment_heatmap(alignments[:, :L], words, cell=cell)
    assert np.array_equal(np.asarray(img), np.asarray(trimmed))


def test_heatmap_rejects_more_words_than_columns():
    with pytest.raises(ValueError, match="len\\(words\\)"):
        V.alignment_heatmap(np.ones((4, 2)), ["a", "b", "c"])


# --------------------------------------------------------------------------- torch == numpy


def test_torch_and_numpy_inputs_give_identical_images():
    canvases = _steps(T=3)
    windows = np.array([[1, 2, 6, 7], [0, 0, 3, 3], [-2, 5, 20, 9]], dtype=np.float32)
    alignments = np.random.default_rng(1).random((3, 4)).astype(np.float32)
    t_canvases = torch.tensor(canvases, dtype=torch.float64, requires_grad=True)
    t_windows, t_alignments = torch.from_numpy(windows), torch.from_numpy(alignments)
    pairs = [
        (V.image_grid(canvases, nrow=2, captions=list("abcd")),
         V.image_grid(t_canvases, nrow=2, captions=list("abcd"))),
        (V.steps_strip(canvases, windows), V.steps_strip(t_canvases, t_windows)),
        (V.alignment_heatmap(alignments, list("wxyz")),
         V.alignment_heatmap(t_alignments, list("wxyz"))),
    ]
    pairs += list(zip(V.canvas_frames(canvases, windows), V.canvas_frames(t_canvases, t_windows),
                      strict=True))
    for from_numpy, from_torch in pairs:
        assert np.array_equal(np.asarray(from_numpy), np.asarray(from_torch))
