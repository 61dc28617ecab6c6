"""Checkpoints' RNG state: plain tensors and numbers that ``torch.load(weights_only=True)``
reads back (no unpickled Python objects), restoring every global RNG a run draws from."""

from __future__ import annotations

import random

import numpy as np
import torch

from memagents.train import rng_state, set_rng_state


def draws() -> tuple:
    """One draw from each RNG, including the cached-Gaussian paths of NumPy and ``random``."""
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),  # noqa: NPY002 (the global RNG is what is checkpointed)
        np.random.normal(),  # noqa: NPY002
        random.random(),
        random.gauss(0.0, 1.0),
    )


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002
    random.seed(3)
    draws()  # leaves a cached Gaussian in NumPy (has_gauss) and in random (gauss_next)
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = draws()
    draws()  # move every RNG on
    set_rng_state(torch.load(path, weights_only=True))
    assert draws() == expected


def test_rng_state_holds_no_python_objects_beyond_numbers(tmp_path):
    state = rng_state()
    allowed = (torch.Tensor, int, float, type(None), list)
    assert all(isinstance(v, allowed) for v in state.values()), {
        k: type(v) for k, v in state.items()
    }
