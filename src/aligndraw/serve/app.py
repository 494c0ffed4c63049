"""FastAPI app of the web demo: a thin HTTP layer over :class:`AlignDrawPipeline`.

Mansimov et al., "Generating Images from Captions with Attention", ICLR 2016
(https://arxiv.org/abs/1511.02793). The page (``static/``) sends a caption; the server validates
it, asks the pipeline for all images at once (one call, tens of ms) and streams the drawing back
step by step as Server-Sent Events, so the page can animate the canvas, the write-attention box
and the words' alignment weights. No model logic lives here.

Routes:
    GET  /                  the page (static/index.html; static/ is mounted at /static)
    GET  /health            {"status": "ok", "model", "busy", "max_concurrent"}
    GET  /api/info          vocabulary, example captions (held-out ones flagged), limits, T/C/H/W
    POST /api/draw          {"caption", "num_images", "seed", "temperature"} → text/event-stream:
                              event: start  {caption, words, steps, num_images, seed, held_out, ...}
                              event: frame  T+1 times: {step, images (B base64 PNGs),
                                            boxes (B × [x0, y0, x1, y1]) | null at step 0,
                                            alignments (B × L weights, sum 1) | null at step 0}
                              event: done   {steps, downloads: B × {png, gif}, elapsed_ms}
    GET  /api/image.png     the final image, upscaled   (query: caption, num_images, seed,
    GET  /api/drawing.gif   the drawing as a GIF          index, scale); recomputed from the seed

Errors are JSON ``{"detail": message, ...}``: 422 for bad input (``"word"``/``"words"`` name
unknown words, ``"field"`` a bad parameter), 429 when ``max_concurrent`` drawings are already
being computed (not queued: the page says "busy, try again").
Symbols: B images per request, T steps, L words, C/H/W image channels/height/width.
"""

from __future__ import annotations

import base64
import io
import json
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from aligndraw import __version__, visualize
from aligndraw.model import MAX_TEMPERATURE
from aligndraw.pipeline import AlignDrawPipeline, AlignDrawPipelineOutput, to_pil
from aligndraw.serve import DEFAULT_MAX_CONCURRENT

STATIC_DIR = Path(__file__).with_name("static")
MAX_IMAGES = 8  # per request: a row of thumbnails, and 8 × T steps of PNGs stay < 1 MB of events
MAX_CAPTION_CHARS = 300  # checked before tokenising; the model's max_caption_len (words) also applies
MAX_SEED = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes as a signed int
MAX_SCALE = 8  # download upscaling: a 60×60 scene becomes at most 480×480
# Captions that exercise every caption kind; held-out ones are added per model (see examples()).
SEEN_EXAMPLES = (
    "the digit 3 is on the left of the digit 5 .",
    "the digit 0 is at the top of the digit 4 .",
    "the digit 6 is at the top left of the image .",
    "the digit 9 is at the bottom of the digit 7 .",
)
R = TypeVar("R")


# ---------------------------------------------------------------------------- request schema
class DrawRequest(BaseModel):
    """One caption, drawn ``num_images`` times from ``seed`` (same seed → same images)."""

    model_config = ConfigDict(extra="forbid")
    caption: str = Field(max_length=MAX_CAPTION_CHARS, examples=[SEEN_EXAMPLES[0]])
    num_images: int = Field(default=4, ge=1, le=MAX_IMAGES)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)


class DownloadQuery(DrawRequest):
    """A :class:`DrawRequest` plus which of its images to return and how much to upscale it."""

    model_config = ConfigDict(extra="ignore")  # query strings pick up cache-busters and the like

    index: int = Field(default=0, ge=0, lt=MAX_IMAGES)
    scale: int = Field(default=4, ge=1, le=MAX_SCALE)


FIELD_RULES = {  # what a bad value of each field should have been, in the page's words
    "caption": f"caption must be text of at most {MAX_CAPTION_CHARS} characters",
    "num_images": f"number of images must be a whole number from 1 to {MAX_IMAGES}",
    "seed": f"seed must be a whole number from 0 to {MAX_SEED}",
    "temperature": f"temperature must be a number from 0 to {MAX_TEMPERATURE:g} (1 samples the "
                   "learned prior as trained, 0 draws its mean)",
    "index": f"index must be a whole number from 0 to {MAX_IMAGES - 1}",
    "scale": f"scale must be a whole number from 1 to {MAX_SCALE}",
}


class ApiError(Exception):
    """An error answered as JSON ``{"detail": message, **extra}`` with ``status``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra


class Slots:
    """At most ``limit`` drawings computed at once; a request beyond that is refused, not queued."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {limit}")
        self.limit, self.busy = limit, 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.busy >= self.limit:
                return False
            self.busy += 1
            return True

    def release(self) -> None:
        with self._lock:
            assert self.busy > 0, "release() without try_acquire()"
            self.busy -= 1


# ---------------------------------------------------------------------------- input checks
def unknown_words(pipe: AlignDrawPipeline, caption: str) -> list[str]:
    """The caption's tokens outside the vocabulary, in order, without repeats."""
    return pipe.vocab.unknown_words(caption)


def check_caption(pipe: AlignDrawPipeline, caption: str, num_images: int) -> None:
    """``pipe.check_inputs`` (before any compute), its ``ValueError`` turned into a 422."""
    try:
        pipe.check_inputs(caption, num_images, "np")
    except (ValueError, TypeError) as err:
        words = unknown_words(pipe, caption)
        raise ApiError(422, str(err), word=words[0] if words else None, words=words) from err


def place_caption(place: str, digit: int, other: int) -> str:
    """A caption that puts ``digit`` at ``place`` (``other`` is the second digit, if needed)."""
    if place in ("left", "top"):
        relation = "on the left of" if place == "left" else "at the top of"
        return f"the digit {digit} is {relation} the digit {other} ."
    if place in ("right", "bottom"):
        return f"the digit {digit} is {'on' if place == 'right' else 'at'} the {place} of the digit {other} ."
    return f"the digit {digit} is at the {place.replace('-', ' ')} of the image ."


def examples(pipe: AlignDrawPipeline) -> list[dict[str, Any]]:
    """Seen example captions, then one per held-out (place, digit) pair; only valid ones."""
    captions = list(SEEN_EXAMPLES)
    for place, digit in pipe.held_out:
        captions.append(place_caption(place, int(digit), (int(digit) + 3) % 10))
    out = []
    for caption in dict.fromkeys(captions):
        try:
            pipe.check_inputs(caption, 1, "np")
        except ValueError:
            continue  # another vocabulary (e.g. COCO): the MNIST examples do not apply
        out.append({"caption": caption, "held_out": bool(pipe.is_held_out(caption))})
    return out


# ---------------------------------------------------------------------------- drawing
def draw(pipe: AlignDrawPipeline, req: DrawRequest) -> AlignDrawPipelineOutput:
    """All ``req.num_images`` images at once, as numpy arrays (runs in a worker thread)."""
    generator = torch.Generator().manual_seed(req.seed)
    return pipe(req.caption, num_images_per_caption=req.num_images, generator=generator,
                output_type="np", temperature=req.temperature)


def png_base64(canvas: np.ndarray) -> str:
    """(C, H, W) in [0, 1] → base64 of a PNG (grayscale for C = 1), as the page draws it."""
    buf = io.BytesIO()
    to_pil(canvas).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def finite_rows(values: np.ndarray, decimals: int) -> list[list[float | None]]:
    """(B, K) floats → nested lists, rounded; NaN/inf → None (JSON has no NaN)."""
    return [[round(float(v), decimals) if math.isfinite(v) else None for v in row] for row in values]


def sse(event: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event (the data is one line of JSON)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def stream_events(out: AlignDrawPipelineOutput, start: dict[str, Any],
                  done: dict[str, Any]) -> Iterator[str]:
    """start, then one frame per canvas 0..T (PNGs encoded lazily, frame by frame), then done."""
    yield sse("start", start)
    steps = out.canvases.shape[1] - 1  # canvases: (B, T+1, C, H, W)
    n_words = len(out.words[0])
    for t in range(steps + 1):
        frame: dict[str, Any] = {"step": t, "images": [png_base64(c) for c in out.canvases[:, t]]}
        # Step t (1..T) wrote canvas t with box t-1 while attending with alignments t-1.
        frame["boxes"] = finite_rows(out.write_windows[:, t - 1], 2) if t else None  # (B, 4)
        frame["alignments"] = finite_rows(out.alignments[:, t - 1, :n_words], 5) if t else None  # (B, L)
        yield sse("frame", frame)
    yield sse("done", done)


def download_urls(req: DrawRequest, scale: int = 6) -> list[dict[str, str]]:
    """Links that recompute image ``index`` of this request (same seed → same image)."""
    urls = []
    for index in range(req.num_images):
        query = urlencode({**req.model_dump(), "index": index, "scale": scale})
        urls.append({"png": f"/api/image.png?{query}", "gif": f"/api/drawing.gif?{query}"})
    return urls


def gif_bytes(out: AlignDrawPipelineOutput, index: int, scale: int) -> bytes:
    """Image ``index`` being drawn, with its write boxes, via visualize.save_gif (to a temp file)."""
    frames = visualize.canvas_frames(out.canvases[index], out.write_windows[index], scale=scale)
    with tempfile.TemporaryDirectory(prefix="aligndraw-serve-") as tmp:
        return visualize.save_gif(frames, Path(tmp) / "drawing.gif").read_bytes()


def png_bytes(out: AlignDrawPipelineOutput, index: int, scale: int) -> bytes:
    """The final canvas of image ``index``, upscaled ``scale`` times (nearest neighbour)."""
    image = visualize.image_grid(out.canvases[index, -1][None], nrow=1, padding=0, scale=scale)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- the app
def create_app(pipeline_or_path: AlignDrawPipeline | str = "mnist-captions", *,
               max_concurrent: int = DEFAULT_MAX_CONCURRENT, device: str = "cpu",
               model_name: str | None = None) -> FastAPI:
    """The demo app around a pipeline (or the model directory / bundled name to load one from).

    Args:
        pipeline_or_path: an :class:`AlignDrawPipeline`, a model directory or a bundled name.
        max_concurrent: drawings computed at once; further requests get 429.
        device: where a loaded model runs (ignored for a given pipeline).
        model_name: the name shown on the page (default: the path, or "custom").
    """
    if isinstance(pipeline_or_path, AlignDrawPipeline):
        pipe, name = pipeline_or_path, model_name or "custom"
    else:
        pipe = AlignDrawPipeline.from_pretrained(pipeline_or_path, device=device)
        name = model_name or str(pipeline_or_path)
    # One drawing now, so that what a first drawing builds or loads once (the step kernels,
    # the OpenBLAS products) is not waited for by the first request.
    pipe(pipe.vocab.content_words[0], output_type="pt", generator=torch.Generator().manual_seed(0))
    slots = Slots(max_concurrent)
    app = FastAPI(title="alignDRAW demo", version=__version__,
                  description="Type a caption, watch alignDRAW draw it.")
    app.state.pipeline, app.state.slots, app.state.model_name = pipe, slots, name
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_error_handlers(app)
    info = _info(pipe, name)  # computed once: it never changes while the server runs

    async def compute(fn: Callable[..., R], *args: Any) -> R:
        # The slot covers the pipeline only; streaming the prepared frames costs next to nothing.
        if not slots.try_acquire():
            raise ApiError(429, f"the server is busy drawing {slots.limit} other request(s); "
                                "try again in a moment", headers={"Retry-After": "1"})
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            slots.release()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "busy": slots.busy, "max_concurrent": slots.limit}

    @app.get("/api/info")
    async def api_info() -> dict[str, Any]:
        return info

    @app.post("/api/draw", response_class=StreamingResponse)
    async def api_draw(req: DrawRequest) -> StreamingResponse:
        check_caption(pipe, req.caption, req.num_images)
        began = time.perf_counter()
        out = await compute(draw, pipe, req)
        start = {**req.model_dump(), "words": out.words[0], "steps": out.canvases.shape[1] - 1,
                 "held_out": pipe.is_held_out(req.caption),
                 "channels": out.canvases.shape[2], "height": out.canvases.shape[3],
                 "width": out.canvases.shape[4]}
        done = {"steps": start["steps"], "downloads": download_urls(req),
                "elapsed_ms": round(1000 * (time.perf_counter() - began), 1)}
        # A sync iterator: Starlette runs it in a worker thread, so PNG encoding never blocks.
        return StreamingResponse(stream_events(out, start, done), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/image.png", response_class=Response)
    async def api_image(q: Annotated[DownloadQuery, Query()]) -> Response:
        return await _download(q, png_bytes, "png", "image/png")

    @app.get("/api/drawing.gif", response_class=Response)
    async def api_gif(q: Annotated[DownloadQuery, Query()]) -> Response:
        return await _download(q, gif_bytes, "gif", "image/gif")

    async def _download(q: DownloadQuery, encode: Callable[..., bytes], ext: str, media: str) -> Response:
        if q.index >= q.num_images:
            raise ApiError(422, f"index must be below num_images ({q.num_images}), got {q.index}",
                           field="index")
        check_caption(pipe, q.caption, q.num_images)
        req = DrawRequest(caption=q.caption, num_images=q.num_images, seed=q.seed)
        data = await compute(lambda: encode(draw(pipe, req), q.index, q.scale))
        filename = f"aligndraw-seed{q.seed}-{q.index}.{ext}"
        return Response(data, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    return app


def _info(pipe: AlignDrawPipeline, name: str) -> dict[str, Any]:
    cfg = pipe.model.config
    return {
        "model": name, "version": __version__, "steps": cfg.steps, "channels": cfg.channels,
        "height": cfg.height, "width": cfg.width,
        "words": list(pipe.vocab.content_words), "aliases": dict(pipe.vocab.aliases),
        "examples": examples(pipe), "held_out": [[p, int(d)] for p, d in pipe.held_out],
        "limits": {"max_caption_chars": MAX_CAPTION_CHARS, "max_words": cfg.max_caption_len,
                   "max_images": MAX_IMAGES, "max_seed": MAX_SEED,
                   "max_temperature": MAX_TEMPERATURE},
    }


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable sentence for the page instead of pydantic's list of error dicts.
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [p for p in first.get("loc", ()) if isinstance(p, str) and p not in ("body", "query")]
        field = loc[0] if loc else None
        detail = FIELD_RULES.get(field or "", first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            detail = 'the request body must be JSON: {"caption": ..., "num_images": ..., "seed": ...}'
        if field and field not in FIELD_RULES:
            detail = f"{field}: {detail}"
        got = first.get("input")
        if field in FIELD_RULES and isinstance(got, (int, float, str)) and len(str(got)) <= 40:
            detail += f" (got {got!r})"
        return JSONResponse({"detail": detail, "field": field, "word": None, "words": []},
                            status_code=422)
