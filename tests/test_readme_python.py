"""The README's Python examples run as written: every ```python block, in order, in one namespace,
in a scratch folder (they train a small digits model, so this is one of the slower tests)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import trojanscan

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_what_the_readme_imports_is_exported_from_trojanscan():
    imports = [line for block in python_blocks()
               for line in re.findall(r"^from trojanscan import (.+)$", block, re.M)]
    names = {name.strip() for line in imports for name in line.split(",")}
    assert names and names <= set(trojanscan.__all__), names - set(trojanscan.__all__)


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md, python block {i}", "exec"), namespace)  # noqa: S102
    verdict, record = namespace["verdict"], namespace["record"]
    assert verdict.flagged_labels == [0]
    assert record.after["reversed_asr"] < record.before["reversed_asr"]
    assert isinstance(record.model, torch.nn.Module)
    assert namespace["model"].metadata["epoch"] == 5
