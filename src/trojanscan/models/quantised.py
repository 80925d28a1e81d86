"""8-bit symmetric per-tensor weight quantisation, as bit-flip attacks assume it, and its safe storage.

A weight tensor ``W`` is held as integers ``q = round(W / step)`` in [-127, 127] with
``step = max|W| / 127``; the network computes with ``q · step``. A bit flip changes one bit of a
weight's 8-bit two's complement code, so the distance between two models is the Hamming distance
of their codes (:func:`bit_flips`).

In a ``.safetensors`` file a quantised tensor is stored as its ``int8`` codes under its own name and
its step as a float32 scalar under ``NAME + STEP_SUFFIX``; the file's metadata lists the names
(``"quantisation"``). Loading turns them back into float weights (:func:`dequantised_state`): plain
tensors, no code and no pickle.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trojanscan.errors import TrojanscanError

SCHEME = "int8-symmetric-per-tensor"
STEP_SUFFIX = ".__int8_step__"
LEVELS = 127
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def quantise(weight: torch.Tensor, step: float | None = None) -> tuple[torch.Tensor, float]:
    """The ``int8`` codes of ``weight`` and its step (``max|W| / 127`` unless ``step`` is given)."""
    if step is None:
        top = float(weight.detach().abs().max()) if weight.numel() else 0.0
        step = top / LEVELS if top > 0 else 1.0
    codes = torch.round(weight.detach() / step).clamp(-LEVELS, LEVELS).to(torch.int8)
    return codes, float(step)


def dequantise(codes: torch.Tensor, step: float) -> torch.Tensor:
    """The float weights the codes stand for."""
    return codes.to(torch.float32) * step


def bit_flips(before: torch.Tensor, after: torch.Tensor) -> int:
    """Bits that differ between two ``int8`` tensors' two's complement codes."""
    if before.shape != after.shape:
        raise TrojanscanError(f"cannot count bit flips between shapes {tuple(before.shape)} and "
                              f"{tuple(after.shape)}")
    diff = (before.to(torch.int16) & 0xFF) ^ (after.to(torch.int16) & 0xFF)
    return int(_POPCOUNT[diff.to(torch.int64)].sum())


def quantisable(name: str, tensor: torch.Tensor) -> bool:
    """Whether a state entry is a layer weight to quantise (a floating matrix or kernel)."""
    return name.endswith("weight") and tensor.is_floating_point() and tensor.dim() >= 2


def quantised_state(state: dict[str, torch.Tensor], steps: dict[str, float]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write for ``state`` with the entries of ``steps`` as codes and steps, and the
    metadata that lists them."""
    out = {}
    for name, tensor in state.items():
        if name in steps:
            codes, step = quantise(tensor, steps[name])
            out[name] = codes.contiguous()
            out[name + STEP_SUFFIX] = torch.tensor(step, dtype=torch.float32)
        else:
            out[name] = tensor
    return out, {"scheme": SCHEME, "tensors": sorted(steps)}


def dequantised_state(state: dict[str, torch.Tensor], meta: Any, shown: object
                      ) -> dict[str, torch.Tensor]:
    """The float state a quantised file stands for; every claim of the metadata is checked."""
    if (not isinstance(meta, dict) or meta.get("scheme") != SCHEME
            or not isinstance(meta.get("tensors"), list)):
        raise TrojanscanError(f"{shown}: unknown weight quantisation {str(meta)[:80]!r}; this version "
                              f"reads {SCHEME!r}")
    names = meta["tensors"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise TrojanscanError(f"{shown}: its quantisation metadata names a tensor twice or not by name")
    out = dict(state)
    for name in names:
        codes, step = state.get(name), state.get(f"{name}{STEP_SUFFIX}")
        if (codes is None or step is None or codes.dtype != torch.int8 or step.numel() != 1
                or not step.is_floating_point()):
            raise TrojanscanError(f"{shown}: quantised tensor {name[:80]!r} lacks its int8 codes "
                                  "or its step")
        value = float(step)
        if not (math.isfinite(value) and 0 < value and LEVELS * value < torch.finfo(torch.float32).max):
            raise TrojanscanError(f"{shown}: quantised tensor {name[:80]!r} has step {value:g}; it must "
                                  "be positive and keep the weights finite")
        out[name] = dequantise(codes, value)
        del out[f"{name}{STEP_SUFFIX}"]
    return out
