"""A word-level LSTM language model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..validate import boolean, fraction, integer


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
        embedding, hidden, layers = (integer("model.embedding", embedding, 1), integer("model.hidden", hidden, 1),
                                     integer("model.layers", layers, 1))
        dropout = fraction("model.dropout", dropout, note=" (a drop probability)")
        tie_weights = boolean("model.tie_weights", tie_weights)
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
