"""Word-level language modelling: Penn Treebank from its standard files, and the help
texts of Python's own ``pydoc_data.topics`` (no files needed).

Each split's text becomes one stream of words, ``<eos>`` after every non-blank line; the
vocabulary is the training split's (``<eos>``, ``<unk>``, then the words by decreasing
count), and a word outside it reads as ``<unk>``. A sample is a window of ``bptt``
consecutive tokens and the same window shifted by one token, its targets: windows
``k = 0, 1, ...`` start at token ``k * bptt``, and the tokens after the last whole window
are dropped.

Every window starts from a zero hidden state: no state is carried from one batch to the
next. That loses some context at the start of each window (perplexities come out higher
than with a carried state, as in the papers' recipes), but it makes a training step a
function of its batch alone, so the training windows can be shuffled (and a resumed
epoch continues exactly, :mod:`.resumable`), and an optimizer that evaluates several
gradients per step, re-running the training step on the same batch, sees the same
function each time."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import TensorDataset

from ..validate import integer
from .base import ArrayDataModule
from .files import FileDataModule

__all__ = ["EOS", "PTBDataModule", "PydocTopicsDataModule", "TextDataModule", "build_vocabulary", "encode",
           "simple_words", "token_windows", "tokenize"]

EOS, UNK = "<eos>", "<unk>"
SPLITS = ("train", "val", "test")
# a word: letters, digits and underscores; anything else that is not a space: a
# punctuation token (a run of symbols such as "->", "**" or '("' is one token)
WORD = re.compile(r"[a-z0-9_]+|[^\sa-z0-9_]+")


def simple_words(line: str) -> list[str]:
    """``line`` lower-cased and cut into words and runs of punctuation (:data:`WORD`)."""
    return WORD.findall(line.lower())


def tokenize(text: str, words: Callable[[str], list[str]] = str.split) -> list[str]:
    """The ``words`` of every non-blank line of ``text``, each line followed by ``<eos>``
    (``str.split``: text that is already tokenised, as Penn Treebank's files are)."""
    tokens: list[str] = []
    for line in text.splitlines():
        line_words = words(line)
        if line_words:
            tokens += line_words + [EOS]
    return tokens


def build_vocabulary(tokens: Sequence[str], max_size: int | None = None) -> list[str]:
    """``<eos>``, ``<unk>``, then the other words of ``tokens`` by decreasing count (ties
    in alphabetical order, so that the ids are reproducible), at most ``max_size`` in all."""
    counts = Counter(token for token in tokens if token not in (EOS, UNK))
    vocabulary = [EOS, UNK, *sorted(counts, key=lambda word: (-counts[word], word))]
    return vocabulary[:max_size] if max_size is not None else vocabulary


def encode(tokens: Sequence[str], vocabulary: Sequence[str]) -> torch.Tensor:
    """The ids of ``tokens`` (int64), ``<unk>``'s for words outside ``vocabulary``."""
    ids = {word: i for i, word in enumerate(vocabulary)}
    unknown = ids[UNK]
    return torch.tensor([ids.get(token, unknown) for token in tokens], dtype=torch.int64)


def token_windows(ids: torch.Tensor, bptt: int) -> TensorDataset:
    """Samples ``(ids[k*bptt : (k+1)*bptt], ids[k*bptt + 1 : (k+1)*bptt + 1])`` for every
    whole window ``k``: views of ``ids``, no copy."""
    count = (len(ids) - 1) // bptt
    return TensorDataset(ids[:count * bptt].view(count, bptt), ids[1:count * bptt + 1].view(count, bptt))


class TextDataModule(ArrayDataModule):
    """A word-level language-modelling corpus with its own train, validation and test
    text. Subclasses implement :meth:`texts` and, for text that is not tokenised yet,
    :meth:`words`. Samples are token windows (module docstring); inputs stay int64 token
    ids (nothing is standardised), ``input_shape`` is ``(bptt,)``, ``num_outputs`` the
    vocabulary's size (the training split is read the first time it is asked for).

    Args:
        bptt: tokens per window (the length the network is unrolled over).
        max_tokens: keep only the first ``max_tokens`` tokens of the training split (and
            build the vocabulary from them); null keeps all. Validation and test stay
            whole, so that their perplexities compare across settings.
        max_vocab: at most this many vocabulary entries (``<eos>`` and ``<unk>``
            included): the rarer training words read as ``<unk>``; null keeps all.
        batch_size, num_workers, seed: as :class:`~lightning_imex.data.ArrayDataModule`'s
            (the seed fixes every epoch's order of the training windows).
    """

    task = "language_model"
    has_test_set = True

    def __init__(self, bptt: int = 35, max_tokens: int | None = None, max_vocab: int | None = None,
                 batch_size: int = 20, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        integer("dataset.bptt", bptt, 1)
        if max_tokens is not None:
            integer("dataset.max_tokens", max_tokens, 2)  # one window needs bptt + 1 tokens; setup says so
        if max_vocab is not None:
            integer("dataset.max_vocab", max_vocab, 3)  # <eos>, <unk> and a word
        self.bptt, self.max_tokens, self.max_vocab = bptt, max_tokens, max_vocab
        self.input_shape = (bptt,)

    def texts(self) -> dict[str, str]:
        """The raw text of each split, keyed ``train``, ``val``, ``test``."""
        raise NotImplementedError

    def words(self, line: str) -> list[str]:
        """One line's words (the text's own tokenisation: split at spaces)."""
        return line.split()

    def tokens(self) -> dict[str, list[str]]:
        """Each split's tokens (:func:`tokenize`), the training split cut to ``max_tokens``."""
        tokens = {split: tokenize(text, self.words) for split, text in self.texts().items()}
        tokens["train"] = tokens["train"][:self.max_tokens]
        return tokens

    @functools.cached_property
    def vocabulary(self) -> list[str]:
        """The training split's words (:func:`build_vocabulary`); index = token id."""
        return build_vocabulary(self.tokens()["train"], self.max_vocab)

    @property
    def num_outputs(self) -> int:
        return len(self.vocabulary)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, tokens in self.tokens().items():
            if len(tokens) <= self.bptt:
                raise ValueError(f"dataset.bptt={self.bptt} needs at least {self.bptt + 1} tokens per split; the "
                                 f"{split} split has {len(tokens)}" + (" (dataset.max_tokens)" if split == "train"
                                                                       and self.max_tokens is not None else ""))
            self.splits[split] = token_windows(encode(tokens, self.vocabulary), self.bptt)


class PydocTopicsDataModule(TextDataModule):
    """The help texts of the standard library's ``pydoc_data.topics`` (what ``help("if")``
    prints; shipped with Python, so it needs no files): lower-cased, cut into words and
    runs of punctuation (:func:`simple_words`). The topics, in name order, are cut into
    paragraphs (at blank lines); paragraph ``i`` goes to validation when ``i % 10 == 8``,
    to test when ``i % 10 == 9``, else to training. On Python 3.11: about 79k training,
    9k validation and 10k test tokens, a vocabulary of 4008 (2% of validation words
    unknown); other Python versions ship other texts."""

    def texts(self) -> dict[str, str]:
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[name] for name in sorted(topics))
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        part = {8: "val", 9: "test"}
        return {split: "\n".join(p for i, p in enumerate(paragraphs) if part.get(i % 10, "train") == split)
                for split in SPLITS}

    def words(self, line: str) -> list[str]:
        return simple_words(line)


class PTBDataModule(FileDataModule, TextDataModule):
    """Penn Treebank as language models use it (Mikolov's preprocessing: lower case, numbers
    as ``N``, a 10000-word vocabulary, rare words already ``<unk>``): ``ptb.train.txt``,
    ``ptb.valid.txt`` and ``ptb.test.txt`` (929k, 73k and 82k tokens with ``<eos>``), one
    sentence a line, from ``root`` or ``root/simple-examples/data`` (the layout of
    Mikolov's archive)."""

    files = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
    folders = (".", "simple-examples/data")
    source = ("https://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz (data/ptb.*.txt) or a copy of "
              "those three files")

    def texts(self) -> dict[str, str]:
        paths = self.paths()
        return {split: paths[name].read_text(encoding="utf-8") for split, name in zip(SPLITS, self.files)}
