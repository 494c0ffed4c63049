"""The web demo: type a caption, watch alignDRAW draw it step by step (``aligndraw serve``).

    from aligndraw.serve import create_app
    app = create_app("mnist-captions")          # a FastAPI app; run it with uvicorn

Needs the optional ``serve`` extra (``pip install 'aligndraw[serve]'``: fastapi, uvicorn).
``aligndraw.serve.cli`` imports neither, so the command line works without the extra.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_CONCURRENT", "create_app"]

# Here, not in app.py, so that the CLI can show it without importing fastapi.
DEFAULT_MAX_CONCURRENT = 2  # drawings computed at once (one per core of a laptop); more get 429


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for the CLI parser) must not need fastapi.
    if name == "create_app":
        from aligndraw.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'aligndraw.serve' has no attribute {name!r}")
