"""Every example runs (tiny offline pipelines) and its output is checked; the notebook's cells run
in order, in one namespace (the equivalent of executing it)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _run(name: str, argv: list[str]):
    module = importlib.import_module(name)
    return module.main(argv)


def test_quickstart(capsys):
    out = _run("quickstart", [])
    assert "vramkit plan" in capsys.readouterr().out
    assert out["images"].shape == (1, 3, 32, 32)


def test_plan_for_my_gpu(capsys):
    plan = _run("plan_for_my_gpu", ["--vram", "12GiB", "--size", "1024"])
    text = capsys.readouterr().out
    assert "vramkit plan" in text and "BlockStreaming" in text
    assert plan.predicted.peak_vram <= 12 * 2**30


def test_controlnet_union_low_vram(capsys):
    out = _run("controlnet_union_low_vram", [])
    assert "vramkit plan" in capsys.readouterr().out
    assert out["images"].shape == (1, 3, 32, 32)


def test_fill_inpaint_low_vram(capsys):
    out = _run("fill_inpaint_low_vram", [])
    text = capsys.readouterr().out
    assert "vramkit plan" in text and "vae_decode" in text
    assert out["images"].shape == (1, 3, 32, 32)


def test_lora_and_compile():
    out = _run("lora_and_compile", ["--compile"])
    assert not torch.equal(out["with_lora"], out["without_lora"])


def test_notebook_runs_cell_by_cell():
    nb = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)  # noqa: S102
    assert namespace["result"]["image"].shape == (1, 3, 32, 32)
    assert namespace["result"]["plan"].lossless
    assert "vramkit" in namespace["prof"]._repr_html_().lower() or namespace["prof"].report()


def test_examples_are_offline():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "from_pretrained" not in text or "local_files_only=True" in text, path.name
