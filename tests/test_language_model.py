"""Word-level language modelling: the tokenizer, vocabulary and token windows, Penn
Treebank read from its standard files (a toy corpus written here), pydoc_topics, the LSTM
language model, perplexity as the task's metric, and the app end to end."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_imex.train as app
from lightning_imex.data import ResumableDataLoader
from lightning_imex.data.text import (EOS, UNK, PTBDataModule, PydocTopicsDataModule, build_vocabulary, encode,
                                      simple_words, token_windows, tokenize)
from lightning_imex.models import build_model
from lightning_imex.task import Perplexity, SupervisedTask
from test_app import config

# Penn Treebank's format: one sentence a line, words separated (and lines started) by spaces
PTB_TOY = {"ptb.train.txt": " the cat sat \n the dog ran \n a cat ran \n",
           "ptb.valid.txt": " the bird sat \n",  # "bird" is not in the training split
           "ptb.test.txt": " the cat \n"}


def write_ptb(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in PTB_TOY.items():
        (folder / name).write_text(text)
    return folder


# --- tokens, vocabulary, windows -------------------------------------------------------

def test_lines_end_with_eos_and_blank_lines_vanish():
    assert tokenize("the cat sat\n\n  \nthe dog\n") == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    assert simple_words('Print("Hi") -> x_1') == ["print", '("', "hi", '")', "->", "x_1"]
    assert tokenize('A = b\n"x"', simple_words) == ["a", "=", "b", EOS, '"', "x", '"', EOS]


def test_vocabulary_by_count_then_alphabet_and_unknown_words():
    tokens = tokenize("the cat sat\nthe dog\n")
    assert build_vocabulary(tokens) == [EOS, UNK, "the", "cat", "dog", "sat"]
    assert build_vocabulary(tokens, max_size=4) == [EOS, UNK, "the", "cat"]
    vocabulary = build_vocabulary(tokens, max_size=4)
    assert encode(["the", "dog", EOS, "bird"], vocabulary).tolist() == [2, 1, 0, 1]  # dog, bird: <unk>
    assert encode(["the"], vocabulary).dtype == torch.int64


def test_windows_are_consecutive_and_targets_shifted_by_one():
    windows = token_windows(torch.arange(11), bptt=3)  # 3 whole windows; token 10 is only a target
    inputs, targets = windows[:]
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert len(token_windows(torch.arange(10), bptt=3)) == 3 and len(token_windows(torch.arange(9), bptt=3)) == 2


# --- Penn Treebank files ---------------------------------------------------------------

@pytest.mark.parametrize("layout", [".", "simple-examples/data"])
def test_ptb_reads_its_three_files(tmp_path, layout):
    write_ptb(tmp_path / layout)
    dm = PTBDataModule(root=str(tmp_path), bptt=2, batch_size=2)
    dm.check_files()
    assert (dm.input_shape, dm.task) == ((2,), "language_model")
    assert dm.vocabulary == [EOS, UNK, "cat", "ran", "the", "a", "dog", "sat"]  # cat, ran, the: 2 each
    assert dm.num_outputs == 8
    dm.setup()
    assert {split: len(windows) for split, windows in dm.splits.items()} == {"train": 5, "val": 1, "test": 1}
    inputs, targets = dm.splits["val"][:]
    assert [dm.vocabulary[i] for i in inputs[0]] == ["the", UNK] and [dm.vocabulary[i] for i in targets[0]] == [
        UNK, "sat"]
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and len(loader) == 3
    x, y = next(iter(loader))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 2)  # token ids, not standardised
    assert sorted(map(tuple, torch.cat([x for x, _ in loader]).tolist())) == sorted(
        map(tuple, dm.splits["train"][:][0].tolist()))  # every training window once per epoch


def test_the_seed_shuffles_training_windows_only(tmp_path):
    a, b, c = (PTBDataModule(root=str(write_ptb(tmp_path)), bptt=1, batch_size=4, seed=seed) for seed in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    for split in ("train", "val", "test"):  # the seed picks no data: the splits are the files'
        assert all(torch.equal(u, v) for u, v in zip(a.splits[split][:], c.splits[split][:]))
    first = [next(iter(dm.train_dataloader()))[0] for dm in (a, b, c)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    loader = a.train_dataloader()
    assert not torch.equal(*(torch.cat([x for x, _ in loader]) for _ in range(2)))  # a new order every epoch
    assert [x for x, _ in a.val_dataloader()][0].tolist() == a.splits["val"][:4][0].tolist()  # in the text's order


def test_ptb_a_partial_folder_names_the_missing_file(tmp_path):
    # no folder at all: tests/test_data.py::test_missing_files_name_the_files_and_the_folders
    write_ptb(tmp_path / "partial").joinpath("ptb.test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing ptb\.test\.txt; looked in"):
        PTBDataModule(root=str(tmp_path / "partial")).check_files()


@pytest.mark.parametrize("kwargs,match", [
    (dict(bptt=0), r"dataset.bptt must be an integer >= 1, got 0"),
    (dict(bptt=True), r"dataset.bptt must be an integer >= 1, got True"),
    (dict(max_tokens=1), r"dataset.max_tokens must be an integer >= 2, got 1"),
    (dict(max_vocab=2), r"dataset.max_vocab must be an integer >= 3, got 2"),
    (dict(batch_size=0), r"dataset.batch_size must be an integer >= 1, got 0"),
    (dict(root=3), r"dataset.root must be a folder path, got 3"),
])
def test_bad_fields_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        PTBDataModule(**kwargs)
    assert "\n" not in str(error.value)


def test_a_split_shorter_than_a_window_is_an_error(tmp_path):
    dm = PTBDataModule(root=str(write_ptb(tmp_path)), bptt=4)  # the validation split has 4 tokens
    with pytest.raises(ValueError, match=r"^dataset.bptt=4 needs at least 5 tokens per split; the val split has 4$"):
        dm.setup()
    with pytest.raises(ValueError, match=r"the train split has 3 \(dataset.max_tokens\)$"):
        PTBDataModule(root=str(tmp_path), bptt=4, max_tokens=3).setup()


# --- pydoc_topics ----------------------------------------------------------------------

def test_pydoc_topics_splits_and_caps():
    dm = PydocTopicsDataModule(bptt=35)
    tokens = dm.tokens()
    sizes = {split: len(tokens[split]) for split in ("train", "val", "test")}
    assert sizes["train"] > 5 * sizes["val"] > 0 and sizes["train"] > 5 * sizes["test"] > 0  # about 80/10/10
    assert all(token == token.lower() for token in tokens["train"][:1000])
    assert dm.num_outputs == len(set(tokens["train"])) + 1  # the words and <eos>, plus <unk>
    small = PydocTopicsDataModule(bptt=35, max_tokens=2000, max_vocab=100)
    assert small.num_outputs == 100
    small.setup()
    assert len(small.splits["train"]) == 1999 // 35
    assert len(small.splits["val"]) == len(dm.tokens()["val"][1:]) // 35  # validation stays whole
    assert small.splits["val"][:][0].max() < 100  # rarer words are <unk>


# --- the network and the task ----------------------------------------------------------

def test_lstm_gives_logits_per_position():
    model = build_model({"name": "lstm", "embedding": 8, "hidden": 12, "layers": 2, "dropout": 0.1}, (7,), 50)
    out = model(torch.randint(0, 50, (3, 7)))
    assert out.shape == (3, 7, 50)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    tied = build_model({"name": "lstm", "embedding": 8, "hidden": 8, "tie_weights": True}, (7,), 50)
    assert tied.decoder.weight is tied.embedding.weight


@pytest.mark.parametrize("config,shape,task,match", [
    ({"name": "lstm", "embedding": 8, "hidden": 12, "tie_weights": True}, (7,), None,
     r"model.tie_weights needs model.embedding == model.hidden \(the decoder reuses the embedding matrix\), got "
     r"embedding 8 and hidden 12"),
    ({"name": "lstm", "tie_weights": "yes"}, (7,), None, r"model.tie_weights must be a bool \(true or false\), got 'yes'"),
    ({"name": "lstm", "layers": 0}, (7,), None, r"model.layers must be an integer >= 1, got 0"),
    ({"name": "lstm", "dropout": 1}, (7,), None, r"model.dropout must be a number in \[0, 1\)"),
    ({"name": "lstm"}, (1, 8, 8), None, r"model 'lstm' needs token windows \(bptt,\)"),
    ({"name": "lstm"}, (7,), "classification", "model 'lstm' does not fit this dataset's task 'classification': it "
     r"needs a language-model dataset \(token windows\)"),
    ({"name": "mlp"}, (7,), "language_model", "model 'mlp' does not fit this dataset's task 'language_model': use "
     "model=lstm"),
])
def test_lstm_errors_name_the_field(config, shape, task, match):
    with pytest.raises((ValueError, TypeError), match=match) as error:
        build_model(config, shape, 50, task)
    assert "\n" not in str(error.value)


def test_perplexity_is_exp_of_the_token_weighted_mean_loss():
    metric = Perplexity()
    metric.update(torch.tensor(2.0), weight=6)
    metric.update(torch.tensor(1.0), weight=2)
    assert math.isclose(metric.compute().item(), math.exp((2.0 * 6 + 1.0 * 2) / 8), rel_tol=1e-6)


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_validation_perplexity_of_a_known_batch():
    torch.manual_seed(0)
    module = SupervisedTask({"name": "lstm", "embedding": 8, "hidden": 8}, (5,), 30, task="language_model")
    assert module.example_input_array.dtype == torch.int64 and module.example_input_array.shape == (1, 5)
    assert {"train/ppl", "val/ppl", "val/loss"} <= module.logged_metrics()
    x, y = torch.randint(0, 30, (5, 5)), torch.randint(0, 30, (5, 5))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    # batches of 2, 2 and 1 windows: the epoch's value is the mean over tokens, not over batches
    result = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=2), verbose=False)[0]
    with torch.no_grad():
        token_loss = F.cross_entropy(module(x).flatten(0, 1), y.flatten())  # mean over all 25 tokens
    assert math.isclose(result["val/loss"], token_loss.item(), rel_tol=1e-5)
    assert math.isclose(result["val/ppl"], token_loss.exp().item(), rel_tol=1e-5)


# --- the app ---------------------------------------------------------------------------

def test_the_app_fits_an_lstm_on_pydoc_topics(tmp_path):
    # the default callbacks (checkpoint on val/loss, EMA) and schedule work for this task
    metrics = app.train(config(tmp_path, "dataset=pydoc_topics", "model=lstm"))
    assert {"train/loss", "train/ppl", "val/loss", "val/ppl"} <= set(metrics)
    assert math.isclose(metrics["val/ppl"], math.exp(metrics["val/loss"]), rel_tol=1e-5)


def test_the_app_fits_on_ptb_files(tmp_path):
    write_ptb(tmp_path / "data" / "ptb")
    metrics = app.train(config(tmp_path, "dataset=ptb", "model=lstm", "dataset.bptt=2", "dataset.batch_size=2",
                               "callbacks=none"))
    assert "val/ppl" in metrics


@pytest.mark.parametrize("overrides,match", [
    (["dataset=ptb", "model=lstm"], r"^dataset PTBDataModule: missing ptb.train.txt, ptb.valid.txt, ptb.test.txt; "),
    (["dataset=pydoc_topics"], "model 'mlp' does not fit this dataset's task 'language_model': use model=lstm"),
    (["dataset=pydoc_topics", "model=lstm", "+dataset.val_fraction=0.2"],
     "dataset.val_fraction: not a field of dataset 'pydoc_topics'; allowed: bptt, max_tokens, max_vocab"),
    (["dataset=pydoc_topics", "model=lstm", "callbacks.checkpoint.monitor=val/acc"],
     r"callbacks.checkpoint.monitor='val/acc' is not a metric this fit logs; it logs: .*val/ppl"),
])
def test_the_app_answers_bad_settings_in_one_line(tmp_path, overrides, match):
    with pytest.raises(app.ConfigError, match=match) as error:
        app.build(config(tmp_path, *overrides))
    assert "\n" not in str(error.value)
