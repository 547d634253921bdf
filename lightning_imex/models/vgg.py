"""A VGG network for small images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..validate import boolean, fraction, is_integer
from .fields import image_shape


def _widths(value: Any) -> tuple[int | str, ...]:
    """VGG's layer list: output channels of a 3x3 convolution, or ``"M"`` for a max pooling."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"model.widths must be a non-empty list of channel counts (integers >= 1) and 'M' (a max "
                         f"pooling), got {value!r}")
    for i, width in enumerate(value):
        if width != "M" and not (is_integer(width) and width >= 1):
            raise ValueError(f"model.widths must be a list of channel counts (integers >= 1) and 'M' (a max pooling), "
                             f"got {list(value)!r}: model.widths[{i}] is {width!r}")
    if all(width == "M" for width in value):
        raise ValueError(f"model.widths needs at least one convolution (a channel count), got {list(value)!r}")
    return tuple(value)


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
        widths, dropout = _widths(widths), fraction("model.dropout", dropout, note=" (a drop probability)")
        batch_norm = boolean("model.batch_norm", batch_norm)
        in_channels, height, width = image_shape(input_shape, "vgg")
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
