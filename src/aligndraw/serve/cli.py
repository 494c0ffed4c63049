"""``aligndraw serve``: the web demo's subcommand (parser and handler).

Imports neither fastapi nor uvicorn until the command runs, so ``aligndraw --help`` works
without the optional ``serve`` extra. Wired into :mod:`aligndraw.cli` by
``add_serve_parser(sub)``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging

from aligndraw.serve import DEFAULT_MAX_CONCURRENT

DEFAULT_MODEL = "mnist-captions"
log = logging.getLogger(__name__)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on an ``argparse`` subparsers object; returns its parser."""
    serve = subparsers.add_parser(
        "serve", help="web page: type a caption, watch it being drawn",
        description="Start the web demo: a page where you type a caption and watch the canvas "
                    "being drawn step by step, with the write-attention box and the words lighting "
                    "up as they are attended to. Needs the serve extra: "
                    "pip install 'aligndraw[serve]'. Binds 127.0.0.1 (this machine only) unless "
                    "--host says otherwise.")
    serve.add_argument("--model", default=DEFAULT_MODEL,
                       help="bundled model name, model directory or run directory "
                            "(default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s; 0.0.0.0 exposes the demo "
                            "to your network)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    serve.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT,
                       help="drawings computed at once; more requests get HTTP 429 "
                            "(default: %(default)s)")
    serve.set_defaults(func=cmd_serve)
    return serve


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the model (failing fast on a bad --model), then run uvicorn until Ctrl-C."""
    try:
        import uvicorn

        from aligndraw.serve.app import create_app
    except ImportError as err:
        raise ValueError(f"the web demo needs the serve extra ({err.name} is missing): "
                         "pip install 'aligndraw[serve]'") from err
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    app = create_app(args.model, max_concurrent=args.max_concurrent, device=args.device)
    if not _is_loopback(args.host):
        log.warning("serving on %s: anyone who can reach this machine can use the demo", args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"aligndraw serve: model {args.model}; open http://{host}:{args.port}/ (Ctrl-C stops)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
