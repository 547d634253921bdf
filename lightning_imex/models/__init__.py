"""Networks the app trains, built from ``input_shape`` and ``num_outputs`` (given by the
datamodule) plus their own hyper-parameters: ``build_model({"name": "mlp", ...}, ...)``.

Every hyper-parameter is checked when the network is built: a bad one raises a one-line
``ValueError``/``TypeError`` naming the field (``model.hidden must be ...``)."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["MODELS", "AdamCNN", "LogisticRegression", "MLP", "ResNet", "build_model", "model_fields"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _check_int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model.{field} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_sizes(field: str, value: Any) -> tuple[int, ...]:
    """A list of layer sizes (each an integer >= 1; the list may be empty)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"model.{field} must be a list of integers >= 1 (one per layer), got {value!r}")
    for i, size in enumerate(value):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"model.{field} must be a list of integers >= 1 (one per layer), got {list(value)!r}: "
                             f"model.{field}[{i}] is {size!r}")
    return tuple(value)


def _check_dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"model.dropout must be in [0, 1) (a drop probability), got {value!r}")
    return float(value)


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"model.{field} must be true or false, got {value!r}")
    return value


def _activation(name: str) -> type[nn.Module]:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {model!r} needs image inputs (channels, height, width); this dataset gives "
                         f"{tuple(input_shape)}: use model=mlp or model=logreg")
    return tuple(input_shape)


class LogisticRegression(nn.Sequential):
    """Multinomial logistic (or linear, for regression) model on the flattened input."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


class MLP(nn.Sequential):
    """Fully connected layers on the flattened input (the Adam paper's MNIST MLP is
    ``hidden=[1000, 1000]``, ``activation="relu"``, ``dropout=0.5``)."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False) -> None:
        hidden, dropout = _check_sizes("hidden", hidden), _check_dropout(dropout)
        batch_norm = _check_bool("batch_norm", batch_norm)
        _activation(activation)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(_activation(activation)())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)


class AdamCNN(nn.Sequential):
    """The Adam paper's CNN (Kingma & Ba, section 6.3): c64-c64-c128-1000. Three stages
    of 5x5 convolution, ReLU and 3x3 max pooling with stride 2, then 1000 ReLU units."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (64, 64, 128),
                 hidden: int = 1000, dropout: float = 0.0) -> None:
        channels, hidden = _check_sizes("channels", channels), _check_int("hidden", hidden, 1)
        dropout = _check_dropout(dropout)
        in_channels, height, width = _image_shape(input_shape, "cnn")
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 5, padding=2), nn.ReLU(),
                       nn.MaxPool2d(3, stride=2, padding=1)]
            in_channels, height, width = out_channels, (height + 1) // 2, (width + 1) // 2
        layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels * height * width, hidden), nn.ReLU(),
                   nn.Dropout(dropout), nn.Linear(hidden, num_outputs)]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.shortcut(x)).relu()


class ResNet(nn.Sequential):
    """A small pre-pooling residual network: a 3x3 stem, ``stages`` of ``blocks`` basic
    blocks (width doubling and stride 2 from the second stage), global average pooling."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, width: int = 32, blocks: int = 2,
                 stages: int = 3) -> None:
        width, blocks, stages = (_check_int("width", width, 1), _check_int("blocks", blocks, 1),
                                 _check_int("stages", stages, 1))
        in_channels = _image_shape(input_shape, "resnet")[0]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU()]
        channels = width
        for stage in range(stages):
            out = width * 2 ** stage
            for block in range(blocks):
                layers.append(ResidualBlock(channels, out, 2 if stage and not block else 1))
                channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_outputs)]
        super().__init__(*layers)


MODELS: Mapping[str, type[nn.Module]] = {"logreg": LogisticRegression, "mlp": MLP, "cnn": AdamCNN, "resnet": ResNet}


def build_model(config: Mapping[str, Any], input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """``MODELS[config["name"]](input_shape, num_outputs, **rest)``; errors name the field
    and what it allows (one line each)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"model must be a mapping with a name (one of {sorted(MODELS)}) and its fields, got {config!r}")
    options = dict(config)
    name = options.pop("name", None)
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    allowed = model_fields(name)
    for key in options:
        if key not in allowed:
            fields = f"allowed: {', '.join(allowed)}" if allowed else f"model {name!r} takes no field besides name"
            raise TypeError(f"model {name!r}: unexpected keyword argument {key!r} (model.{key} is not a field of "
                            f"{name}; {fields})")
    shape = tuple(input_shape)
    if not shape or not all(_is_count(n) for n in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of integers >= 1, got {input_shape!r}")
    if not _is_count(num_outputs):
        raise ValueError(f"num_outputs must be an integer >= 1, got {num_outputs!r}")
    return MODELS[name](tuple(int(n) for n in shape), int(num_outputs), **options)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def model_fields(name: str) -> list[str]:
    """The fields ``MODELS[name]`` takes from a config (its keyword arguments, less the
    datamodule's ``input_shape`` and ``num_outputs``)."""
    parameters = inspect.signature(MODELS[name]).parameters
    return [key for key in parameters if key not in ("self", "input_shape", "num_outputs")]
