"""aligndraw: generating images from captions with attention (alignDRAW, ICLR 2016).

    from aligndraw import AlignDrawPipeline
    pipe = AlignDrawPipeline.from_pretrained("mnist-captions")
    images = pipe(["the digit 3 is at the top of the digit 1 ."]).images
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aligndraw")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["AlignDraw", "AlignDrawPipeline", "AlignDrawPipelineOutput", "__version__"]


def __getattr__(name: str):
    # Lazy imports keep `import aligndraw` cheap (no torch until a model is needed).
    if name in ("AlignDrawPipeline", "AlignDrawPipelineOutput"):
        from aligndraw import pipeline

        return getattr(pipeline, name)
    if name == "AlignDraw":
        from aligndraw.model import AlignDraw

        return AlignDraw
    raise AttributeError(f"module 'aligndraw' has no attribute {name!r}")
