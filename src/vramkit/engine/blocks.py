"""Finding a model's repeated blocks and choosing which of them stay on the GPU.

A streamable model is "the rest" (embedders, norms, output projections: small, always resident)
plus one or more stacks of repeated blocks that run one after another. The engine keeps some blocks
resident and streams the others; which ones is decided here, from the block order alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import nn

from ..errors import InvalidRequestError, UnsupportedPipelineError

__all__ = [
    "find_block_stacks",
    "block_parts",
    "streaming_units",
    "check_unit",
    "UNITS",
    "PART_ORDER",
    "choose_resident",
    "compute_per_byte",
    "split_streamed",
    "execution_order",
    "BLOCK_STACK_PATHS",
    "STREAMABLE_COMPONENTS",
    "COMPUTE_PER_BYTE",
]

#: Pipeline components whose blocks vramkit can stream (BlockStreaming's ``components``; the
#: planner sizes the streaming geometry of these only).
STREAMABLE_COMPONENTS: tuple[str, ...] = ("transformer", "controlnet", "text_encoder_2", "text_encoder")

#: Attribute paths of the repeated-block stacks, in execution order, for the architectures vramkit
#: streams: FluxTransformer2DModel and FluxControlNetModel (double-stream blocks, then single-stream
#: blocks), T5EncoderModel / T5Stack (``encoder.block`` / ``block``) and CLIPTextModel
#: (``encoder.layers`` in transformers 5, ``text_model.encoder.layers`` before: streamed with every
#: layer resident and parked between prompts, so that CLIP leaves the GPU while the transformer and
#: the VAE run).
BLOCK_STACK_PATHS: tuple[tuple[str, ...], ...] = (
    ("transformer_blocks", "single_transformer_blocks"),
    ("encoder.block",),
    ("block",),
    ("encoder.layers",),
    ("text_model.encoder.layers",),
)


#: Compute per byte of weights of a stack's blocks, relative to the default of 1.0, by the last
#: component of the stack's dotted name (so ``nets.0.transformer_blocks`` of a
#: FluxMultiControlNetModel matches like a FluxControlNetModel's or the transformer's own
#: ``transformer_blocks``). A FLUX double-stream block holds separate weights for the image and the
#: text stream, and each of them sees only its own stream's tokens, whereas every single-stream
#: weight sees both: per byte a double-stream block computes about half as much (FLUX.1-dev at
#: 1024^2 on an H200: 3.33 ms for 0.68 GB vs 2.85 ms for 0.283 GB, a ratio of 0.49). Streaming a
#: byte of it therefore hides behind half as much compute. Stacks not listed (single-stream blocks,
#: T5's ``block``) get 1.0.
COMPUTE_PER_BYTE: dict[str, float] = {"transformer_blocks": 0.5}


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    obj: object = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def find_block_stacks(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The repeated-block stacks of ``module`` as ``(dotted name, ModuleList)``, in execution order.

    FluxTransformer2DModel and FluxControlNetModel give ``transformer_blocks`` then
    ``single_transformer_blocks``; T5EncoderModel gives ``encoder.block``. An unknown module gives
    an empty list (the caller decides whether that is an error). Empty stacks are left out.

    FluxMultiControlNetModel gives the stacks of each of its ``nets`` in turn (``nets.0.transformer_blocks``,
    ...), each net once even where it is listed twice: several modes of one union ControlNet run the
    same net once per control image, so its blocks simply run more than once per forward (the ring
    scheduler's expected order repeats).
    """
    nets = getattr(module, "nets", None)
    if isinstance(nets, nn.ModuleList) and len(nets) > 0:
        found = []
        seen: set[int] = set()
        for i, net in enumerate(nets):
            if id(net) in seen:
                continue
            seen.add(id(net))
            found.extend((f"nets.{i}.{path}", stack) for path, stack in find_block_stacks(net))
        return found
    for paths in BLOCK_STACK_PATHS:
        found: list[tuple[str, nn.ModuleList]] = []
        for path in paths:
            stack = _get_path(module, path)
            if isinstance(stack, nn.ModuleList) and len(stack) > 0:
                found.append((path, stack))
        if found:
            return found
    return []


def execution_order(stacks: Sequence[tuple[str, nn.ModuleList]]) -> list[tuple[str, int, nn.Module]]:
    """Every block as ``(stack name, index in its stack, block)`` in the order the model runs them."""
    return [(name, i, block) for name, stack in stacks for i, block in enumerate(stack)]


#: What one streaming unit is: ``"block"`` (a whole repeated block: the default) or ``"part"``
#: (each parameter-owning child of a block, see :func:`block_parts`).
UNITS: tuple[str, ...] = ("block", "part")

#: The direct children of a block class that own its parameters, in the order its ``forward`` calls
#: them, each exactly once (checked against diffusers' FLUX blocks by hooking a tiny model's
#: children, tests/engine/test_part_streaming.py). Not the registration order: a
#: FluxSingleTransformerBlock registers ``proj_out`` before ``attn`` but calls it after. Children
#: without parameters or buffers (``norm2``, ``act_mlp``) stay outside every unit.
PART_ORDER: dict[str, tuple[str, ...]] = {
    "FluxTransformerBlock": ("norm1", "norm1_context", "attn", "ff", "ff_context"),
    "FluxSingleTransformerBlock": ("norm", "proj_mlp", "attn", "proj_out"),
}


def check_unit(unit: object) -> str:
    """``unit`` if it is one of :data:`UNITS`, else :class:`InvalidRequestError`."""
    if unit not in UNITS:
        raise InvalidRequestError(f"unit={unit!r}: use 'block' (whole blocks) or 'part' (each block's parts).")
    return str(unit)


def block_parts(block: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The parts of ``block`` that stream as separate units, as ``(child name, child)`` in call order.

    Only block classes listed in :data:`PART_ORDER` are split (the call order cannot be read from a
    module without running it): any other block (T5's, an unknown class) gives ``None`` and is
    streamed whole. A listed class whose parameters or buffers are not all held by the listed
    children (held directly by the block, or by another child: a modified block) cannot be split
    safely and raises :class:`UnsupportedPipelineError`. Listed children without any tensor are
    left out.
    """
    names = PART_ORDER.get(type(block).__name__)
    if names is None:
        return None
    parts: list[tuple[str, nn.Module]] = []
    covered: set[int] = set()
    for name in names:
        child = block._modules.get(name)
        if child is None:
            raise UnsupportedPipelineError(
                f"{type(block).__name__} has no child {name!r}: its parts cannot be streamed (use unit='block')."
            )
        tensors = {id(t) for _, _, _, t in module_tensors(child)}
        if tensors:
            parts.append((name, child))
            covered |= tensors
    outside = sorted({f"{n}" for n, t in [*block.named_parameters(), *block.named_buffers()] if id(t) not in covered})
    if outside:
        raise UnsupportedPipelineError(
            f"{type(block).__name__} holds tensors outside its parts {list(names)} ({outside[:4]}"
            f"{' ...' if len(outside) > 4 else ''}): it cannot be streamed as parts (use unit='block')."
        )
    return parts


def streaming_units(
    stacks: Sequence[tuple[str, nn.ModuleList]], unit: str = "block"
) -> list[tuple[str, int, str, nn.Module]]:
    """Every streaming unit as ``(stack name, block index in its stack, part name, module)`` in the
    order the model runs them.

    With ``unit="block"`` these are the blocks of :func:`execution_order` (part name ``""``); with
    ``unit="part"`` each block that :func:`block_parts` can split is replaced by its parts, in call
    order (the others stay whole, part name ``""``). Every unit keeps its block's stack name, so
    :data:`COMPUTE_PER_BYTE` applies to the parts of a stack as to its blocks.
    """
    check_unit(unit)
    out: list[tuple[str, int, str, nn.Module]] = []
    for name, index, block in execution_order(stacks):
        parts = block_parts(block) if unit == "part" else None
        if parts is None:
            out.append((name, index, "", block))
        else:
            out.extend((name, index, part, child) for part, child in parts)
    return out


def compute_per_byte(stack: str) -> float:
    """The :data:`COMPUTE_PER_BYTE` factor of a stack, by the last component of its dotted name."""
    return COMPUTE_PER_BYTE.get(stack.rsplit(".", 1)[-1], 1.0)


def split_streamed(streamed: int, sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Split ``streamed`` blocks across stacks of ``sizes`` blocks in proportion to ``weights``.

    Each stack's share is ``streamed * weight / total weight``, clipped to ``[0, size]``: what a full
    stack cannot take goes to the others, again in proportion to their weights (water-filling). The
    shares are then rounded by largest remainders (ties to the earlier stack), so they sum to exactly
    ``streamed`` (clipped to ``[0, sum(sizes)]``). Exact rational arithmetic: deterministic.
    Weights must be positive.
    """
    if len(sizes) != len(weights):
        raise ValueError(f"{len(sizes)} stack sizes but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    m = max(0, min(int(streamed), sum(sizes)))
    quota: dict[int, Fraction] = {}
    open_ = [k for k, n in enumerate(sizes) if n > 0]
    left = Fraction(m)
    while open_:
        total = sum(Fraction(sizes[k]) * Fraction(weights[k]) for k in open_)
        share = {k: left * Fraction(sizes[k]) * Fraction(weights[k]) / total for k in open_}
        full = [k for k in open_ if share[k] >= sizes[k]]
        if not full:
            quota.update(share)
            break
        for k in full:
            quota[k] = Fraction(sizes[k])
            left -= sizes[k]
        open_ = [k for k in open_ if k not in full]
    counts = [int(quota.get(k, 0)) for k in range(len(sizes))]  # floors (quotas are >= 0)
    by_remainder = sorted(range(len(sizes)), key=lambda k: (-(quota.get(k, 0) - counts[k]), k))
    for k in by_remainder[: m - sum(counts)]:
        counts[k] += 1
    return counts


def _spread(n: int, r: int) -> list[int]:
    """``r`` of ``n`` indices spread evenly: ``floor((i + 1/2) * n / r)`` for ``i < r``, in integers."""
    return [((2 * i + 1) * n) // (2 * r) for i in range(r)]


def choose_resident(blocks: Sequence[object] | int, resident: int, stacks: Sequence[str] | None = None) -> set[int]:
    """Positions (in execution order) of the ``resident`` blocks to keep on the GPU.

    Without ``stacks`` the resident blocks are spread evenly through the execution order, so every
    streamed block has resident compute before it to hide its copy behind (a contiguous run of
    streamed blocks would leave the copy engine as the only thing working). Position
    ``floor((i + 1/2) * n / r)`` for ``i < r``: distinct because the step ``n / r`` is at least 1,
    and deterministic.

    With ``stacks`` (the stack name of every position, in execution order) the streamed blocks are
    first split across the stacks so that each stack's streamed *bytes* follow its *compute*: a
    stack of ``n_s`` blocks gets a share of the ``n - r`` streamed blocks proportional to
    ``n_s * compute_per_byte(stack)`` (:func:`split_streamed`), since its blocks' copies must hide
    behind its own blocks' compute. Even by count, FLUX.1-dev at a 16 GiB budget streams 8 of its
    19 double-stream blocks, whose copies (98 ms at 55 GB/s) outlast their compute (63 ms) while the
    single-stream phase waits on compute; balanced, each phase's copy fits under its compute. Within
    each stack the resident blocks are then spread evenly as above. With one stack this is exactly
    the rule without ``stacks``.

    ``blocks`` is the block sequence (or just its length); ``resident`` is clipped to ``[0, n]``.
    """
    n = blocks if isinstance(blocks, int) else len(blocks)
    if isinstance(resident, bool) or not isinstance(resident, int):
        raise TypeError(f"resident must be an int, got {resident!r}")
    r = max(0, min(int(resident), n))
    if stacks is not None:
        if len(stacks) != n:
            raise ValueError(f"{len(stacks)} stack names for {n} blocks")
        return _choose_by_stack(stacks, r)
    if r == 0:
        return set()
    if r == n:
        return set(range(n))
    return set(_spread(n, r))


def _choose_by_stack(stacks: Sequence[str], r: int) -> set[int]:
    members: dict[str, list[int]] = {}
    for pos, name in enumerate(stacks):
        members.setdefault(name, []).append(pos)
    names = list(members)
    sizes = [len(members[s]) for s in names]
    streamed = split_streamed(len(stacks) - r, sizes, [compute_per_byte(s) for s in names])
    chosen: set[int] = set()
    for name, size, m_s in zip(names, sizes, streamed):
        r_s = size - m_s
        if r_s > 0:
            chosen.update(members[name][i] for i in _spread(size, r_s))
    return chosen


def module_tensors(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` as ``(owner, name, kind, tensor)``.

    ``kind`` is ``"parameter"`` or ``"buffer"``. A tensor registered under two names is listed under
    each (the caller dedupes by identity where that matters).
    """
    out: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                out.append((sub, name, "parameter", p))
        for name, b in sub._buffers.items():
            if b is not None:
                out.append((sub, name, "buffer", b))
    return out
