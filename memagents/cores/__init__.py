"""Memory cores: pure-torch recurrent modules with a common contract (see :class:`MemoryCore`).

>>> import memagents.cores as cores
>>> core = cores.make("dnc", input_size=8, memory_size=16, word_size=8)
>>> state = core.initial_state(batch_size=4)
"""

from __future__ import annotations

import inspect
from typing import Any

from memagents.cores.base import MemoryCore
from memagents.cores.dnc import AccessState, DNCCore, DNCState
from memagents.cores.fwp import FWPCore
from memagents.cores.ntm import NTMCore, NTMState
from memagents.cores.rnn import GRUCore, GRUState, LSTMCore, LSTMState, MLPCore, MLPState
from memagents.cores.sam import SAMCore
from memagents.cores.sdnc import SDNCCore

#: Registry key -> core class. Configs name cores by these keys only.
REGISTRY: dict[str, type[MemoryCore]] = {
    "mlp": MLPCore,
    "lstm": LSTMCore,
    "gru": GRUCore,
    "ntm": NTMCore,
    "dnc": DNCCore,
    "fwp": FWPCore,
    "sam": SAMCore,
    "sdnc": SDNCCore,
}


def available() -> list[str]:
    """The registered core names, e.g. ``["dnc", "gru", "lstm", "mlp", "ntm"]``."""
    return sorted(REGISTRY)


def core_kwargs(name: str) -> list[str]:
    """The keyword arguments core ``name`` accepts (besides ``input_size``)."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "input_size")]


def _lookup(name: str) -> type[MemoryCore]:
    if name not in REGISTRY:
        raise ValueError(f"unknown core {name!r}; available: {', '.join(available())}")
    return REGISTRY[name]


def make(name: str, input_size: int, **kwargs: Any) -> MemoryCore:
    """Build a registered core.

    :param name: a key of :func:`available`.
    :param input_size: features per step of the core's input.
    :param kwargs: the core's hyperparameters (``hidden_size``, ``memory_size`` N,
        ``word_size`` W, ``num_reads`` R, ``num_writes``, ``num_heads``, ``max_shift``, ...).
    :raises ValueError: unknown name, a keyword the core does not take, or a bad value.
    """
    cls = _lookup(name)
    allowed = core_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"core {name!r} does not take {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    return cls(input_size=input_size, **kwargs)


__all__ = [
    "REGISTRY",
    "AccessState",
    "DNCCore",
    "DNCState",
    "GRUCore",
    "GRUState",
    "LSTMCore",
    "LSTMState",
    "MLPCore",
    "MLPState",
    "MemoryCore",
    "NTMCore",
    "NTMState",
    "available",
    "core_kwargs",
    "make",
]
