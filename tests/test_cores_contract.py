"""The memory-core contract, checked for every registered core (``memagents.cores.available()``).

Each test states one promise of ``MemoryCore`` (``shared/DESIGN.md`` section 2, issue 2) and checks
it against an independent computation: the same episode run alone, the same sequence run one step
at a time, the same batch with one element changed, a numerical gradient. Cores are tiny (see
``conftest.TINY_KWARGS``) and their learned initial states are set to random nonzero values, so
that a reset which restores zeros instead of the learned state cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    CORE_CASES,
    INIT_PARAMS,
    INPUT_SIZE,
    PATH_TOL,
    assert_states_equal,
    build_core,
    case_id,
    core_dtype,
    dense_copy,
    random_state,
    randomize_initial_state,
    tiny_kwargs,
)

import memagents.cores as cores
from memagents.cores import state as state_lib

B = 3  # batch size of the contract tests


def _inputs(core, T: int, batch: int = B, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, batch, core.input_size, generator=gen, dtype=core_dtype(core))


def _no_starts(T: int, batch: int = B) -> torch.Tensor:
    return torch.zeros(T, batch)


# -- shapes and state layout -----------------------------------------------------------------


def test_every_registered_core_is_covered():
    """The registry holds the five cores of issue 2, and each has a contract-test case."""
    assert {"mlp", "lstm", "gru", "ntm", "dnc"} <= set(cores.available())
    assert cores.available() == sorted(cores.available())
    assert {name for name, _ in CORE_CASES} == set(cores.available())


def test_output_and_state_shapes(tiny_core):
    core = tiny_core()
    T = 4
    x = _inputs(core, T)
    y, state = core(x, core.initial_state(B), _no_starts(T))
    assert core.input_size == INPUT_SIZE
    assert y.shape == (T, B, core.output_size)
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()
    shapes = core.state_shapes()
    for s in (core.initial_state(B), state):
        named = dict(state_lib.named_leaves(s))
        assert list(named) == list(shapes)
        for name, leaf in named.items():
            assert tuple(leaf.shape) == (B, *shapes[name]), name
            assert leaf.dtype == x.dtype, name


def test_state_none_means_initial_state_and_no_starts_means_no_reset(tiny_core):
    """Bitwise: both calls build the same initial state and run the same kernels on it."""
    core = tiny_core()
    x = _inputs(core, 3)
    y_explicit, s_explicit = core(x, core.initial_state(B), _no_starts(3))
    y_default, s_default = core(x)
    assert torch.equal(y_default, y_explicit)
    assert_states_equal(s_default, s_explicit)


def test_state_size_matches_packed_width_and_state_shapes(tiny_core):
    core = tiny_core()
    expected = sum(math.prod(shape) for shape in core.state_shapes().values())
    assert core.state_size == expected
    assert core.pack_state(core.initial_state(B)).shape == (B, expected)


@pytest.mark.parametrize(
    ("name", "extra"),
    [("dnc", {}), ("dnc", {"num_writes": 1, "num_reads": 3})],
    ids=["dnc-R2-H2", "dnc-R3-H1"],
)
def test_dnc_state_fields_are_named_as_in_the_paper(name, extra):
    core = build_core(name, **extra)
    kw = tiny_kwargs(name, **extra)
    N, W, R, H = kw["memory_size"], kw["word_size"], kw["num_reads"], kw["num_writes"]
    shapes = core.state_shapes()
    assert shapes["access.memory"] == (N, W)
    assert shapes["access.usage"] == (N,)
    assert shapes["access.link"] == (H, N, N)
    assert shapes["access.precedence"] == (H, N)
    assert shapes["access.read_weights"] == (R, N)
    assert shapes["access.write_weights"] == (H, N)
    state = core.initial_state(2)
    # the paper's names are also readable on the top-level state (the same tensors)
    for field in ("memory", "usage", "link", "precedence", "read_weights", "write_weights"):
        assert getattr(state, field) is getattr(state.access, field)
    # memory starts at a small constant, not random; usage, link, precedence and weights at 0
    assert torch.equal(state.memory, torch.full((2, N, W), 1e-6))
    for field in ("usage", "link", "precedence", "read_weights", "write_weights"):
        assert not getattr(state, field).any(), field


def test_ntm_state_fields_are_named_as_in_the_paper():
    core = build_core("ntm")
    kw = tiny_kwargs("ntm")
    N, W, H = kw["memory_size"], kw["word_size"], kw["num_heads"]
    shapes = core.state_shapes()
    assert shapes["memory"] == (N, W)
    assert shapes["read_weights"] == (H, N)
    assert shapes["write_weights"] == (H, N)
    state = core.initial_state(2)
    assert torch.equal(state.memory, torch.full((2, N, W), 1e-6))
    # initial weightings are distributions over N
    for w in (state.read_weights, state.write_weights):
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, H))


# -- the reset rule --------------------------------------------------------------------------


def test_back_to_back_episodes_equal_each_episode_alone(tiny_core):
    """Two episodes joined with a start flag give each episode's outputs from initial_state,
    even when the sequence begins from an unrelated state (reset at t=0).

    Up to ``PATH_TOL``: the joined run's library calls (``nn.LSTM`` over one stretch per
    episode) need not match the separate runs' in shape or layout."""
    core = tiny_core()
    T1, T2 = 4, 3
    x1, x2 = _inputs(core, T1, seed=1), _inputs(core, T2, seed=2)
    y1, _ = core(x1, core.initial_state(B), _no_starts(T1))
    y2, s2 = core(x2, core.initial_state(B), _no_starts(T2))

    starts = _no_starts(T1 + T2)
    starts[0] = 1.0
    starts[T1] = 1.0
    y, s = core(torch.cat([x1, x2]), random_state(core, B), starts)
    torch.testing.assert_close(y[:T1], y1, **PATH_TOL)
    torch.testing.assert_close(y[T1:], y2, **PATH_TOL)
    assert_states_equal(s, s2, exact=False, **PATH_TOL)


def test_reset_of_some_batch_elements_in_the_middle(tiny_core):
    """Elements 0 and 2 start a new episode at step T1; element 1 continues its episode.

    Up to ``PATH_TOL``: the reset splits ``lstm``/``gru``'s call into stretches of other shapes."""
    core = tiny_core()
    T1, T2 = 3, 4
    x1, x2 = _inputs(core, T1, seed=3), _inputs(core, T2, seed=4)
    x = torch.cat([x1, x2])
    s0 = random_state(core, B, seed=5)
    y_continuous, s_continuous = core(x, s0, _no_starts(T1 + T2))
    y_fresh, s_fresh = core(x2, core.initial_state(B), _no_starts(T2))

    starts = _no_starts(T1 + T2)
    starts[T1, [0, 2]] = 1.0
    y, s = core(x, s0, starts)
    torch.testing.assert_close(y[:, 1], y_continuous[:, 1], **PATH_TOL)
    torch.testing.assert_close(y[:T1], y_continuous[:T1], **PATH_TOL)
    torch.testing.assert_close(y[T1:, [0, 2]], y_fresh[:, [0, 2]], **PATH_TOL)
    for (name, leaf), cont, fresh in zip(
        state_lib.named_leaves(s),
        state_lib.leaves(s_continuous),
        state_lib.leaves(s_fresh),
        strict=True,
    ):
        torch.testing.assert_close(leaf[1], cont[1], msg=name, **PATH_TOL)
        torch.testing.assert_close(leaf[[0, 2]], fresh[[0, 2]], msg=name, **PATH_TOL)


def test_resets_at_different_steps_per_element(tiny_core):
    """Each element resets at its own step (the vectorised-env case); compare each element to
    the run of its last episode alone, with the same batch size (up to ``PATH_TOL``: the runs
    differ in length and in where ``lstm``/``gru`` split their calls)."""
    core = tiny_core()
    T = 6
    x = _inputs(core, T, seed=6)
    reset_at = [1, 4, 2]
    starts = _no_starts(T)
    for b, t in enumerate(reset_at):
        starts[t, b] = 1.0
    y, _ = core(x, random_state(core, B, seed=7), starts)
    for b, t in enumerate(reset_at):
        y_alone, _ = core(x[t:], core.initial_state(B), _no_starts(T - t))
        torch.testing.assert_close(y[t:, b], y_alone[:, b], **PATH_TOL)


def test_reset_restores_the_learned_initial_state_exactly(tiny_core):
    """One step from any state with a start flag is bitwise the step from initial_state.

    Bitwise because both runs are the same kernels on the same values, shapes and layouts: the
    reset state is ``torch.where``'s fresh contiguous output, so the fresh run starts from a dense
    copy of ``initial_state`` (its broadcast leaves could take another matmul kernel), and the
    state the reset replaces is dense too (``lstm``'s returned state is a transposed view)."""
    core = tiny_core()
    x = _inputs(core, 1, seed=8)
    y_fresh, s_fresh = core(x, dense_copy(core.initial_state(B)), _no_starts(1))
    y_reset, s_reset = core(x, dense_copy(random_state(core, B, seed=9)), torch.ones(1, B))
    assert torch.equal(y_reset, y_fresh)
    assert_states_equal(s_reset, s_fresh)


def test_initial_state_carries_the_learned_parameters(core_case):
    """The learned h0 (and c0, read0) appear in initial_state, expanded over the batch (bitwise:
    copies, no arithmetic)."""
    name, extra = core_case
    core = build_core(name, **extra)
    randomize_initial_state(core, seed=3)
    state = core.initial_state(B)
    controller = getattr(state, "controller", state)
    for field in ("h0", "c0"):
        param = getattr(core, field, None)
        if param is None:
            continue
        leaf = getattr(controller, field[0])
        assert torch.equal(leaf, param.expand(B, *param.shape[1:]).to(leaf.dtype))
    read0 = getattr(core, "read0", None)
    if read0 is not None:
        assert torch.equal(state.read_vectors, read0.expand(B, *read0.shape[1:]))


def test_learned_initial_state_receives_gradient_through_a_reset(core_case):
    """Collier & Beel's learned initial state must be trained by episodes that start mid-batch."""
    name, extra = core_case
    core = build_core(name, **extra)
    learned = [
        p
        for n, p in core.named_parameters()
        if n.rsplit(".", 1)[-1] in INIT_PARAMS and p.requires_grad
    ]
    if not learned:
        pytest.skip(f"{case_id(core_case)} has no learned initial state")
    randomize_initial_state(core)
    T = 3
    x = _inputs(core, T, seed=10)
    starts = _no_starts(T)
    starts[2, 1] = 1.0  # only element 1, only at the last step
    with torch.no_grad():
        s0 = random_state(core, B)
    y, _ = core(x, s0, starts)
    y[2, 1].square().sum().backward()
    for p in learned:
        assert p.grad is not None and p.grad.abs().sum() > 0


# -- stepping equals unrolling -----------------------------------------------------------------


def test_one_step_calls_equal_one_unrolled_call(tiny_core):
    core = tiny_core()
    T = 6
    x = _inputs(core, T, seed=11)
    starts = _no_starts(T)
    starts[3, 0] = 1.0
    starts[4, [1, 2]] = 1.0
    s0 = random_state(core, B, seed=12)
    y_full, s_full = core(x, s0, starts)

    state, ys = s0, []
    for t in range(T):
        y_t, state = core(x[t : t + 1], state, starts[t : t + 1])
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys), y_full, **PATH_TOL)
    assert_states_equal(state, s_full, exact=False, **PATH_TOL)


def test_core_step_equals_one_unrolled_call(tiny_core):
    """``core.step`` over time, with resets applied by ``state.reset_where``, equals forward."""
    core = tiny_core()
    T = 5
    x = _inputs(core, T, seed=13)
    starts = _no_starts(T)
    starts[2, 1] = 1.0
    s0 = random_state(core, B, seed=14)
    y_full, s_full = core(x, s0, starts)

    state, ys = s0, []
    initial = core.initial_state(B)
    for t in range(T):
        state = state_lib.reset_where(state, initial, starts[t].bool())
        y_t, state = core.step(x[t], state)
        assert y_t.shape == (B, core.output_size)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys), y_full, **PATH_TOL)
    assert_states_equal(state, s_full, exact=False, **PATH_TOL)


def test_splitting_a_sequence_carries_the_state(tiny_core):
    """Running [0, t) then [t, T) from the returned state equals one call over [0, T)."""
    core = tiny_core()
    T = 6
    x = _inputs(core, T, seed=15)
    y_full, s_full = core(x, core.initial_state(B), _no_starts(T))
    y_a, s_a = core(x[:2], core.initial_state(B), _no_starts(2))
    y_b, s_b = core(x[2:], s_a, _no_starts(T - 2))
    torch.testing.assert_close(torch.cat([y_a, y_b]), y_full, **PATH_TOL)
    assert_states_equal(s_b, s_full, exact=False, **PATH_TOL)


# -- batch independence ------------------------------------------------------------------------


def test_batch_elements_do_not_leak_into_each_other(tiny_core):
    """Changing element 0's inputs (and its resets) leaves the other elements unchanged.

    Up to rounding, not bitwise: element 0's extra reset splits ``lstm``/``gru``'s library call
    into stretches of other shapes, and BLAS/oneDNN choose kernels (and summation orders) by
    shape and CPU, so the other elements' float32 results may differ in the last bits (seen on an
    AVX-512 CPU). A leak would be of the size of element 0's change (inputs moved by 10 randn),
    far above ``PATH_TOL``."""
    core = tiny_core()
    T = 5
    x = _inputs(core, T, seed=16)
    starts = _no_starts(T)
    starts[2, 2] = 1.0
    s0 = random_state(core, B, seed=17)
    y, s = core(x, s0, starts)

    x_perturbed = x.clone()
    x_perturbed[:, 0] += 10.0 * torch.randn(T, core.input_size, dtype=x.dtype)
    starts_perturbed = starts.clone()
    starts_perturbed[3, 0] = 1.0
    y_p, s_p = core(x_perturbed, s0, starts_perturbed)
    assert (y_p[:, 0] - y[:, 0]).abs().max() > 1e-2
    torch.testing.assert_close(y_p[:, 1:], y[:, 1:], **PATH_TOL)
    for (name, a), b in zip(state_lib.named_leaves(s), state_lib.leaves(s_p), strict=True):
        torch.testing.assert_close(a[1:], b[1:], msg=lambda m, n=name: f"{n}: {m}", **PATH_TOL)


def test_gradient_does_not_cross_batch_elements(tiny_core):
    """d y[:, 1:] / d x[:, 0] is exactly zero; d y[:, 0] / d x[:, 0] is not.

    Exactly, on any CPU: without a leak the gradient reaching x[:, 0] is built from products with
    zeros and sums of zeros, which are zero in any kernel and any summation order."""
    core = tiny_core()
    T = 4
    x = _inputs(core, T, seed=18).requires_grad_(True)
    starts = _no_starts(T)
    starts[1, 0] = 1.0
    y, _ = core(x, random_state(core, B, seed=19), starts)
    weights = torch.randn(y.shape, dtype=y.dtype)
    (grad_others,) = torch.autograd.grad((y[:, 1:] * weights[:, 1:]).sum(), x, retain_graph=True)
    assert torch.equal(grad_others[:, 0], torch.zeros_like(grad_others[:, 0]))
    assert grad_others[:, 1:].abs().sum() > 0
    (grad_own,) = torch.autograd.grad((y[:, 0] * weights[:, 0]).sum(), x)
    assert grad_own[:, 0].abs().sum() > 0
    assert torch.equal(grad_own[:, 1:], torch.zeros_like(grad_own[:, 1:]))


# -- pack / unpack -----------------------------------------------------------------------------


def test_pack_unpack_round_trip_is_exact(tiny_core):
    """Bitwise: packing and unpacking only copy and reshape."""
    core = tiny_core()
    x = _inputs(core, 4, seed=20)
    _, after = core(x, core.initial_state(B), _no_starts(4))
    for state in (core.initial_state(B), after):
        flat = core.pack_state(state)
        assert flat.shape == (B, core.state_size)
        assert flat.dtype == x.dtype
        back = core.unpack_state(flat)
        assert type(back) is type(state)
        assert_states_equal(back, state)
        assert torch.equal(core.pack_state(back), flat)


def test_unpack_pack_of_any_flat_tensor_is_exact(tiny_core):
    core = tiny_core()
    flat = torch.randn(B, core.state_size)
    assert torch.equal(core.pack_state(core.unpack_state(flat)), flat)
    with pytest.raises(ValueError, match=str(core.state_size)):
        core.unpack_state(torch.zeros(B, core.state_size + 1))


def test_unpacked_state_continues_the_run(tiny_core):
    """A state that went through pack/unpack (as in SB3's buffers) gives the same future.

    The values are the same bits (pack/unpack is exact, tested above), but the unpacked leaves
    are views with other strides, and a library matmul may take another kernel for them, so the
    comparison allows float32 rounding (``PATH_TOL``); it failed bitwise for the torch paths of
    dnc, sam and sdnc on an AVX-512 CPU."""
    core = tiny_core()
    x = _inputs(core, 5, seed=21)
    _, mid = core(x[:2], core.initial_state(B), _no_starts(2))
    y_direct, s_direct = core(x[2:], mid, _no_starts(3))
    y_packed, s_packed = core(x[2:], core.unpack_state(core.pack_state(mid).clone()), _no_starts(3))
    torch.testing.assert_close(y_packed, y_direct, **PATH_TOL)
    assert_states_equal(s_packed, s_direct, exact=False, **PATH_TOL)


# -- debug tensors -----------------------------------------------------------------------------

#: Debug tensors each core must return (DESIGN.md: memory, read/write weights, usage, links).
REQUIRED_DEBUG = {
    "dnc": {"memory", "usage", "link", "precedence", "read_weights", "write_weights"},
    "ntm": {"memory", "read_weights", "write_weights"},
}


def _state_leaf_for(state, key: str):
    """The state leaf whose dotted name ends with ``key`` (e.g. ``access.memory``), if any."""
    for name, leaf in state_lib.named_leaves(state):
        if name == key or name.endswith("." + key):
            return leaf
    return None


def test_return_debug_gives_per_step_tensors_consistent_with_the_state(core_case):
    name, extra = core_case
    core = build_core(name, **extra)
    randomize_initial_state(core)
    T = 4
    x = _inputs(core, T, seed=22)
    starts = _no_starts(T)
    starts[2, 0] = 1.0
    s0 = random_state(core, B, seed=23)
    y, s = core(x, s0, starts)
    y_d, s_d, debug = core(x, s0, starts, return_debug=True)
    # the debug path may be another path (step by step instead of one sequence call)
    torch.testing.assert_close(y_d, y, **PATH_TOL)
    assert_states_equal(s_d, s, exact=False, **PATH_TOL)
    assert REQUIRED_DEBUG.get(name, set()) <= set(debug)

    for key, value in debug.items():
        assert value.shape[:2] == (T, B), key
        assert torch.isfinite(value).all(), key
        leaf = _state_leaf_for(s_d, key)
        if leaf is None or leaf.shape != value.shape[1:]:
            continue
        # the last step's debug tensor is the final state's field (the same values, bitwise) ...
        assert torch.equal(value[-1], leaf), key
        # ... and the debug tensor of step t is that field after running steps 0..t
        for t in range(T - 1):
            _, s_t = core(x[: t + 1], s0, starts[: t + 1])
            torch.testing.assert_close(value[t], _state_leaf_for(s_t, key), msg=key, **PATH_TOL)
    if name in ("lstm", "gru"):
        torch.testing.assert_close(debug["h"][-1], s.h[:, -1], **PATH_TOL)


# -- construction errors and input validation --------------------------------------------------


def test_make_rejects_an_unknown_core_naming_it_and_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        cores.make("transformer-xl", input_size=3)
    message = str(info.value)
    assert "transformer-xl" in message
    for name in cores.available():
        assert name in message


@pytest.mark.parametrize("name", cores.available())
def test_make_rejects_an_unknown_kwarg_naming_it_and_the_allowed_ones(name):
    with pytest.raises(ValueError) as info:
        cores.make(name, input_size=3, memory_sise=8)
    message = str(info.value)
    assert "memory_sise" in message
    for kwarg in cores.core_kwargs(name):
        assert kwarg in message


def test_core_kwargs_lists_the_common_hyperparameters():
    assert {"hidden_size", "memory_size", "word_size", "num_reads", "num_writes"} <= set(
        cores.core_kwargs("dnc")
    )
    assert {"hidden_size", "memory_size", "word_size", "num_heads", "max_shift"} <= set(
        cores.core_kwargs("ntm")
    )
    for name in ("lstm", "gru", "mlp"):
        assert "hidden_size" in cores.core_kwargs(name)
        assert "input_size" not in cores.core_kwargs(name)


BAD_VALUES = [
    ("dnc", {"memory_size": 0}, "memory_size", "0"),
    ("dnc", {"memory_size": -3}, "memory_size", "-3"),
    ("dnc", {"memory_size": 2.5}, "memory_size", "2.5"),
    ("dnc", {"memory_size": True}, "memory_size", "True"),
    ("dnc", {"word_size": 0}, "word_size", "0"),
    ("dnc", {"num_reads": 0}, "num_reads", "0"),
    ("dnc", {"num_writes": 0}, "num_writes", "0"),
    ("dnc", {"hidden_size": 0}, "hidden_size", "0"),
    ("ntm", {"memory_size": 0}, "memory_size", "0"),
    ("ntm", {"word_size": 4.0}, "word_size", "4.0"),
    ("ntm", {"num_heads": 0}, "num_heads", "0"),
    ("ntm", {"max_shift": -1}, "max_shift", "-1"),
    ("ntm", {"memory_size": 6, "max_shift": 3}, "max_shift", "3"),
    ("ntm", {"hidden_size": 0}, "hidden_size", "0"),
    ("lstm", {"hidden_size": 0}, "hidden_size", "0"),
    ("lstm", {"num_layers": 0}, "num_layers", "0"),
    ("gru", {"hidden_size": -1}, "hidden_size", "-1"),
    ("gru", {"num_layers": 0}, "num_layers", "0"),
    ("mlp", {"hidden_size": 0}, "hidden_size", "0"),
    ("mlp", {"num_layers": 0}, "num_layers", "0"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "field", "value"),
    BAD_VALUES,
    ids=[f"{n}-{f}={v}" for n, _, f, v in BAD_VALUES],
)
def test_make_rejects_bad_values_naming_them(name, kwargs, field, value):
    with pytest.raises(ValueError) as info:
        cores.make(name, input_size=3, **kwargs)
    message = str(info.value)
    assert field in message
    assert value in message


@pytest.mark.parametrize("name", cores.available())
@pytest.mark.parametrize("input_size", [0, -2])
def test_make_rejects_a_bad_input_size(name, input_size):
    with pytest.raises(ValueError, match=rf"input_size.*{input_size}"):
        cores.make(name, input_size=input_size)


def test_ntm_accepts_the_largest_shift_the_memory_allows():
    core = cores.make("ntm", input_size=3, memory_size=5, max_shift=2, hidden_size=4, word_size=2)
    y, _ = core(torch.randn(2, 1, 3))
    assert y.shape == (2, 1, core.output_size)


def test_bad_input_shapes_raise_value_error(tiny_core):
    core = tiny_core()
    T = 3
    good_x = _inputs(core, T)
    state = core.initial_state(B)
    bad_xs = [
        good_x[0],  # [B, I]: time axis missing
        good_x.unsqueeze(0),  # 4-D
        torch.randn(T, B, core.input_size + 1),  # wrong feature size
    ]
    for x in bad_xs:
        with pytest.raises(ValueError, match="x must have shape"):
            core(x, state, _no_starts(T))
    bad_starts = [
        torch.zeros(T),
        torch.zeros(B, T + 1),
        torch.zeros(T, B, 1),
        torch.zeros(T + 1, B),
    ]
    for starts in bad_starts:
        with pytest.raises(ValueError, match="episode_starts"):
            core(good_x, state, starts)


# -- numerical gradient checks (float64) -------------------------------------------------------


def _gradcheck_core(core, T: int, batch: int, starts: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, batch, core.input_size, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)

    def run(x_in):
        y, _ = core(x_in, core.initial_state(batch), starts)
        return y

    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_ntm_wrt_input():
    core = build_core(
        "ntm",
        dtype=torch.float64,
        hidden_size=4,
        memory_size=5,
        word_size=3,
        num_heads=2,
        max_shift=1,
    )
    randomize_initial_state(core)
    starts = _no_starts(4, 2)
    starts[2, 1] = 1.0
    _gradcheck_core(core, T=4, batch=2, starts=starts)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_gradcheck_dnc_wrt_input_through_steps_and_a_reset(fused):
    # usage_gradient=True: the exact derivative (by default the usage passes no gradient to the
    # previous write weights, as DeepMind's DNC; tests/test_dnc_deepmind.py checks that)
    core = build_core(
        "dnc",
        dtype=torch.float64,
        fused=fused,
        usage_gradient=True,
        hidden_size=4,
        memory_size=4,
        word_size=3,
        num_reads=2,
        num_writes=2,
    )
    randomize_initial_state(core)
    # After a reset all usages are 0 (a tie) and the next step's usages differ by powers of
    # eps = 1e-6; with N = 4 the smallest gap (~1e-12) is still far above float64 rounding, so
    # the 1e-6 perturbations of gradcheck cannot reorder the (discontinuous) allocation sort.
    starts = _no_starts(5, 2)
    starts[3, 1] = 1.0
    _gradcheck_core(core, T=5, batch=2, starts=starts)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_gradcheck_dnc_wrt_the_starting_state(fused):
    """Gradients to a starting memory, usage, controller state and read vectors (float64), with
    ``usage_gradient=True`` (the exact derivative; see the test above)."""
    core = build_core(
        "dnc",
        dtype=torch.float64,
        fused=fused,
        usage_gradient=True,
        hidden_size=3,
        memory_size=4,
        word_size=2,
        num_reads=2,
        num_writes=1,
    )
    batch, T = 2, 3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, batch, core.input_size, generator=gen, dtype=torch.float64)
    s0 = core.initial_state(batch)
    memory = torch.randn(batch, 4, 2, generator=gen, dtype=torch.float64)
    # distinct usages, far apart, so that a 1e-6 perturbation cannot reorder the allocation sort
    usage = torch.tensor([[0.2, 0.6, 0.4, 0.8], [0.7, 0.1, 0.5, 0.3]], dtype=torch.float64)
    h = torch.randn(batch, 1, 3, generator=gen, dtype=torch.float64)
    reads = torch.randn(batch, 2, 2, generator=gen, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (memory, usage, h, reads))

    def run(memory_, usage_, h_, reads_):
        state = s0._replace(
            controller=s0.controller._replace(h=h_),
            access=s0.access._replace(memory=memory_, usage=usage_),
            read_vectors=reads_,
        )
        y, _ = core(x, state, _no_starts(T, batch))
        return y

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
