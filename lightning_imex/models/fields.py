"""Checks of the networks' fields that :mod:`lightning_imex.validate` does not cover: layer
lists, activations, image inputs. Each raises one line naming ``model.<field>``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..validate import choice, is_integer

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def sizes(field: str, value: Any) -> tuple[int, ...]:
    """A list of layer sizes (each an integer >= 1; the list may be empty)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"model.{field} must be a list of integers >= 1 (one per layer), got {value!r}")
    for i, size in enumerate(value):
        if not is_integer(size) or size < 1:
            raise ValueError(f"model.{field} must be a list of integers >= 1 (one per layer), got {list(value)!r}: "
                             f"model.{field}[{i}] is {size!r}")
    return tuple(value)


def activation(name: Any) -> type[nn.Module]:
    return ACTIVATIONS[choice("model.activation", name, sorted(ACTIVATIONS))]


def image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {model!r} needs image inputs (channels, height, width); this dataset gives "
                         f"{tuple(input_shape)}: use model=mlp or model=logreg")
    return tuple(input_shape)
