"""A small residual network for images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..validate import integer
from .fields import image_shape


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
        width, blocks, stages = (integer("model.width", width, 1), integer("model.blocks", blocks, 1),
                                 integer("model.stages", stages, 1))
        in_channels = image_shape(input_shape, "resnet")[0]
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
