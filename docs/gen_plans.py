"""Regenerate the plan outputs shown in the docs: for each page and block below, run the exact
``vramkit plan ...`` command and write its output between the block's markers in the page.

    python docs/gen_plans.py            # rewrite the blocks
    python docs/gen_plans.py --check    # exit 1 if a committed block differs from what the CLI prints now

The outputs are the planner's predictions on a machine without a GPU (RAM assumed 64 GiB,
bandwidth assumed 25 GB/s, as the CLI says in its notes), not measurements. Each block is
``<!-- vramkit-plan: ARGS -->`` ... ``<!-- /vramkit-plan -->``; the command is run in this process
through ``vramkit.cli.main`` (same code as the ``vramkit`` command).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = Path(__file__).resolve().parent
TIERS = (6, 8, 12, 16, 24)

# page -> the `vramkit plan` arguments of each block on it (pages create their markers from this).
PAGES: dict[str, list[str]] = {
    **{f"how-to/gpu-{gib}gb.md": [f"--model flux-dev --vram {gib}GiB --size 1024x1024"] for gib in TIERS},
    "pipelines/text-to-image.md": ["--model flux-dev --vram 12GiB --size 1024x1024 --quality lossless"],
    "pipelines/fill-inpaint.md": ["--model flux-fill --vram 8GiB --size 1024x1024"],
    "pipelines/kontext.md": ["--model flux-kontext --vram 12GiB --size 1024x1024"],
    "pipelines/controlnet-union.md": ["--model flux-dev+controlnet-union --vram 12GiB --size 1024x1024"],
}

_BLOCK = re.compile(r"(<!-- vramkit-plan: (?P<args>.*?) -->\n)(?P<body>.*?)(<!-- /vramkit-plan -->)", re.DOTALL)


def run_plan(args: str) -> str:
    """What ``vramkit plan ARGS`` prints (stdout and stderr, as a terminal shows them)."""
    from vramkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["plan", *shlex.split(args)])
    finally:
        logging.disable(logging.NOTSET)
    text = out.getvalue() + err.getvalue()
    if code not in (0, 1):
        raise SystemExit(f"vramkit plan {args} exited with {code}:\n{text}")
    return text.rstrip("\n")


def render_block(args: str, output: str) -> str:
    return f"```console\n$ vramkit plan {args}\n{output}\n```\n"


def update_page(path: Path, blocks: list[str], cache: dict[str, str]) -> tuple[str, str]:
    """``(old text, new text)`` of one page with every block regenerated."""
    old = path.read_text()
    found = [m.group("args") for m in _BLOCK.finditer(old)]
    missing = [a for a in blocks if a not in found]
    if missing:
        raise SystemExit(f"{path.relative_to(DOCS)} lacks the block(s) <!-- vramkit-plan: {missing} -->")

    def replace(m: re.Match[str]) -> str:
        args = m.group("args")
        if args not in cache:
            cache[args] = run_plan(args)
        return m.group(1) + render_block(args, cache[args]) + m.group(4)

    return old, _BLOCK.sub(replace, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale blocks instead of rewriting them")
    args = parser.parse_args(argv)
    cache: dict[str, str] = {}
    stale = []
    for rel, blocks in PAGES.items():
        path = DOCS / rel
        old, new = update_page(path, blocks, cache)
        if old != new:
            stale.append(rel)
            if not args.check:
                path.write_text(new)
    verb = "stale" if args.check else "rewritten"
    print(f"{len(stale)} page(s) {verb}: {', '.join(stale) or '-'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
