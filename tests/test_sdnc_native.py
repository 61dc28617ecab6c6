"""The SDNC's native temporal step (``csrc/sparse_links.cpp``) against the torch reference.

:func:`memagents.cores.sparse_links.temporal_step` runs the link update, the precedence update
and the two link reads either as one native kernel call (forward and backward) or as the torch
functions ``SparseLinkStep``, ``sparse_precedence_update`` and ``directional_read`` (the
reference, tested against the dense DNC in ``test_sdnc.py``). Both must agree in float64 to
~1e-12 in values, selected indices and gradients: on link states that truncate, with duplicate
write rows, zero weights, repeated read rows, elements that reset, and through whole sequences of
the core.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import counting, needs_native
from test_sdnc import _core, _random_memory_state, _x

from memagents.cores import native, sdnc, sparse_access, sparse_links
from memagents.cores import state as state_lib

F64 = torch.float64
TOL = {"atol": 1e-12, "rtol": 1e-10}

needs_kernel = needs_native


@pytest.fixture
def torch_path(monkeypatch):
    """Run the torch reference inside the block: ``torch_path(fn)`` calls ``fn`` without the
    kernel."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(sparse_links, "native_kernel", lambda: None)
            return fn()

    return run


def test_kernel_loads_when_a_compiler_exists():
    if not native.expected():
        pytest.skip("no C++ compiler ($CXX or c++), or MEMAGENTS_NATIVE=0")
    assert sparse_links.native_kernel() is not None


# -- one step ----------------------------------------------------------------------------------------


def _random_links(B, N, L, J, R, S, steps, seed, dtype=F64):
    """Link state after ``steps`` reference steps of random writes (rows truncate when ``L`` is
    small)."""
    gen = torch.Generator().manual_seed(seed)
    link = torch.zeros(B, N, L, dtype=dtype)
    link_idx = sparse_links.initial_link_indices(B, N, L).contiguous()
    state = [link, link.clone(), link_idx, link_idx.clone()]
    prec = torch.zeros(B, L, dtype=dtype)
    prec_idx = sparse_links.initial_precedence_indices(B, L).contiguous()
    for _ in range(steps):
        w, w_idx, rw, rw_idx = _random_step_inputs(B, N, J, R, S, gen, dtype)
        out = sparse_links.temporal_step(
            state[0], state[1], w, prec, rw, state[2], state[3], w_idx, prec_idx, rw_idx,
            torch.zeros(0, dtype=torch.long), False, 2,
        )  # fmt: skip
        state[0], state[1] = out[0], out[1]
        prec, prec_idx = out[2], out[3]
    return [*state, prec, prec_idx]


def _random_step_inputs(B, N, J, R, S, gen, dtype=F64):
    w = torch.rand(B, J, generator=gen, dtype=dtype)
    w = 0.95 * w / w.sum(-1, keepdim=True)
    w[:, 0] = 0.0  # a zero weight
    w_idx = torch.randint(0, N, (B, J), generator=gen)
    w_idx[:, 2] = w_idx[:, 1]  # a duplicate write row
    rw = torch.rand(B, R, S, generator=gen, dtype=dtype) / S
    rw_idx = torch.randint(0, N, (B, R, S), generator=gen)
    rw_idx[:, :, 1] = rw_idx[:, :, 0]  # a repeated read row
    return w, w_idx, rw, rw_idx


def _step_outputs_and_grads(state, inputs, reset, k, owns_grad):
    """Values (including the in-place link tensors and indices) and gradients of a random
    linear function of every float output, w.r.t. the links, w^W, p and w^R."""
    link, link_t, link_idx, link_t_idx, prec, prec_idx = (t.clone() for t in state)
    w, w_idx, rw, rw_idx = inputs
    leaves = [t.clone().requires_grad_(True) for t in (link, link_t, w, prec, rw)]
    out = sparse_links.temporal_step(
        leaves[0].clone(), leaves[1].clone(), leaves[2], leaves[3], leaves[4], link_idx,
        link_t_idx, w_idx, prec_idx, rw_idx, reset, owns_grad, k,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(123)
    loss = sum(
        (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        for o in out
        if o.is_floating_point()
    )
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in out] + [link_idx, link_t_idx], list(grads)


@needs_kernel
@pytest.mark.parametrize(
    ("N", "L", "J", "R", "S", "k", "reset"),
    [
        (10, 3, 7, 2, 6, 2, [1]),  # truncating rows, one element resets
        (12, 1, 5, 1, 3, 1, []),  # K_L = 1
        (6, 5, 4, 2, 3, 4, [0, 2]),  # K_L = N - 1: the exact dense link
        (9, 2, 9, 3, 6, 4, []),  # K > K_L: reads merge many rows
        (40, 4, 25, 2, 12, 4, [2]),  # the core's J = 3RK + 1 shape
    ],
)
@pytest.mark.parametrize("owns_grad", [True, False])
def test_native_step_equals_the_torch_reference(torch_path, N, L, J, R, S, k, reset, owns_grad):
    B = 3
    for seed in range(3):
        state = torch_path(lambda: _random_links(B, N, L, J, R, S, steps=5, seed=seed))  # noqa: B023
        gen = torch.Generator().manual_seed(100 + seed)
        inputs = _random_step_inputs(B, N, J, R, S, gen)
        reset_t = torch.tensor(reset, dtype=torch.long)
        ref = torch_path(lambda: _step_outputs_and_grads(state, inputs, reset_t, k, owns_grad))  # noqa: B023
        nat = _step_outputs_and_grads(state, inputs, reset_t, k, owns_grad)
        for a, b in zip(nat[0], ref[0], strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, **TOL)
            else:  # selected rows: of values equal to ~1e-16, with random weights (no near-ties)
                assert torch.equal(a, b)
        for a, b in zip(nat[1], ref[1], strict=True):
            torch.testing.assert_close(a, b, **TOL)
        assert ref[0][0].abs().sum() > 0 and ref[1][2].abs().sum() > 0  # not vacuous


@needs_kernel
def test_native_step_in_float32_matches_the_reference(torch_path):
    B, N, L, J, R, S, k = 4, 20, 3, 13, 2, 6, 2
    state = torch_path(lambda: _random_links(B, N, L, J, R, S, 4, 7, torch.float32))
    inputs = _random_step_inputs(B, N, J, R, S, torch.Generator().manual_seed(8), torch.float32)
    reset = torch.tensor([3])
    ref = torch_path(lambda: _step_outputs_and_grads(state, inputs, reset, k, True))
    nat = _step_outputs_and_grads(state, inputs, reset, k, True)
    for a, b in zip(nat[0] + nat[1], ref[0] + ref[1], strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        else:
            # selected rows: the links are the same operations in the same order on both paths
            # (the kernel has no fused multiply-adds), the precedence may differ by rounding;
            # with random weights no two candidates are that close
            assert torch.equal(a, b)


@needs_kernel
def test_native_step_without_grad_gives_the_same_values(torch_path):
    B, N, L, J, R, S, k = 3, 10, 3, 7, 2, 6, 2
    state = torch_path(lambda: _random_links(B, N, L, J, R, S, 5, 1))
    inputs = _random_step_inputs(B, N, J, R, S, torch.Generator().manual_seed(2))
    reset = torch.tensor([0])
    with_grad, _ = _step_outputs_and_grads(state, inputs, reset, k, True)
    link, link_t, link_idx, link_t_idx, prec, prec_idx = (t.clone() for t in state)
    w, w_idx, rw, rw_idx = inputs
    with torch.no_grad():
        out = sparse_links.temporal_step(
            link, link_t, w, prec, rw, link_idx, link_t_idx, w_idx, prec_idx, rw_idx, reset,
            False, k,
        )  # fmt: skip
    for a, b in zip([*out, link_idx, link_t_idx], with_grad, strict=True):
        assert torch.equal(a, b)  # the same kernel's arithmetic: recording only saves more


@needs_kernel
def test_gradcheck_of_the_native_step():
    B, N, L, J, R, S, k = 2, 7, 2, 4, 2, 3, 2
    gen = torch.Generator().manual_seed(0)
    state = _random_links(B, N, L, J, R, S, steps=4, seed=3)
    # positive, distinct values: no ties a perturbation could reorder
    link = torch.rand(B, N, L, generator=gen, dtype=F64) * 0.3 + 0.05
    link_t = torch.rand(B, N, L, generator=gen, dtype=F64) * 0.3 + 0.05
    prec = torch.rand(B, L, generator=gen, dtype=F64) * 0.3 + 0.05
    w, w_idx, rw, rw_idx = _random_step_inputs(B, N, J, R, S, gen)
    w = w * 0.3 + 0.01 * torch.arange(1, J + 1, dtype=F64)  # no zero weight (a kink)
    reset = torch.tensor([1])

    def run(link, link_t, w, prec, rw):
        out = sparse_links.temporal_step(
            link.clone(), link_t.clone(), w, prec, rw, state[2].clone(), state[3].clone(), w_idx,
            state[5], rw_idx, reset, True, k,
        )  # fmt: skip
        return out[0], out[1], out[2], out[4]

    inputs = [t.clone().requires_grad_(True) for t in (link, link_t, w, prec, rw)]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# -- the interface and the links as one node ------------------------------------------------------


def _head_case(B=3, N=12, R=2, W=3, K=2, L=2, seed=0):
    """Inputs of :func:`sdnc.head_and_links` from a link state after a few steps."""
    S = 3 * K
    J = R * S + 1
    state = _random_links(B, N, L, J, R, S, steps=4, seed=seed)
    gen = torch.Generator().manual_seed(50 + seed)
    xi = torch.randn(B, R * W + W + R + 2 + 3 * R, generator=gen, dtype=F64)
    xi[0, R * W + W] = 25.0  # β̂ above softplus's threshold
    prev_w = torch.rand(B, R, S, generator=gen, dtype=F64) / S
    prev_idx = torch.randint(0, N, (B, R, S), generator=gen)
    lru = torch.randint(0, N, (B,), generator=gen)
    return state, xi, prev_w, prev_idx, lru, (R, W, K)


def _head_outputs_and_grads(case, reset, owns_grad):
    (link, link_t, link_idx, link_t_idx, prec, prec_idx), xi, prev_w, prev_idx, lru, sizes = case
    dtype = sparse_links.index_dtype(link)
    link_idx, link_t_idx = (t.to(dtype, copy=True) for t in (link_idx, link_t_idx))
    leaves = [t.clone().requires_grad_(True) for t in (xi, prev_w, link, link_t, prec)]
    out = sdnc.head_and_links(
        leaves[0], leaves[1], prev_idx, lru, leaves[2].clone(), leaves[3].clone(), leaves[4],
        link_idx, link_t_idx, prec_idx, reset, owns_grad, sizes,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    loss = sum(
        (o * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
        for o in out
        if o.is_floating_point()
    )
    values = [o.detach() if o.is_floating_point() else o.long() for o in out]
    return [*values, link_idx.long(), link_t_idx.long()], torch.autograd.grad(loss, leaves)


@needs_kernel
@pytest.mark.parametrize("reset", [[], [1]])
@pytest.mark.parametrize("owns_grad", [True, False])
def test_native_head_and_links_equal_the_torch_reference(torch_path, reset, owns_grad):
    for seed in range(2):
        case = _head_case(seed=seed)
        reset_t = torch.tensor(reset, dtype=torch.long)
        ref = torch_path(lambda: _head_outputs_and_grads(case, reset_t, owns_grad))  # noqa: B023
        nat = _head_outputs_and_grads(case, reset_t, owns_grad)
        for a, b in zip(nat[0], ref[0], strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, **TOL)
            else:  # selected rows: of values equal to ~1e-16, with random inputs (no near-ties)
                assert torch.equal(a, b)
        for a, b in zip(nat[1], ref[1], strict=True):
            torch.testing.assert_close(a, b, **TOL)


@needs_kernel
def test_gradcheck_of_the_native_head_and_links():
    state, xi, prev_w, prev_idx, lru, sizes = _head_case(B=2, N=7, R=1, W=2, K=2, L=2, seed=1)
    link_idx, link_t_idx = (t.to(F64) for t in state[2:4])
    gen = torch.Generator().manual_seed(3)
    link = torch.rand(state[0].shape, generator=gen, dtype=F64) * 0.3 + 0.05
    link_t = torch.rand(state[1].shape, generator=gen, dtype=F64) * 0.3 + 0.05
    prec = torch.rand(state[4].shape, generator=gen, dtype=F64) * 0.3 + 0.05
    prev_w = prev_w + 0.01  # no zero weight (a kink)

    def run(xi, prev_w, link, link_t, prec):
        out = sdnc.head_and_links(
            xi, prev_w, prev_idx, lru, link.clone(), link_t.clone(), prec, link_idx.clone(),
            link_t_idx.clone(), state[5], torch.tensor([0]), True, sizes,
        )  # fmt: skip
        return tuple(o for o in out if o.is_floating_point())

    inputs = [t.clone().requires_grad_(True) for t in (xi, prev_w, link, link_t, prec)]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# -- the read weighting ---------------------------------------------------------------------------------


def _mix_inputs(B=3, R=2, K=3, W=4, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    modes = torch.softmax(torch.randn(B, R, 3, generator=gen, dtype=dtype), -1)
    link_w = torch.rand(B, R, 2 * K, generator=gen, dtype=dtype) / K
    link_idx = torch.randint(0, 20, (B, R, 2 * K), generator=gen)
    content_w = torch.softmax(torch.randn(B, R, K, generator=gen, dtype=dtype), -1)
    content_idx = torch.randint(0, 20, (B, R, K), generator=gen).to(dtype)
    content_r = torch.randn(B, R, W, generator=gen, dtype=dtype)
    link_rows = torch.randn(B, R * 2 * K, W, generator=gen, dtype=dtype)
    return modes, link_w, link_idx, content_w, content_idx, content_r, link_rows


@needs_kernel
@pytest.mark.parametrize("used", ["both", "vectors", "weights"])
def test_native_read_mix_equals_the_torch_reference(torch_path, used):
    """Values, indices and gradients, also when only one output receives a gradient."""
    inputs = _mix_inputs()

    def run():
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        leaves[4].requires_grad_(False)  # row numbers
        rv, rw, ri = sdnc.read_mix(*leaves)
        gen = torch.Generator().manual_seed(1)
        loss = 0.0
        if used in ("both", "vectors"):
            loss = loss + (rv * torch.randn(rv.shape, generator=gen, dtype=F64)).sum()
        if used in ("both", "weights"):
            loss = loss + (rw * torch.randn(rw.shape, generator=gen, dtype=F64)).sum()
        diff = [leaves[i] for i in (0, 1, 3, 5, 6)]
        grads = torch.autograd.grad(loss, diff, allow_unused=True)
        return [rv.detach(), rw.detach(), ri], [
            torch.zeros_like(x) if g is None else g for x, g in zip(diff, grads, strict=True)
        ]

    ref, nat = torch_path(run), run()
    for a, b in zip(ref[0] + list(ref[1]), nat[0] + list(nat[1]), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, **TOL)
        else:  # selected rows: of values equal to ~1e-16, with random inputs (no near-ties)
            assert torch.equal(a, b)
    with torch.no_grad():  # the graph-free call: the same kernel's arithmetic, bitwise
        for a, b in zip(sdnc.read_mix(*inputs), nat[0], strict=True):
            assert torch.equal(a, b)


@needs_kernel
def test_gradcheck_of_the_native_read_mix():
    modes, link_w, link_idx, content_w, content_idx, content_r, link_rows = _mix_inputs(2, 2, 2, 3)

    def run(modes, link_w, content_w, content_r, link_rows):
        out = sdnc.read_mix(modes, link_w, link_idx, content_w, content_idx, content_r, link_rows)
        return out[0], out[1]

    inputs = [t.requires_grad_(True) for t in (modes, link_w, content_w, content_r, link_rows)]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# -- the core ------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("temporal_reads", [1, 3, 4])
def test_core_native_equals_torch_path_through_a_sequence_with_resets(torch_path, temporal_reads):
    """Outputs, final state and parameter gradients of a sequence in which elements restart
    mid-sequence (and the last step's gradient enters through the returned links)."""
    core = _core(F64, temporal_reads=temporal_reads)
    B, T = 3, 9
    x = _x(T, B, seed=3, dtype=F64)
    starts = torch.zeros(T, B)
    starts[4, 1] = starts[6, 0] = starts[6, 2] = 1.0
    s0 = state_lib.map_state(lambda t: t.detach().clone(), _random_memory_state(core, B))

    def run():
        core.zero_grad()
        y, s = core(x, s0, starts)
        gen = torch.Generator().manual_seed(4)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum()
        loss = loss + (s.link * torch.rand(s.link.shape, generator=gen, dtype=F64)).sum()
        loss = loss + s.link_t.sum() + s.precedence.sum() + s.read_weights.sum()
        loss.backward()
        grads = [p.grad.clone() for p in core.parameters() if p.grad is not None]
        return y.detach(), list(state_lib.leaves(s)), grads

    ref = torch_path(run)
    nat = run()
    torch.testing.assert_close(nat[0], ref[0], **TOL)
    for a, b in zip(nat[1], ref[1], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
    assert len(nat[2]) == len(ref[2]) > 0
    for a, b in zip(nat[2], ref[2], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@needs_kernel
def test_gradcheck_of_the_core_on_the_native_path():
    core = _core(
        F64, hidden_size=3, memory_size=6, word_size=2, num_reads=1, sparse_reads=2,
        temporal_reads=2,
    )  # fmt: skip
    T, batch = 4, 2
    x = _x(T, batch, dtype=F64, seed=7).requires_grad_(True)
    s0 = _random_memory_state(core, batch, seed=8)
    starts = torch.zeros(T, batch)
    starts[2, 1] = 1.0

    def run(x_in):
        y, s = core(x_in, s0, starts)
        return y, s.link, s.link_t, s.read_weights, s.precedence

    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


@needs_kernel
def test_one_node_step_equals_the_composed_native_path(monkeypatch):
    """:class:`sdnc.SDNCStep` (the whole step after the controller as one node) against the
    same kernels composed as three nodes: outputs, final state and gradients, with resets; and
    the graph-free forward (rollouts) gives the same outputs."""
    core = _core(F64, temporal_reads=4)
    B, T = 3, 8
    x = _x(T, B, seed=12, dtype=F64)
    starts = torch.zeros(T, B)
    starts[3, 0] = starts[5, 2] = 1.0
    s0 = state_lib.map_state(lambda t: t.detach().clone(), _random_memory_state(core, B))

    def run():
        core.zero_grad()
        y, s = core(x, s0, starts)
        gen = torch.Generator().manual_seed(5)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum()
        loss = loss + s.memory.sum() + s.link.sum() + s.write_weights.sum() + s.precedence.sum()
        loss.backward()
        grads = [p.grad.clone() for p in core.parameters() if p.grad is not None]
        return y.detach(), list(state_lib.leaves(s)), grads

    calls = []
    monkeypatch.setattr(sdnc, "SEQUENCE_NODE", False)
    monkeypatch.setattr(sdnc.SDNCStep, "apply", counting(sdnc.SDNCStep.apply, calls))
    one = run()
    assert len(calls) == T  # the one-node path ran
    monkeypatch.setattr(sdnc, "ONE_NODE_STEP", False)
    composed = run()
    torch.testing.assert_close(one[0], composed[0], **TOL)
    for a, b in zip(one[1] + one[2], composed[1] + composed[2], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
    monkeypatch.setattr(sdnc, "ONE_NODE_STEP", True)
    with torch.no_grad():
        y, s = core(x, s0, starts)
    torch.testing.assert_close(y, one[0], **TOL)
    for a, b in zip(state_lib.leaves(s), one[1], strict=True):
        torch.testing.assert_close(a, b.detach(), **TOL)


@needs_kernel
def test_saved_rows_buffer_grows_when_a_step_touches_more_rows(torch_path, monkeypatch):
    """The recorded forward sizes its saved rows by the previous steps; a step that needs more
    is redone with a larger buffer (nothing but the resets was written): same results."""
    B, N, L, J, R, S, k = 3, 10, 3, 7, 2, 6, 2
    state = torch_path(lambda: _random_links(B, N, L, J, R, S, steps=5, seed=4))
    inputs = _random_step_inputs(B, N, J, R, S, torch.Generator().manual_seed(9))
    reset = torch.tensor([1])
    ref = _step_outputs_and_grads(state, inputs, reset, k, True)
    key = (B, N, L, J, R, S, k)
    monkeypatch.setitem(sparse_links._row_capacity, key, 1)
    again = _step_outputs_and_grads(state, inputs, reset, k, True)
    assert sparse_links._row_capacity[key] > 1
    for a, b in zip(again[0] + again[1], ref[0] + ref[1], strict=True):
        assert torch.equal(a, b)  # the same kernel on the same inputs: bitwise


# -- owned copies and the broadcast initial state ---------------------------------------------------


@pytest.mark.parametrize("mmap_from", [1, 1 << 30])  # bytes: mapped memory / torch.zeros
def test_owned_copy_of_a_broadcast_zero_is_a_writable_zero_base_tensor(monkeypatch, mmap_from):
    monkeypatch.setattr(sparse_access, "ZERO_BUFFER_MMAP_BYTES", mmap_from)
    zero = torch.zeros((), dtype=F64).expand(3, 40, 5)
    owned = sparse_access.owned_copy(zero)
    assert owned._base is None and owned.is_contiguous() and owned.shape == (3, 40, 5)
    assert owned.dtype == F64 and not owned.any()
    owned[1, 2, 3] = 7.0  # writable, and not aliasing the broadcast (copies: bitwise)
    assert owned.sum() == 7.0 and zero.sum() == 0.0
    # anything else is a plain copy: a non-zero or -0.0 broadcast, a dense tensor
    for t in (torch.ones((), dtype=F64).expand(2, 3), torch.tensor(-0.0).expand(2, 3)):
        copy = sparse_access.owned_copy(t)
        assert torch.equal(copy, t) and copy.stride() == (3, 1)
        assert torch.equal(copy.signbit(), t.signbit())
    dense = torch.randn(2, 3)
    assert torch.equal(sparse_access.owned_copy(dense), dense)
    assert sparse_access.owned_copy(dense).data_ptr() != dense.data_ptr()


def test_initial_state_is_broadcast_and_runs_like_a_dense_copy_of_it():
    """The N-row fields of the initial state are broadcasts (nothing allocated per batch
    element); a call from it equals a call from a dense copy, in outputs and gradients, to
    ``TOL``: the same values in other layouts (stride 0), which a library matmul may round
    differently (MKL's batched matmul does on some shapes)."""
    core = _core(F64)
    B, T = 3, 5
    s0 = core.initial_state(B)
    for f in ("memory", "last_access", "link", "link_t", "link_indices", "link_t_indices"):
        assert getattr(s0, f).stride()[0] == 0, f
    dense = state_lib.map_state(lambda t: t.clone(memory_format=torch.contiguous_format), s0)
    x = _x(T, B, seed=21, dtype=F64)
    results = []
    for state in (s0, dense):
        core.zero_grad()
        y, s = core(x, state)
        (y.square().sum() + s.link.sum()).backward()
        results.append([y.detach(), *(p.grad.clone() for p in core.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# -- the whole call as one node (SDNCSequence) ------------------------------------------------------

#: Differentiable state fields the sequence node takes gradients for.
_GRAD_FIELDS = ("memory", "link", "link_t", "precedence", "read_weights")


def _warm_state(core, B, seed):
    """A state after a few steps (non-empty links, precedence and read weights), detached, with
    its differentiable fields as leaves that require gradients."""
    with torch.no_grad():
        _, s = core(_x(5, B, seed=seed, dtype=F64), _random_memory_state(core, B, seed=seed))
    s = state_lib.map_state(lambda t: t.detach().clone(), s)
    access = s.access._replace(
        **{f: getattr(s.access, f).requires_grad_(True) for f in _GRAD_FIELDS}
    )
    h, c = (t.requires_grad_(True) for t in s.controller)
    return s._replace(
        controller=type(s.controller)(h, c),
        access=access,
        read_vectors=s.read_vectors.requires_grad_(True),
    )


@needs_kernel
@pytest.mark.parametrize("T", [1, 7])
def test_sequence_node_equals_the_one_node_steps(monkeypatch, T):
    """:class:`sdnc.SDNCSequence` (the whole call, controller included, as one node) against
    :class:`sdnc.SDNCStep` per step under autograd: outputs, final state and the gradients of
    every parameter and differentiable state input, with resets at step 0 and mid-sequence."""
    core = _core(F64, temporal_reads=3)
    B = 3
    x = _x(T, B, seed=21, dtype=F64)
    starts = torch.zeros(T, B)
    starts[0, 1] = 1.0
    if T > 1:
        starts[4, 0] = starts[4, 2] = 1.0
    s0 = _warm_state(core, B, seed=22)
    leaves = [*s0.controller, s0.read_vectors, *(getattr(s0.access, f) for f in _GRAD_FIELDS)]

    def run():
        core.zero_grad()
        for t in leaves:
            t.grad = None
        y, s = core(x, s0, starts)
        gen = torch.Generator().manual_seed(5)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum()
        for t in (s.memory, s.link, s.link_t, s.precedence, s.read_weights, s.write_weights):
            loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=F64)).sum()
        loss = loss + s.controller.c.square().sum() + s.read_vectors.sum()
        loss.backward()
        grads = [p.grad.clone() for p in core.parameters()]
        grads += [t.grad.clone() for t in leaves]
        return y.detach(), [t.detach() for t in state_lib.leaves(s)], grads

    calls = []
    monkeypatch.setattr(sdnc.SDNCSequence, "apply", counting(sdnc.SDNCSequence.apply, calls))
    seq = run()
    assert len(calls) == 1  # the sequence node ran
    monkeypatch.setattr(sdnc, "SEQUENCE_NODE", False)
    steps = run()
    assert len(calls) == 1
    torch.testing.assert_close(seq[0], steps[0], **TOL)
    for a, b in zip(seq[1], steps[1], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert len(seq[2]) == len(steps[2])
    for a, b in zip(seq[2], steps[2], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert all(g.abs().sum() > 0 for g in seq[2][:3])  # the LSTM weights and biases learn
    monkeypatch.setattr(sdnc, "SEQUENCE_NODE", True)
    with torch.no_grad():  # the graph-free forward gives the same values
        y, s = core(x, s0, starts)
    torch.testing.assert_close(y, seq[0], **TOL)
    for a, b in zip(state_lib.leaves(s), seq[1], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@needs_kernel
def test_gradcheck_of_the_sequence_node():
    """Gradcheck of :class:`sdnc.SDNCSequence` in float64 with respect to the input, the
    controller and interface weights (through the core's parameters) and the differentiable
    state, with resets at step 0 and mid-sequence."""
    core = _core(
        F64, hidden_size=3, memory_size=6, word_size=2, num_reads=1, sparse_reads=2,
        temporal_reads=2,
    )  # fmt: skip
    T, B = 4, 2
    x = _x(T, B, dtype=F64, seed=7).requires_grad_(True)
    s0 = _warm_state(core, B, seed=8)
    starts = torch.zeros(T, B)
    starts[0, 0] = starts[2, 1] = 1.0
    params = dict(core.named_parameters())
    names = [
        "controller.weight_ih",
        "controller.weight_hh",
        "interface.weight",
        "h0",
        "c0",
        "read0",
    ]
    state_in = [s0.controller.c, s0.read_vectors, s0.access.memory, s0.access.precedence]

    def run(x_in, *rest):
        p = dict(params, **dict(zip(names, rest[: len(names)], strict=True)))
        c, r, memory, precedence = rest[len(names) :]
        s = s0._replace(
            controller=type(s0.controller)(s0.controller.h, c),
            read_vectors=r,
            access=s0.access._replace(memory=memory, precedence=precedence),
        )
        y, s = torch.func.functional_call(core, p, (x_in, s, starts))
        return y, s.link, s.link_t, s.read_weights, s.precedence, s.memory

    calls = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sdnc.SDNCSequence, "apply", counting(sdnc.SDNCSequence.apply, calls))
        inputs = (x, *(params[n].detach().clone().requires_grad_(True) for n in names))
        inputs += tuple(t.detach().clone().requires_grad_(True) for t in state_in)
        assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert calls


@needs_kernel
def test_sequence_node_in_float32_matches_the_one_node_steps(monkeypatch):
    """The float32 kernels of the sequence node (the LSTM cell's included) against the per-step
    path: same outputs and parameter gradients up to float32 rounding."""
    core = _core(torch.float32, temporal_reads=3)
    T, B = 6, 3
    x = _x(T, B, seed=31, dtype=torch.float32)
    starts = torch.zeros(T, B)
    starts[0, 0] = starts[3, 1] = 1.0

    def run():
        core.zero_grad()
        y, s = core(x, core.initial_state(B), starts)
        (y.square().sum() + s.memory.sum()).backward()
        return y.detach(), [p.grad.clone() for p in core.parameters()]

    seq = run()
    monkeypatch.setattr(sdnc, "SEQUENCE_NODE", False)
    steps = run()
    torch.testing.assert_close(seq[0], steps[0], atol=1e-5, rtol=1e-4)
    for a, b in zip(seq[1], steps[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@needs_kernel
def test_sequence_node_output_is_freed_after_backward():
    """The node's context keeps no view of its output ``y`` (a reference cycle through the
    autograd graph that no garbage collection frees): ``y`` dies with its last reference."""
    core = _core(F64)
    calls = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sdnc.SDNCSequence, "apply", counting(sdnc.SDNCSequence.apply, calls))
        y, s = core(_x(5, 3, seed=41, dtype=F64), core.initial_state(3))
    assert calls
    alive = weakref.ref(y)
    y.sum().backward()
    del y, s
    gc.collect()
    assert alive() is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_cell_kernel_matches_torch_activations(dtype):
    """``sdnc_lstm_forward`` against torch's LSTM cell from the same pre-activations, over
    ordinary, tiny and saturating values (beyond exp's float range too): float64 (libm) to
    1e-12; float32 (its own vectorised exp) to a few float ulps of 1."""
    lib = sparse_links.native_kernel()
    B, Hd = 5, 19  # Hd not a multiple of the vector width: the loops' tails run too
    gen = torch.Generator().manual_seed(7)
    acts = torch.randn(B, 4 * Hd, generator=gen, dtype=torch.float64) * 4
    acts[0] = torch.linspace(-120, 120, 4 * Hd, dtype=torch.float64)
    acts[1] = torch.linspace(-1e-3, 1e-3, 4 * Hd, dtype=torch.float64)
    acts = acts.to(dtype)
    c_prev = torch.randn(B, Hd, generator=gen, dtype=torch.float64).to(dtype) * 3
    i, f, g, o = acts.chunk(4, dim=1)
    want_acts = torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=1)
    want_c = f.sigmoid() * c_prev + i.sigmoid() * g.tanh()
    want_tanh_c = want_c.tanh()
    want_h = o.sigmoid() * want_tanh_c
    got_acts, c, tanh_c = (
        acts.clone(),
        torch.empty(B, Hd, dtype=dtype),
        torch.empty(B, Hd, dtype=dtype),
    )
    h = torch.full((B, Hd + 3), 7.0, dtype=dtype)  # row stride Hd + 3: the rest stays untouched
    native.kernel(lib, "sdnc_lstm_forward", acts.dtype)(
        B, Hd, got_acts.data_ptr(), c_prev.data_ptr(), c.data_ptr(), tanh_c.data_ptr(),
        h.data_ptr(), Hd + 3,
    )  # fmt: skip
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 5e-7, "rtol": 0}
    torch.testing.assert_close(got_acts, want_acts, **tol)
    torch.testing.assert_close(tanh_c, want_tanh_c, **tol)
    torch.testing.assert_close(h[:, :Hd], want_h, **tol)
    torch.testing.assert_close(c, want_c, atol=tol["atol"] * 4, rtol=0)  # |c| up to ~4
    assert (h[:, Hd:] == 7.0).all()
    assert ((got_acts >= -1) & (got_acts <= 1)).all() and torch.isfinite(h).all()


@needs_kernel
@pytest.mark.parametrize("sequence_node", [True, False])
@pytest.mark.parametrize("backward", [True, False])
def test_every_output_tensor_is_freed(monkeypatch, sequence_node, backward):
    """No output of the sequence node or of the one-node step is referenced from its own node's
    context (SAM's plain context held the memory it marks dirty, and the saved w^W was the output
    w^W): every tensor of ``y`` and the new state dies with its last reference, whether or not
    backward ran. Before the fix every training call's graph leaked (~7.6 MB at B=24)."""
    monkeypatch.setattr(sdnc, "SEQUENCE_NODE", sequence_node)
    core = _core(F64)
    y, s = core(_x(5, 3, seed=43, dtype=F64), core.initial_state(3))
    assert y.grad_fn is not None and s.memory.grad_fn is not None
    outputs = [y, *s.controller, s.read_vectors, *s.access]
    alive = [weakref.ref(t) for t in outputs]
    if backward:
        (y.sum() + s.memory.sum() + s.write_weights.sum()).backward()
    del y, s, outputs
    gc.collect()
    assert [i for i, r in enumerate(alive) if r() is not None] == []
