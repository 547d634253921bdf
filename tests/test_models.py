"""The app's networks: shapes, the Adam paper's CNN and the VGG layouts, and clear errors
(the LSTM language model: tests/test_language_model.py)."""

import pytest
import torch
from torch import nn

import lightning_imex.train as app
from lightning_imex.models import LANGUAGE_MODELS, MODELS, build_model
from test_app import config


@pytest.mark.parametrize("name", sorted(set(MODELS) - LANGUAGE_MODELS))
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


def test_vgg_layout():
    model = build_model({"name": "vgg", "widths": [16, "M", 32, 32, "M"], "dropout": 0.5}, (3, 32, 32), 10)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d",
                     "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Dropout", "Linear"]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding, c.bias) for c in convs] == [(16, (3, 3), (1, 1), None),
                                                                                   (32, (3, 3), (1, 1), None),
                                                                                   (32, (3, 3), (1, 1), None)]
    assert model[-1].in_features == 32 * 8 * 8 and model[-2].p == 0.5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg11_on_cifar_and_without_batch_norm():
    vgg11 = build_model({"name": "vgg", "widths": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]},
                        (3, 32, 32), 10)
    assert sum(isinstance(m, nn.Conv2d) for m in vgg11) == 8 and vgg11[-1].in_features == 512  # features end 1x1
    assert vgg11(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = build_model({"name": "vgg", "widths": [8, "M"], "batch_norm": False}, (1, 8, 8), 3)
    assert [type(m).__name__ for m in plain] == ["Conv2d", "ReLU", "MaxPool2d", "Flatten", "Dropout", "Linear"]
    assert plain[0].bias is not None


def test_vgg_on_vectors_is_a_one_line_app_error(tmp_path):
    with pytest.raises(app.ConfigError, match=r"^model 'vgg' needs image inputs \(channels, height, width\); this "
                                              r"dataset gives \(40,\): use model=mlp or model=logreg$"):
        app.build(config(tmp_path, "dataset=mnist1d", "model=vgg"))


def test_mlp_options():
    model = build_model({"name": "mlp", "hidden": [32, 16], "activation": "tanh", "dropout": 0.5,
                         "batch_norm": True}, (1, 8, 8), 10)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "Tanh", "Dropout", "Linear", "BatchNorm1d", "Tanh",
                     "Dropout", "Linear"]


@pytest.mark.parametrize("config,shape,match", [
    ({"name": "nope"}, (1, 8, 8), "model.name must be one of 'cnn', 'logreg', 'lstm', 'mlp', 'resnet', 'vgg', "
                                  "got 'nope'"),
    ({"name": "cnn"}, (2,), r"model 'cnn' needs image inputs .* use model=mlp"),
    ({"name": "mlp", "activation": "sigmoid"}, (2,), "model.activation must be one of"),
    ({"name": "mlp", "dropout": 1.0}, (2,), r"model.dropout must be a number in \[0, 1\) \(a drop probability\), "
                                            "got 1.0"),
    ({"name": "mlp", "width": 3}, (2,), "^model.width: not a field of model 'mlp'; allowed: hidden, activation, "
                                        "dropout, batch_norm$"),
    ({"name": "vgg"}, (40,), r"model 'vgg' needs image inputs .* use model=mlp"),
    ({"name": "vgg", "widths": [8, "M", "M", "M", "M"]}, (1, 8, 8),
     r"model.widths has 4 max poolings \('M'\): a 8x8 image allows at most 3"),
    ({"name": "vgg", "widths": [8, "m"]}, (1, 8, 8), r"model.widths must be a list of channel counts .* "
     r"model.widths\[1\] is 'm'"),
    ({"name": "vgg", "widths": ["M"]}, (1, 8, 8), "model.widths needs at least one convolution"),
    ({"name": "vgg", "widths": []}, (1, 8, 8), "model.widths must be a non-empty list"),
    ({"name": "vgg", "widths": 64}, (1, 8, 8), "model.widths must be a non-empty list"),
    ({"name": "vgg", "batch_norm": 1}, (1, 8, 8), "model.batch_norm must be a bool"),
])
def test_errors_name_the_field(config, shape, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_model(config, shape, 3)
