"""Shared set-up and fixtures of the test suite.

- One intra-op thread by default: on this 2-core machine two threads make small recurrent
  workloads slower and their timings erratic (see the issue's benchmark notes). The tests do not
  depend on it: ``MEMAGENTS_TEST_THREADS=n`` runs them with ``n`` threads.
- Bitwise comparisons (``torch.equal``) only where both sides are the same kernels on the same
  shapes, memory layouts and values (the same call twice, per-element math, integers, copies
  and packing). Two computations that differ in a library call's shape (a sequence split in
  two, another batch size), in an operand's strides or alignment (an unpacked state's views), in
  the kernel (native C++ against its torch reference) or in the thread count may round
  differently: BLAS and oneDNN choose kernels, blocking and summation order by CPU, shape, layout
  and threads. Those compare with :data:`PATH_TOL` (float32) or :data:`PATH_TOL_F64`.
- ``tiny_core`` builds any registered core at sizes small enough for exhaustive checks, from one
  table of hyperparameters filtered by what each core accepts, so a newly registered core is
  covered by the contract tests without editing them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import Tensor

import memagents.cores as cores
from memagents.cores import native
from memagents.cores import state as state_lib
from memagents.cores.addressing import EPSILON

#: the suite's intra-op thread count (``MEMAGENTS_TEST_THREADS``, default 1)
TEST_THREADS = int(os.environ.get("MEMAGENTS_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _keep_the_thread_count():
    """The training and evaluation CLIs set ``train.torch_threads`` in-process; restore the
    suite's count after each test so that a test never runs at a count another test left."""
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


#: Tolerance between two float32 computations of the same values that are not bitwise equal by
#: construction (see the module docstring): a few float32 roundings (~6e-8 each) per step,
#: accumulated over a few steps of a tiny core, with a floor for results near zero.
PATH_TOL = {"rtol": 1e-5, "atol": 1e-6}

#: The same for float64 computations (roundings of ~1e-16).
PATH_TOL_F64 = {"rtol": 1e-12, "atol": 1e-12}


#: the native kernels are meant to run here (:func:`memagents.cores.native.expected`: the
#: compiler the loader uses, ``$CXX`` or ``c++``, and ``MEMAGENTS_NATIVE`` not ``0``; always under
#: ``MEMAGENTS_NATIVE=1``, where a failed build then fails the native tests instead of skipping them)
HAS_NATIVE = native.expected()
needs_native = pytest.mark.skipif(
    not HAS_NATIVE, reason="no C++ compiler ($CXX or c++), or MEMAGENTS_NATIVE=0"
)


def counting(fn: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    """``fn``, appending to ``calls`` at each call (to check that a code path ran)."""

    def wrapped(*args: Any) -> Any:
        calls.append(1)
        return fn(*args)

    return wrapped


def hypothesis_settings(max_examples: int = 30) -> settings:
    """Settings of this suite's property tests: no deadline (first calls pay torch's warm-up),
    a modest number of examples, and derandomized so that CI sees the same examples every run.
    Applied per test, not as a global profile, so other test files keep their own settings."""
    return settings(
        deadline=None,
        max_examples=max_examples,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


#: Input width of every contract test.
INPUT_SIZE = 3

#: Hyperparameters of the tiny cores; each core takes the ones its constructor accepts.
TINY_KWARGS: dict[str, Any] = {
    "hidden_size": 8,
    "memory_size": 6,
    "word_size": 4,
    "num_reads": 2,
    "num_writes": 2,
    "num_heads": 2,
    "max_shift": 1,
    "sparse_reads": 2,
    "temporal_reads": 2,
}


def tiny_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The tiny hyperparameters core ``name`` accepts, with ``overrides`` on top."""
    allowed = set(cores.core_kwargs(name))
    kwargs = {k: v for k, v in TINY_KWARGS.items() if k in allowed}
    kwargs.update(overrides)
    return kwargs


def build_core(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> cores.MemoryCore:
    """A tiny core with deterministic random parameters, in eval mode (no dropout anywhere)."""
    torch.manual_seed(seed)
    core = cores.make(name, input_size=INPUT_SIZE, **tiny_kwargs(name, **overrides))
    return core.to(dtype).eval()


#: Names of the parameters that hold a learned initial state (Collier & Beel 2018).
INIT_PARAMS = ("h0", "c0", "read0", "read_logits0", "write_logits0")


def randomize_initial_state(core: cores.MemoryCore, seed: int = 1) -> None:
    """Give every learned-initial-state parameter a nonzero random value.

    Learned initial states start at zero (or at fixed logits), which would let a reset that
    restores zeros instead of the learned values pass unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in core.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in INIT_PARAMS:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype))


def random_state(core: cores.MemoryCore, batch_size: int, seed: int = 2) -> Any:
    """A state with the core's structure, far from the initial state (the state of a run)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, batch_size, core.input_size, generator=gen, dtype=core_dtype(core))
    with torch.no_grad():
        _, state = core(x, core.initial_state(batch_size))
    return state


def core_dtype(core: cores.MemoryCore) -> torch.dtype:
    for p in core.parameters():
        return p.dtype
    return torch.get_default_dtype()


def assert_states_equal(a: Any, b: Any, exact: bool = True, **tol: float) -> None:
    """Every leaf of two states is equal (bitwise when ``exact``, else to ``tol``: ``PATH_TOL``
    for two computations that are not the same kernels on the same shapes and layouts), same
    structure and shapes."""
    names_a = [n for n, _ in state_lib.named_leaves(a)]
    names_b = [n for n, _ in state_lib.named_leaves(b)]
    assert names_a == names_b
    for (name, ta), tb in zip(state_lib.named_leaves(a), state_lib.leaves(b), strict=True):
        assert ta.shape == tb.shape, name
        if exact:
            assert torch.equal(ta, tb), f"state field {name} differs"
        else:
            torch.testing.assert_close(ta, tb, msg=lambda m, n=name: f"{n}: {m}", **tol)


def dense_copy(state: Any) -> Any:
    """``state`` with every leaf a fresh contiguous tensor (the layout a reset's ``torch.where``
    gives): a run from it takes the same kernels as a run from a reset state, whereas a broadcast
    initial state (stride 0) or a view may take another (MKL's batched matmul rounds a stride-0
    batch differently on some shapes)."""
    return state_lib.map_state(lambda t: t.clone(memory_format=torch.contiguous_format), state)


#: The smallest gap between the ``K``-th and ``(K+1)``-th best similarity under which two top-``K``
#: searches that compute cosines with other float32 kernels (C++, torch, FAISS) may pick other
#: rows: twice the rounding of a cosine of width-``W`` vectors, ``2 (W + 4) 2^-24`` (2.4e-6 at
#: ``W = 16``, the widest in these tests).
RANK_MARGIN = 4e-6


def top_k_margin(scores: Tensor, k: int, exact: Tensor | None = None) -> float:
    """The smallest gap between the ``k``-th and ``(k+1)``-th largest ``scores`` along the last
    axis (over all leading axes; ``inf`` when ``k`` takes every entry).

    :param scores: ``[..., N]``, best computed in float64.
    :param exact: ``[..., N]`` bool, where a score is exact on every path (a zero row's 0):
        two exact scores that tie are broken alike (lowest index first), so their gap is ``inf``.
    """
    if k >= scores.shape[-1]:
        return math.inf
    values, order = scores.sort(dim=-1, descending=True, stable=True)
    gap = values[..., k - 1] - values[..., k]
    if exact is not None:
        both = exact.gather(-1, order)[..., k - 1 : k + 1].all(-1)
        gap = gap.masked_fill(both & (gap == 0), math.inf)
    return gap.min().item()


def cosine_top_k_margin(memory: Tensor, keys: Tensor, k: int) -> float:
    """:func:`top_k_margin` of the cosine similarities the kNN indexes rank by (norms with
    ``EPSILON``, zero rows scoring exactly 0), in float64: indices that two searches of these
    ``memory [B, N, W]`` and ``keys [B, R, W]`` find agree on any CPU when it exceeds
    :data:`RANK_MARGIN`."""
    m, q = memory.detach().double(), keys.detach().double()
    square_norm = m.square().sum(-1)  # [B, N]
    zero = (square_norm == 0)[:, None].expand(-1, q.shape[1], -1)  # [B, R, N]
    norms = (
        torch.sqrt(q.square().sum(-1) + EPSILON)[..., None]
        * torch.sqrt(square_norm + EPSILON)[:, None]
    )
    scores = (q @ m.transpose(1, 2) / norms).masked_fill(zero, 0.0)
    return top_k_margin(scores, k, exact=zero)


#: One test id per registered core, plus variants that exercise other code paths.
CORE_CASES: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in cores.available()] + [
    ("lstm", {"num_layers": 2, "learn_init": True}),
    ("gru", {"num_layers": 2, "learn_init": True}),
    ("dnc", {"num_writes": 1, "num_reads": 1}),
    ("dnc", {"fused": False}),  # the reference path built from the addressing functions
    ("ntm", {"num_heads": 1, "max_shift": 2}),
    ("ntm", {"fused": False}),  # the reference path built from the addressing functions
    ("sam", {"fused": False}),  # the dense reference of the sparse access step
    ("sam", {"index": "faiss"}),
    ("sdnc", {"fused": False}),  # the dense reference of the memory step
    ("sdnc", {"index": "faiss"}),
]


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, extra = case
    return name + "".join(f"-{k}={v}" for k, v in extra.items())


@pytest.fixture(params=CORE_CASES, ids=case_id)
def core_case(request) -> tuple[str, dict[str, Any]]:
    """``(name, extra_kwargs)`` of every registered core and variant."""
    return request.param


@pytest.fixture
def tiny_core(core_case) -> Callable[..., cores.MemoryCore]:
    """Factory of the parametrised core: ``tiny_core(seed=0, dtype=torch.float32)``."""
    name, extra = core_case

    def factory(seed: int = 0, dtype: torch.dtype = torch.float32) -> cores.MemoryCore:
        core = build_core(name, seed=seed, dtype=dtype, **extra)
        randomize_initial_state(core, seed=seed + 100)
        return core

    return factory
