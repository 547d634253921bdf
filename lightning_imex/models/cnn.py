"""The Adam paper's convolutional network."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..validate import fraction, integer
from .fields import image_shape, sizes


class AdamCNN(nn.Sequential):
    """The Adam paper's CNN (Kingma & Ba, section 6.3): c64-c64-c128-1000. Three stages
    of 5x5 convolution, ReLU and 3x3 max pooling with stride 2, then 1000 ReLU units."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (64, 64, 128),
                 hidden: int = 1000, dropout: float = 0.0) -> None:
        channels, hidden = sizes("channels", channels), integer("model.hidden", hidden, 1)
        dropout = fraction("model.dropout", dropout, note=" (a drop probability)")
        in_channels, height, width = image_shape(input_shape, "cnn")
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 5, padding=2), nn.ReLU(),
                       nn.MaxPool2d(3, stride=2, padding=1)]
            in_channels, height, width = out_channels, (height + 1) // 2, (width + 1) // 2
        layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels * height * width, hidden), nn.ReLU(),
                   nn.Dropout(dropout), nn.Linear(hidden, num_outputs)]
        super().__init__(*layers)
