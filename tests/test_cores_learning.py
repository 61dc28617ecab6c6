"""Learning checks: memory cores learn a small recall task that a memoryless core cannot.

The task (supervised, plain torch): ``K`` symbols from an alphabet of ``A`` are shown one per
step, then the input gives only a recall cue "emit item k" for ``k = 0..K-1`` and the target is
the k-th symbol shown. The inputs of the recall phase carry no information about the symbols, so
a memoryless core is at chance, ``1/A`` (its ceiling); a core with memory can be perfect.

Marked ``slow`` (deselected by default); run with ``pytest -m slow tests/test_cores_learning.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memagents.cores as cores

ALPHABET = 4  # A
ITEMS = 3  # K
INPUT_SIZE = ALPHABET + ITEMS  # symbol one-hot | recall-cue one-hot
CHANCE = 1.0 / ALPHABET


def recall_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [2K, B, A + K]`` and the targets of the recall phase ``[K, B]`` (symbol indices)."""
    symbols = torch.randint(ALPHABET, (ITEMS, batch), generator=gen)
    x = torch.zeros(2 * ITEMS, batch, INPUT_SIZE)
    x[:ITEMS].scatter_(-1, symbols.unsqueeze(-1), 1.0)  # presentation: one symbol per step
    for k in range(ITEMS):
        x[ITEMS + k, :, ALPHABET + k] = 1.0  # recall: "emit item k"
    return x, symbols


def train_and_score(name: str, steps: int, seed: int = 0, **kwargs) -> float:
    """Train core + linear readout with Adam; return the recall accuracy on fresh episodes."""
    torch.manual_seed(seed)
    core = cores.make(name, input_size=INPUT_SIZE, **kwargs)
    readout = nn.Linear(core.output_size, ALPHABET)
    params = list(core.parameters()) + list(readout.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, target = recall_batch(64, gen)
        y, _ = core(x)
        logits = readout(y[ITEMS:])  # [K, B, A]
        loss = nn.functional.cross_entropy(logits.reshape(-1, ALPHABET), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    with torch.no_grad():
        x, target = recall_batch(1024, torch.Generator().manual_seed(seed + 1))
        y, _ = core(x)
        return (readout(y[ITEMS:]).argmax(-1) == target).float().mean().item()


MEMORY_CORES = {
    "lstm": {"hidden_size": 32},
    "gru": {"hidden_size": 32},
    "ntm": {"hidden_size": 32, "memory_size": 8, "word_size": 8},
    "dnc": {"hidden_size": 32, "memory_size": 8, "word_size": 8, "num_reads": 1},
}


@pytest.fixture(scope="module")
def memoryless_accuracy() -> float:
    return train_and_score("mlp", steps=300, hidden_size=32)


@pytest.mark.slow
def test_memoryless_core_stays_at_chance(memoryless_accuracy):
    """The MLP cannot beat chance, its ceiling (up to sampling noise on 3072 answers)."""
    assert memoryless_accuracy < CHANCE + 0.05, memoryless_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MEMORY_CORES))
def test_memory_core_learns_recall_beyond_the_memoryless_ceiling(name, memoryless_accuracy):
    accuracy = train_and_score(name, steps=300, **MEMORY_CORES[name])
    assert accuracy > 0.9, accuracy
    assert accuracy > memoryless_accuracy + 0.5
