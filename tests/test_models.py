"""The app's networks: shapes, the Adam paper's CNN layout, and clear errors."""

import pytest
import torch
from torch import nn

from lightning_imex.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_models_map_inputs_to_outputs(name, shape):
    model = build_model({"name": name}, shape, 7)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vector_models_take_flat_inputs():
    for name in ("logreg", "mlp"):
        assert build_model({"name": name}, (40,), 3)(torch.randn(2, 40)).shape == (2, 3)


def test_adam_paper_cnn_layout():
    model = build_model({"name": "cnn"}, (3, 32, 32), 10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(64, (5, 5)), (64, (5, 5)), (128, (5, 5))]
    pools = [m for m in model if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [1000, 10]


def test_mlp_options():
    model = build_model({"name": "mlp", "hidden": [32, 16], "activation": "tanh", "dropout": 0.5,
                         "batch_norm": True}, (1, 8, 8), 10)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "Tanh", "Dropout", "Linear", "BatchNorm1d", "Tanh",
                     "Dropout", "Linear"]


@pytest.mark.parametrize("config,shape,match", [
    ({"name": "vgg"}, (1, 8, 8), r"model.name must be one of \['cnn', 'logreg', 'mlp', 'resnet'\]"),
    ({"name": "cnn"}, (2,), r"model 'cnn' needs image inputs .* use model=mlp"),
    ({"name": "mlp", "activation": "sigmoid"}, (2,), "model.activation must be one of"),
    ({"name": "mlp", "dropout": 1.0}, (2,), r"model.dropout must be in \[0, 1\)"),
    ({"name": "mlp", "width": 3}, (2,), "model 'mlp': .*unexpected keyword argument 'width'"),
])
def test_errors_name_the_field(config, shape, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_model(config, shape, 3)
