"""Networks the app trains, one a file, built from ``input_shape`` and ``num_outputs``
(given by the datamodule) plus their own hyper-parameters:
``build_model({"name": "mlp", ...}, ...)``.

Every hyper-parameter is checked when the network is built: a bad one raises a one-line
``ValueError``/``TypeError`` naming the field (``model.hidden must be ...``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..validate import allowed_keywords, choice, is_integer
from .cnn import AdamCNN
from .logreg import LogisticRegression
from .lstm import LSTMLanguageModel
from .mlp import MLP
from .resnet import ResidualBlock, ResNet
from .vgg import VGG

__all__ = ["LANGUAGE_MODELS", "MODELS", "VGG", "AdamCNN", "LSTMLanguageModel", "LogisticRegression", "MLP", "ResNet",
           "ResidualBlock", "build_model", "model_fields"]

MODELS: Mapping[str, type[nn.Module]] = {"logreg": LogisticRegression, "mlp": MLP, "cnn": AdamCNN, "resnet": ResNet,
                                         "vgg": VGG, "lstm": LSTMLanguageModel}
# the models of task "language_model" (token ids in, next-token logits per position out); the others map one
# input to one output (classification, regression)
LANGUAGE_MODELS = frozenset({"lstm"})


def build_model(config: Mapping[str, Any], input_shape: Sequence[int], num_outputs: int,
                task: str | None = None) -> nn.Module:
    """``MODELS[config["name"]](input_shape, num_outputs, **rest)``; errors name the field
    and what it allows (one line each). A ``task`` (the datamodule's) is checked against
    the model: a language model for ``"language_model"``, another model otherwise."""
    if not isinstance(config, Mapping):
        raise TypeError(f"model must be a mapping with a name (one of {sorted(MODELS)}) and its fields, got {config!r}")
    options = dict(config)
    name = choice("model.name", options.pop("name", None), sorted(MODELS))
    allowed_keywords("model", options, model_fields(name), f"model {name!r}")
    if task is not None and (task == "language_model") != (name in LANGUAGE_MODELS):
        needed = (f"use model={' or model='.join(sorted(LANGUAGE_MODELS))}" if task == "language_model"
                  else "it needs a language-model dataset (token windows)")
        raise ValueError(f"model {name!r} does not fit this dataset's task {task!r}: {needed}")
    shape = tuple(input_shape)
    if not shape or not all(is_integer(n) and n >= 1 for n in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of integers >= 1, got {input_shape!r}")
    if not (is_integer(num_outputs) and num_outputs >= 1):
        raise ValueError(f"num_outputs must be an integer >= 1, got {num_outputs!r}")
    return MODELS[name](tuple(int(n) for n in shape), int(num_outputs), **options)


def model_fields(name: str) -> list[str]:
    """The fields ``MODELS[name]`` takes from a config (its keyword arguments, less the
    datamodule's ``input_shape`` and ``num_outputs``)."""
    parameters = inspect.signature(MODELS[name]).parameters
    return [key for key in parameters if key not in ("self", "input_shape", "num_outputs")]
