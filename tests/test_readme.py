"""The README's Python snippet runs as written (against a tiny saved model)."""

import re
from pathlib import Path

from aligndraw import AlignDrawPipeline
from aligndraw.model import AlignDraw
from aligndraw.text import mnist_vocabulary

from conftest import tiny_run_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    config = tiny_run_config()
    AlignDrawPipeline(AlignDraw(config.model), mnist_vocabulary(), config).save_pretrained(
        tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert (tmp_path / "three_over_one.png").is_file()
    assert out.canvases.shape == (4, config.model.steps + 1, 1, 60, 60)
