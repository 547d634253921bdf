"""Networks the app trains, built from ``input_shape`` and ``num_outputs`` (given by the
datamodule) plus their own hyper-parameters: ``build_model({"name": "mlp", ...}, ...)``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["MODELS", "AdamCNN", "LogisticRegression", "MLP", "ResNet", "build_model"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
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
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout!r}")
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
    """``MODELS[config["name"]](input_shape, num_outputs, **rest)``; errors name the field."""
    options = dict(config)
    name = options.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    try:
        return MODELS[name](tuple(input_shape), int(num_outputs), **options)
    except TypeError as error:  # an unknown or missing keyword
        raise TypeError(f"model {name!r}: {error}") from None
