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

__all__ = ["LANGUAGE_MODELS", "MODELS", "VGG", "AdamCNN", "LSTMLanguageModel", "LogisticRegression", "MLP", "ResNet",
           "build_model", "model_fields"]

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


def _check_widths(value: Any) -> tuple[int | str, ...]:
    """VGG's layer list: output channels of a 3x3 convolution, or ``"M"`` for a max pooling."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"model.widths must be a non-empty list of channel counts (integers >= 1) and 'M' (a max "
                         f"pooling), got {value!r}")
    for i, width in enumerate(value):
        if width != "M" and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise ValueError(f"model.widths must be a list of channel counts (integers >= 1) and 'M' (a max pooling), "
                             f"got {list(value)!r}: model.widths[{i}] is {width!r}")
    if all(width == "M" for width in value):
        raise ValueError(f"model.widths needs at least one convolution (a channel count), got {list(value)!r}")
    return tuple(value)


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


class VGG(nn.Sequential):
    """A VGG net for small images (Simonyan & Zisserman 2015, as CIFAR versions use it):
    ``widths`` lists the layers in order, an integer a 3x3 convolution (padding 1) with that
    many output channels, then BatchNorm (``batch_norm``) and ReLU, ``"M"`` a 2x2 max
    pooling; then dropout and one linear layer on the flattened features. VGG-11 on
    CIFAR-10 is ``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]`` (the features
    end 1x1); each pooling halves the image, so an 8x8 one takes three."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int,
                 widths: Sequence[int | str] = (64, "M", 128, "M", 256, 256, "M"), batch_norm: bool = True,
                 dropout: float = 0.0) -> None:
        widths, dropout = _check_widths(widths), _check_dropout(dropout)
        batch_norm = _check_bool("batch_norm", batch_norm)
        in_channels, height, width = _image_shape(input_shape, "vgg")
        poolings = widths.count("M")
        if min(height, width) >> poolings == 0:
            raise ValueError(f"model.widths has {poolings} max poolings ('M'): a {height}x{width} image allows at most "
                             f"{min(height, width).bit_length() - 1}")
        layers: list[nn.Module] = []
        for layer in widths:
            if layer == "M":
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
                continue
            layers.append(nn.Conv2d(in_channels, layer, 3, padding=1, bias=not batch_norm))  # BatchNorm has the bias
            layers += [nn.BatchNorm2d(layer), nn.ReLU()] if batch_norm else [nn.ReLU()]
            in_channels = layer
        layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels * height * width, num_outputs)]
        super().__init__(*layers)


class LSTMLanguageModel(nn.Module):
    """A word-level LSTM language model: token embedding, ``layers`` stacked LSTM layers,
    a linear decoder to the vocabulary; logits shaped ``(batch, bptt, vocabulary)``. Every
    window starts from a zero state (:mod:`lightning_imex.data.text`). ``dropout`` acts
    on the embeddings, between LSTM layers and before the decoder (Zaremba et al. 2014);
    ``tie_weights`` makes the decoder reuse the embedding matrix (Press & Wolf 2017), so it
    needs ``embedding == hidden``. The AdaMomentum paper's PTB model is embedding 400,
    hidden 1150 (AWD-LSTM, Merity et al. 2018, whose weight drop is not here)."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, embedding: int = 64, hidden: int = 64,
                 layers: int = 1, dropout: float = 0.0, tie_weights: bool = False) -> None:
        super().__init__()
        embedding, hidden, layers = (_check_int("embedding", embedding, 1), _check_int("hidden", hidden, 1),
                                     _check_int("layers", layers, 1))
        dropout, tie_weights = _check_dropout(dropout), _check_bool("tie_weights", tie_weights)
        if tie_weights and embedding != hidden:
            raise ValueError(f"model.tie_weights needs model.embedding == model.hidden (the decoder reuses the "
                             f"embedding matrix), got embedding {embedding} and hidden {hidden}")
        if len(input_shape) != 1:
            raise ValueError(f"model 'lstm' needs token windows (bptt,) from a language-model dataset; this dataset "
                             f"gives {tuple(input_shape)}")
        self.embedding = nn.Embedding(num_outputs, embedding)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, num_outputs)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        states, _ = self.lstm(self.dropout(self.embedding(tokens)))  # (batch, bptt, hidden), from a zero state
        return self.decoder(self.dropout(states))


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
    name = options.pop("name", None)
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    allowed = model_fields(name)
    for key in options:
        if key not in allowed:
            fields = f"allowed: {', '.join(allowed)}" if allowed else f"model {name!r} takes no field besides name"
            raise TypeError(f"model {name!r}: unexpected keyword argument {key!r} (model.{key} is not a field of "
                            f"{name}; {fields})")
    if task is not None and (task == "language_model") != (name in LANGUAGE_MODELS):
        needed = (f"use model={' or model='.join(sorted(LANGUAGE_MODELS))}" if task == "language_model"
                  else "it needs a language-model dataset (token windows)")
        raise ValueError(f"model {name!r} does not fit this dataset's task {task!r}: {needed}")
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
