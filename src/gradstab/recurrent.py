"""Recurrent sequence classifiers (vanilla RNN, LSTM, GRU, written out step by step) and
synthetic long-sequence tasks whose answer sits at the start of the sequence.

A recurrent net multiplies the same Jacobian ``diag(act') W_hh`` into the gradient once per
time step, so a sequence of length T behaves like a T-layer network with tied weights
(Bengio et al. 1994; Pascanu et al. 2013).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._check import one_of, positive_float, positive_int
from .data import Split
from .device import pick_device, resolve_seed

CELLS = ("rnn", "lstm", "gru")
TASKS = ("first", "adding")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


class RecurrentClassifier(nn.Module):
    """Read a (N, T, F) sequence with one recurrent layer, classify from the last hidden state.

    ``cell``: ``"rnn"`` (``h = tanh(W_ih x + W_hh h)``), ``"lstm"`` (gates i, f, g, o as in
    ``torch.nn.LSTM``) or ``"gru"`` (gates r, z, n as in ``torch.nn.GRU``). ``ih`` and ``hh`` are
    ``nn.Linear`` maps holding all gates, so :class:`~gradstab.monitor.GradientMonitor` sees them as layers.
    Weights: ``W_ih ~ N(0, 1/F)``, each gate block of ``W_hh ~ N(0, recurrent_gain^2/hidden)``
    (spectral radius about ``recurrent_gain``), biases 0 except ``memory_bias`` on the gate that keeps
    the old state (LSTM forget gate, GRU update gate); 1 is a common choice (Jozefowicz et al. 2015).
    """

    def __init__(self, cell: str = "rnn", input_size: int = 8, hidden: int = 32, num_classes: int = 8,
                 recurrent_gain: float = 1.0, memory_bias: float = 0.0):
        super().__init__()
        one_of("cell", cell, CELLS)
        positive_int("input_size", input_size)
        positive_int("hidden", hidden)
        positive_int("num_classes", num_classes, minimum=2)
        positive_float("recurrent_gain", recurrent_gain)
        memory_bias = float(memory_bias)
        if not math.isfinite(memory_bias):
            raise ValueError(f"memory_bias must be a finite number, got {memory_bias!r}")
        self.cell, self.hidden = cell, hidden
        self.config = dict(cell=cell, input_size=input_size, hidden=hidden, num_classes=num_classes,
                           recurrent_gain=recurrent_gain, memory_bias=memory_bias)
        gates = GATES[cell] * hidden
        self.ih = nn.Linear(input_size, gates)
        self.hh = nn.Linear(hidden, gates)
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.ih.weight.normal_(0.0, 1 / math.sqrt(input_size))
            self.hh.weight.normal_(0.0, recurrent_gain / math.sqrt(hidden))
            self.ih.bias.zero_()
            self.hh.bias.zero_()
            if cell != "rnn":  # LSTM forget gate f (2nd block), GRU update gate z (2nd block)
                self.ih.bias[hidden : 2 * hidden] = memory_bias

    def step(self, xi: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step from the input projection ``xi = W_ih x_t + b_ih``: returns (h, c)."""
        hh = self.hh(h)
        if self.cell == "rnn":
            return torch.tanh(xi + hh), c
        if self.cell == "lstm":
            i, f, g, o = (xi + hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        xr, xz, xn = xi.chunk(3, dim=1)
        hr, hz, hn = hh.chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, c

    def states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states h_1..h_T for a (N, T, F) batch (starting from h_0 = 0)."""
        if x.ndim != 3 or x.shape[2] != self.ih.in_features:
            raise ValueError(f"input must have shape (N, T, {self.ih.in_features}); got {tuple(x.shape)}")
        xi = self.ih(x)  # all input projections at once
        h = c = x.new_zeros(x.shape[0], self.hidden)
        out = []
        for t in range(x.shape[1]):
            h, c = self.step(xi[:, t], h, c)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) from the last hidden state of a (N, T, F) batch."""
        return self.head(self.states(x)[-1])


def rnn(cell: str = "rnn", seed: int | None = None, **knobs) -> RecurrentClassifier:
    """Build a :class:`RecurrentClassifier` with its weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(resolve_seed(seed))
        return RecurrentClassifier(cell, **knobs)


def state_gradients(model: RecurrentClassifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Norms ``||dL/dh_t||`` for t = 1..T (a (T,) CPU tensor), L the mean cross-entropy on (x, y).

    Read right to left, this is how the error signal grows or fades as it travels back in time.
    """
    states = model.states(x)
    for h in states:
        h.retain_grad()
    loss = nn.functional.cross_entropy(model.head(states[-1]), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    norms = torch.stack([h.grad.norm() for h in states]).detach().cpu()
    model.zero_grad(set_to_none=True)
    return norms


def _first_token(n: int, length: int, symbols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(symbols, (n, length), generator=gen)
    return nn.functional.one_hot(tokens, symbols).float(), tokens[:, 0]


def _adding(n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(n, length, generator=gen)
    marks = torch.zeros(n, length)
    half = max(length // 2, 1)
    first = torch.randint(half, (n,), generator=gen)
    second = half + torch.randint(length - half, (n,), generator=gen)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    total = values[rows, first] + values[rows, second]
    return torch.stack([values, marks], dim=2), (total > 1).long()


def sequence_task(name: str = "first", length: int = 50, n_train: int = 1024, n_test: int = 512,
                  symbols: int = 8, seed: int | None = None, device=None) -> Split:
    """A seeded synthetic task whose inputs are (N, length, F) float sequences.

    - ``"first"``: one-hot tokens from ``symbols`` symbols (F = symbols); the label is the *first*
      token, so the net must carry it through ``length - 1`` steps of distractors. Chance = 1/symbols.
    - ``"adding"``: F = 2 (a value in [0, 1) and a marker); two positions are marked, one in each
      half; the label is 1 if the two marked values sum to more than 1 (a classification version
      of the adding problem, Hochreiter & Schmidhuber 1997). Chance = 1/2.
    """
    one_of("name", name, TASKS)
    positive_int("length", length, minimum=2)
    positive_int("n_train", n_train)
    positive_int("n_test", n_test)
    positive_int("symbols", symbols, minimum=2)
    gen = torch.Generator().manual_seed(resolve_seed(seed))
    n = n_train + n_test
    x, y = _first_token(n, length, symbols, gen) if name == "first" else _adding(n, length, gen)
    split = Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    return split.to(pick_device() if device is None else torch.device(device))
