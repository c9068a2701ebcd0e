"""Mechanism for ``Quantize``: weight quantization of an already loaded component, in place.

Quantization runs one block at a time (each child of a ``ModuleList`` stack, then each other
child) so only one block's full-precision weights are ever duplicated: peak memory does not double.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import InvalidRequestError, MissingDependencyError
from .base import Undo, register_strategy
from .configs import Quantize

logger = logging.getLogger("vramkit")

_PACKAGE = {"bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto", "torchao": "torchao"}
_PIP = {"bitsandbytes": "bitsandbytes", "quanto": "optimum-quanto", "torchao": "torchao"}


def backend_available(backend: str) -> bool:
    return importlib.util.find_spec(_PACKAGE[backend].split(".")[0]) is not None


def _require(backend: str) -> None:
    if not backend_available(backend):
        raise MissingDependencyError(
            f"Quantize(backend={backend!r}) needs the {_PIP[backend]!r} package: "
            f"pip install {_PIP[backend]}  (or pip install 'vramkit[quant]')."
        )


def iter_quantization_units(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Sub-modules small enough to quantize one at a time: the items of every ModuleList, and
    other leaf-level children, depth first."""
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            yield from child
        elif isinstance(child, torch.nn.Linear):
            yield child
        elif any(isinstance(m, torch.nn.ModuleList) for m in child.modules()):
            yield from iter_quantization_units(child)
        else:
            yield child


def _progress(units: list[torch.nn.Module], desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with diffusers
        return units
    return tqdm(units, desc=desc, disable=len(units) < 8, leave=False)


def _quantize_units(module: torch.nn.Module, fn: Callable[[torch.nn.Module], None], desc: str) -> None:
    units = list(iter_quantization_units(module))
    for unit in _progress(units, desc):
        if any(isinstance(m, torch.nn.Linear) for m in unit.modules()):
            fn(unit)


def _torchao(module: torch.nn.Module, weights: str) -> None:
    from torchao.quantization import quantize_

    if weights == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config: Any = Int8WeightOnlyConfig()
    else:
        from torchao.quantization import Float8WeightOnlyConfig

        config = Float8WeightOnlyConfig()

    def not_lora(m: torch.nn.Module, fqn: str) -> bool:
        # LoRA adapters stay in full precision: quantizing them would round the adapter itself.
        return isinstance(m, torch.nn.Linear) and not any(p.startswith("lora_") for p in fqn.split("."))

    def one(unit: torch.nn.Module) -> None:
        if isinstance(unit, torch.nn.Linear):
            wrapper = torch.nn.Sequential(unit)
            quantize_(wrapper, config, filter_fn=not_lora)
        else:
            quantize_(unit, config, filter_fn=not_lora)

    _quantize_units(module, one, f"torchao {weights}")


def _quanto(module: torch.nn.Module, weights: str) -> None:
    from optimum.quanto import freeze, qfloat8, qint8, quantize

    qtype = qint8 if weights == "int8" else qfloat8
    names = {id(m): n for n, m in module.named_modules()}

    def one(unit: torch.nn.Module) -> None:
        # quanto replaces Linear modules by QLinear in their parent, so it must be given the root
        # with this unit's names as the allowlist (a bare Linear cannot replace itself).
        name = names[id(unit)]
        quantize(module, weights=qtype, include=[name, f"{name}.*"], exclude=["*lora_*"])
        freeze(module.get_submodule(name))

    _quantize_units(module, one, f"quanto {weights}")


def _bitsandbytes(module: torch.nn.Module, weights: str, device: torch.device) -> None:
    import bitsandbytes as bnb

    if device.type != "cuda":
        raise InvalidRequestError(
            "Quantize(backend='bitsandbytes') quantizes on a CUDA device and none is available; "
            "use backend='quanto' or 'torchao' on this machine."
        )
    if weights == "fp8":
        raise InvalidRequestError("bitsandbytes has no fp8 weights; use weights='int8' or 'nf4', or backend='torchao'.")

    def replace(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                compute = child.weight.dtype
                if weights == "int8":
                    new = bnb.nn.Linear8bitLt(
                        child.in_features, child.out_features, child.bias is not None,
                        has_fp16_weights=False, threshold=6.0,
                    )
                    new.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
                else:
                    new = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, child.bias is not None,
                        compute_dtype=compute, quant_type="nf4",
                    )
                    new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                new.to(device)  # bitsandbytes quantizes when the weight moves to the GPU
                setattr(parent, name, new)
            else:
                replace(child)

    def one(unit: torch.nn.Module) -> None:
        if isinstance(unit, torch.nn.Linear):
            raise InvalidRequestError("bitsandbytes quantization needs Linear layers inside a parent module.")
        replace(unit)

    _quantize_units(module, one, f"bitsandbytes {weights}")


def _bitsandbytes_on_gpu(module: torch.nn.Module, weights: str) -> None:
    device = next(module.parameters()).device
    if device.type != "cuda" and torch.cuda.is_available():
        device = torch.device("cuda")
    _bitsandbytes(module, weights, device)


_BACKENDS: dict[str, Callable[[torch.nn.Module, str], None]] = {
    "torchao": _torchao,
    "quanto": _quanto,
    "bitsandbytes": _bitsandbytes_on_gpu,
}


@register_strategy(Quantize)
def apply_quantize(pipe: Any, config: Quantize, component: str | None) -> Undo | None:
    _require(config.backend)
    module = getattr(pipe, component)
    _BACKENDS[config.backend](module, config.weights)
    logger.info("Quantize: %s weights quantized to %s with %s", component, config.weights, config.backend)
    return None
