"""The README opens with the two commands, and its Python snippet runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # the bundled model, as written
    out = namespace["out"]
    assert (tmp_path / "three_over_one.png").is_file()
    assert out.canvases.shape == (4, 33, 1, 60, 60)
    assert out.alignments.shape == (4, 32, 12)
