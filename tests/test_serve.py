"""The web demo's API (aligndraw.serve) with FastAPI's test client and a tiny saved model."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient runs on httpx

from fastapi.testclient import TestClient  # noqa: E402

from aligndraw import AlignDrawPipeline  # noqa: E402
from aligndraw.data.mnist_captions import parse_caption  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from aligndraw.serve.app import MAX_CAPTION_CHARS, MAX_IMAGES, Slots, create_app  # noqa: E402
from aligndraw.serve.cli import add_serve_parser, cmd_serve  # noqa: E402
from aligndraw.text import mnist_vocabulary  # noqa: E402

from conftest import tiny_run_config  # noqa: E402

CAPTION = "the digit 3 is on the left of the digit 5 ."
STEPS = 3


def tiny_pipeline(steps: int = STEPS) -> AlignDrawPipeline:
    """A random tiny 60×60 model that visibly draws: a black canvas gets bright blobs.

    Untrained weights write faint patches through huge windows, so the write head is set to a
    ~25-pixel box that moves with h_dec, and the patch to a large positive value.
    """
    config = tiny_run_config()
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, steps=steps))
    torch.manual_seed(0)
    model = AlignDraw(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        model.canvas0.fill_(-4.0)  # σ(-4) ≈ 0.02: black
        model.write_head.weight.normal_(0.0, 0.5)
        model.write_head.bias.copy_(torch.tensor([0.0, 0.0, 2.0, -1.5, 0.0]))  # g̃, log σ², log δ̃, log γ
        model.write_patch.bias.fill_(60.0)
    return AlignDrawPipeline(model, mnist_vocabulary(), config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def app(model_dir):
    return create_app(str(model_dir), max_concurrent=2)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """``event: NAME`` / ``data: JSON`` blocks separated by blank lines → [(name, data)]."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def draw(client, **body):
    return client.post("/api/draw", json={"caption": CAPTION, "num_images": 2, "seed": 0, **body})


def test_health_and_page(client, model_dir):
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": str(model_dir), "busy": 0, "max_concurrent": 2}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="caption"' in page.text and 'id="draw"' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_info_offers_vocabulary_and_held_out_examples(client, app):
    info = client.get("/api/info").json()
    pipe = app.state.pipeline
    assert info["words"] == list(pipe.vocab.content_words) and info["aliases"]["seven"] == "7"
    assert info["steps"] == STEPS and (info["height"], info["width"]) == (60, 60)
    assert info["limits"]["max_images"] == MAX_IMAGES and info["limits"]["max_words"] == 32
    held = [e["caption"] for e in info["examples"] if e["held_out"]]
    assert len(held) == len(pipe.held_out) and any(not e["held_out"] for e in info["examples"])
    # Each held-out example puts the held-out digit at the held-out place.
    for (place, digit), caption in zip(pipe.held_out, held, strict=True):
        layout = parse_caption(caption).layout
        assert layout[["top-left", "top-right", "bottom-left", "bottom-right", "left", "right",
                       "top", "bottom"].index(place)] == digit


def test_draw_streams_every_step(client, app):
    resp = draw(client, num_images=3, seed=7)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    names = [name for name, _ in events]
    assert names == ["start"] + ["frame"] * (STEPS + 1) + ["done"]
    start, frames, done = events[0][1], [d for _, d in events[1:-1]], events[-1][1]
    assert start["words"] == CAPTION.split() and start["steps"] == STEPS
    assert start["num_images"] == 3 and start["held_out"] is False
    assert [f["step"] for f in frames] == list(range(STEPS + 1))
    assert frames[0]["boxes"] is None and frames[0]["alignments"] is None
    for frame in frames[1:]:
        alignments = np.array(frame["alignments"])  # (B, L)
        assert alignments.shape == (3, len(start["words"]))
        np.testing.assert_allclose(alignments.sum(-1), 1.0, atol=1e-3)
        assert np.array(frame["boxes"]).shape == (3, 4)
    images = [decode_png(b64) for b64 in frames[-1]["images"]]
    assert len(images) == 3 and images[0].shape == (60, 60)
    assert images[0].std() > 1, "the final image is blank"
    # A thin client: the stream is exactly what the pipeline draws from the same seed.
    out = app.state.pipeline(CAPTION, num_images_per_caption=3, output_type="np",
                             generator=torch.Generator().manual_seed(7))
    expected = np.round(np.clip(out.images[:, 0], 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.stack(images), expected)
    np.testing.assert_allclose(frames[2]["alignments"], out.alignments[:, 1], atol=1e-4)
    assert len(done["downloads"]) == 3 and done["steps"] == STEPS


def test_same_seed_same_frames_other_seed_differs(client):
    final = [parse_sse(draw(client, seed=s).text)[-2][1]["images"] for s in (1, 1, 2)]
    assert final[0] == final[1] and final[0] != final[2]


def test_temperature_reaches_the_pipeline(client):
    cold = [parse_sse(draw(client, seed=s, temperature=0).text) for s in (1, 2)]
    assert cold[0][0][1]["temperature"] == 0
    assert cold[0][-2][1]["images"] == cold[1][-2][1]["images"]  # the prior mean: seed-free
    warm = parse_sse(draw(client, seed=1, temperature=0.5).text)
    assert warm[-2][1]["images"] != cold[0][-2][1]["images"]
    urls = parse_sse(draw(client, seed=1, temperature=0.5).text)[-1][1]["downloads"]
    assert "temperature=0.5" in urls[0]["png"]


def test_held_out_caption_is_flagged(client):
    start = parse_sse(draw(client, caption="the digit eight is at the top left of the image .").text)[0][1]
    assert start["held_out"] is True and start["words"][2] == "eight"


def test_unknown_word_is_422_naming_it(client):
    resp = draw(client, caption="the digit 3 is on the lefty of the dgit 5 .")
    assert resp.status_code == 422
    body = resp.json()
    assert body["word"] == "lefty" and body["words"] == ["lefty", "dgit"]
    assert "'lefty'" in body["detail"]


@pytest.mark.parametrize("body, field, needle", [
    ({"caption": ""}, None, "at least one word"),
    ({"caption": " ".join(["the"] * 33)}, None, "limit of 32"),
    ({"caption": "x" * (MAX_CAPTION_CHARS + 1)}, "caption", "at most 300 characters"),
    ({"num_images": 0}, "num_images", "from 1 to 8"),
    ({"num_images": MAX_IMAGES + 1}, "num_images", "from 1 to 8"),
    ({"seed": -1}, "seed", "from 0 to"),
    ({"seed": "abc"}, "seed", "whole number"),
    ({"temperature": -0.5}, "temperature", "from 0 to 10"),
    ({"temperature": "hot"}, "temperature", "from 0 to 10"),
    ({"steps": 5}, "steps", "Extra inputs"),
])
def test_bad_input_is_422_with_a_message(client, body, field, needle):
    resp = draw(client, **body)
    assert resp.status_code == 422
    assert resp.json()["field" if field else "word"] == field
    assert needle in resp.json()["detail"]


def test_malformed_json_is_422(client):
    resp = client.post("/api/draw", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "must be JSON" in resp.json()["detail"]


def test_busy_server_answers_429(client, app):
    slots = app.state.slots
    assert all(slots.try_acquire() for _ in range(slots.limit))
    try:
        resp = draw(client)
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        assert "busy" in resp.json()["detail"]
        assert client.get("/health").json()["busy"] == slots.limit
    finally:
        for _ in range(slots.limit):
            slots.release()
    assert draw(client).status_code == 200


def test_downloads_recompute_the_streamed_image(client):
    events = parse_sse(draw(client, seed=3).text)
    links, final = events[-1][1]["downloads"][1], decode_png(events[-2][1]["images"][1])
    png = client.get(links["png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert "attachment" in png.headers["content-disposition"]
    big = np.asarray(Image.open(io.BytesIO(png.content)).convert("L"))
    assert big.shape == (360, 360)  # scale 6
    np.testing.assert_array_equal(big[::6, ::6], final)
    gif = client.get(links["gif"])
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert Image.open(io.BytesIO(gif.content)).n_frames >= 2
    bad = client.get("/api/image.png", params={"caption": CAPTION, "num_images": 2, "index": 2})
    assert bad.status_code == 422 and bad.json()["field"] == "index"
    unknown = client.get("/api/drawing.gif", params={"caption": "the digitt 3"})
    assert unknown.status_code == 422 and unknown.json()["word"] == "digitt"


def test_create_app_from_a_pipeline_object():
    app = create_app(tiny_pipeline(steps=2), max_concurrent=1, model_name="tiny")
    with TestClient(app) as c:
        assert c.get("/health").json()["model"] == "tiny"
        assert len(parse_sse(draw(c, num_images=1).text)) == 1 + 3 + 1


def test_slots_refuse_beyond_the_limit():
    slots = Slots(1)
    assert slots.try_acquire() and not slots.try_acquire()
    slots.release()
    assert slots.try_acquire()
    with pytest.raises(ValueError, match="max_concurrent"):
        Slots(0)


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aligndraw")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_command_defaults_to_localhost(monkeypatch, model_dir):
    args = serve_args()
    assert (args.model, args.host, args.port) == ("mnist-captions", "127.0.0.1", 8000)
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append((app, kw)))
    args = serve_args("--model", str(model_dir), "--port", "8123", "--max-concurrent", "3")
    args.func(args)
    app, kwargs = calls[0]
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8123
    assert app.state.slots.limit == 3


def test_serve_command_rejects_a_bad_model_before_serving(monkeypatch, tmp_path):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("must not start"))
    with pytest.raises(ValueError, match="neither a directory nor a bundled model"):
        cmd_serve(serve_args("--model", str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="--port"):
        cmd_serve(serve_args("--model", "x", "--port", "70000"))


def test_the_app_draws_once_before_its_first_request(monkeypatch):
    drawn = []
    real = AlignDrawPipeline.__call__
    monkeypatch.setattr(AlignDrawPipeline, "__call__",
                        lambda self, *a, **k: drawn.append(a) or real(self, *a, **k))
    create_app(tiny_pipeline())
    # at creation: what a first drawing builds once (the step kernels, say) is ready then
    assert len(drawn) == 1
