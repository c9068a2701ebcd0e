"""Every example runs (tiny offline pipelines) and its output is checked; the notebook is executed
by a real Jupyter kernel through nbclient (skipped, with the reason, only if nbclient/nbformat/
ipykernel is missing) and, always, cell by cell in one namespace; one example also runs as a script
in a subprocess; the docs' plan generator and benchmark hook run on the committed files."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
TINY = (1, 3, 32, 32)


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _run(name: str, argv: list[str]):
    module = importlib.import_module(name)
    return module.main(argv)


def _src_env() -> dict[str, str]:
    """The environment for a child process that must import vramkit, installed or not."""
    import vramkit

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    src = str(Path(vramkit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def test_quickstart(capsys):
    out = _run("quickstart", [])
    assert "vramkit plan" in capsys.readouterr().out
    assert out["images"].shape == TINY
    assert out["plan"].steps  # the planner placed the components


def test_plan_for_my_gpu(capsys):
    plan = _run("plan_for_my_gpu", ["--vram", "12GiB", "--size", "1024x1024"])
    text = capsys.readouterr().out
    assert "vramkit plan" in text and "BlockStreaming" in text and "not measurements" in text
    assert plan.predicted.peak_vram <= 12 * 2**30


def test_plan_for_my_gpu_json_and_infeasible(capsys):
    plan = _run("plan_for_my_gpu", ["--model", "flux-fill", "--vram", "8GiB", "--size", "1360x768", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["request"]["width"] == 1360 and data["request"]["height"] == 768
    assert data == plan.to_dict()
    assert _run("plan_for_my_gpu", ["--vram", "0.25GiB"]) is None
    assert "smallest budget that plans" in capsys.readouterr().err


def test_controlnet_union_low_vram(capsys):
    out = _run("controlnet_union_low_vram", ["--control-mode", "depth"])
    text = capsys.readouterr().out
    assert "vramkit plan" in text and "ControlNet placed by the plan: True" in text
    assert out["images"].shape == TINY


def test_controlnet_union_full_needs_the_controlnet(capsys):
    with pytest.raises(SystemExit):
        _run("controlnet_union_low_vram", ["--full", "/nonexistent/FLUX.1-dev"])
    assert "--controlnet" in capsys.readouterr().err


@pytest.mark.parametrize("pipeline", ["fill", "inpaint"])
def test_fill_inpaint_low_vram(capsys, pipeline):
    out = _run("fill_inpaint_low_vram", ["--pipeline", pipeline])
    text = capsys.readouterr().out
    assert "vramkit plan" in text and "vae_encode" in text and "vae_decode" in text
    assert out["pipeline"] == {"fill": "FluxFillPipeline", "inpaint": "FluxInpaintPipeline"}[pipeline]
    assert out["images"].shape == TINY


def test_lora_without_compile(capsys):
    out = _run("lora_and_compile", [])
    assert "LoRA changes the image: True" in capsys.readouterr().out
    assert out["compiled_plan"] is None  # torch.compile only with --compile
    assert not torch.equal(out["with_lora"], out["without_lora"])


def test_lora_and_compile():
    out = _run("lora_and_compile", ["--compile"])
    assert any(s.strategy.name == "Compile" for s in out["compiled_plan"].steps)
    assert not torch.equal(out["with_lora"], out["without_lora"])


def test_example_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--steps", "1"], cwd=ROOT,
                          env=_src_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vramkit plan" in proc.stdout and "generated" in proc.stdout


def test_notebook_runs_cell_by_cell():
    nb = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)  # noqa: S102
    assert namespace["result"]["image"].shape == TINY
    assert namespace["result"]["plan"].lossless
    assert namespace["full_plan"].predicted.peak_vram <= 8 * 2**30


_NB_MISSING = [m for m in ("nbformat", "nbclient", "ipykernel") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(_NB_MISSING), reason=f"notebook execution needs {', '.join(_NB_MISSING)}: "
                    "pip install nbformat nbclient ipykernel")
def test_notebook_executes_in_a_kernel(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", _src_env()["PYTHONPATH"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = " ".join(o.get("data", {}).get("text/html", "") for o in outputs)
    text = " ".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "vramkit plan" in html  # the Plan's HTML table
    assert "torch.Size([1, 3, 32, 32])" in text
    assert "BlockStreaming" in text  # the full-size plan for 8 GiB


def test_examples_are_offline():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "from_pretrained" not in text or "local_files_only=True" in text, path.name
        assert "share=True" not in text, path.name


def test_docs_plan_blocks_are_generated_by_the_cli(monkeypatch):
    """docs/gen_plans.py regenerates one block exactly as `vramkit plan` prints it."""
    monkeypatch.syspath_prepend(str(DOCS))
    gen = importlib.import_module("gen_plans")
    args = gen.PAGES["how-to/gpu-8gb.md"][0]
    out = gen.run_plan(args)
    assert out.startswith("flux-dev: FLUX.1-dev") and "vramkit plan for model=flux-dev" in out and "predicted:" in out
    assert f"$ vramkit plan {args}\n" in (DOCS / "how-to/gpu-8gb.md").read_text()


def test_docs_benchmarks_page_comes_from_committed_json(monkeypatch):
    monkeypatch.syspath_prepend(str(DOCS))
    hooks = importlib.import_module("hooks")
    page = hooks.on_page_markdown("x\n<!-- benchmark-tables -->\ny", None, None, None)
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert f"`{path.name}`" in page
    assert "<!-- benchmark-tables -->" not in page


def test_app_check_generates_without_a_server(capsys):
    """examples/app.py --check: one generation through the app's own code path, no server (the
    browser test in tests/app drives the served UI)."""
    result = _run("app", ["--check", "--prompt", "a lighthouse"])
    text = capsys.readouterr().out
    assert "vramkit plan" in text and "full-size flux-dev" in text
    assert result.image.size == (32, 32)
    assert "denoising_step" in result.memory_text
