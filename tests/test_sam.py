"""SAM (Rae et al. 2016): sparse reads and writes, LRU usage, kNN indexes, memory-efficient backward.

The core contract (shapes, resets, step = unroll, batch independence, pack/unpack) is checked for
``sam`` and its dense and FAISS variants by ``test_cores_contract.py``; this file checks what is
particular to SAM against independent computations.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RANK_MARGIN, build_core, cosine_top_k_margin, randomize_initial_state

from memagents.cores import addressing, sparse_access
from memagents.cores.sam import SAMCore

needs_faiss = pytest.mark.skipif(not sparse_access.faiss_available(), reason="faiss not installed")

B = 3


def _core(dtype=torch.float32, **kw) -> SAMCore:
    sizes = {"hidden_size": 6, "memory_size": 8, "word_size": 3, "num_reads": 2, "sparse_reads": 3}
    sizes.update(kw)
    core = build_core("sam", dtype=dtype, **sizes)
    randomize_initial_state(core)
    return core


def _x(T, batch=B, seed=0, dtype=torch.float32, size=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, batch, size, generator=gen, dtype=dtype)


def _random_memory_state(core, batch, seed=3):
    """The initial state with a random (tie-free) memory."""
    gen = torch.Generator().manual_seed(seed)
    s0 = core.initial_state(batch)
    memory = torch.randn(s0.memory.shape, generator=gen, dtype=s0.memory.dtype)
    return s0._replace(access=s0.access._replace(memory=memory))


# -- sparse weightings -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["exact", pytest.param("faiss", marks=needs_faiss)])
def test_read_weights_have_exactly_k_nonzeros_per_head_summing_to_one(index):
    core = _core(index=index, memory_size=10, sparse_reads=3, num_reads=3)
    T = 6
    _, _, debug = core(_x(T), _random_memory_state(core, B), return_debug=True)
    weights, indices = debug["read_weights"], debug["read_indices"]  # [T, B, R, K]
    assert weights.shape == (T, B, 3, 3)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(T, B, 3))
    # K distinct rows per head, as exact integers in [0, N), ascending
    assert torch.equal(indices, indices.round())
    assert ((indices >= 0) & (indices < 10)).all()
    assert (indices.diff(dim=-1) > 0).all()
    # scattered to dense [N] the weighting has exactly K non-zeros and sums to 1
    dense = torch.zeros(T, B, 3, 10).scatter_add(-1, indices.long(), weights)
    assert ((dense != 0).sum(-1) == 3).all()
    torch.testing.assert_close(dense.sum(-1), torch.ones(T, B, 3))


def test_read_attends_to_the_k_rows_nearest_the_key_by_cosine():
    core = _core(memory_size=12, sparse_reads=4)
    s0 = _random_memory_state(core, B)
    _, _, debug = core(_x(1), s0, return_debug=True)
    memory = debug["memory"][0]  # after this step's write
    h = core.controller(
        torch.cat([_x(1)[0], s0.read_vectors.reshape(B, -1)], -1),
        (s0.controller.h.squeeze(1), s0.controller.c.squeeze(1)),
    )[0]
    keys = core.interface(h)[:, : 2 * 3].view(B, 2, 3)
    sim = addressing.cosine_similarity(memory, keys)  # [B, R, N]
    expected = sim.topk(4, dim=-1).indices.sort(-1).values
    # the core's search computes the cosines with its own kernel: the same rows on any CPU as
    # long as the 4th and 5th nearest are further apart than float32 rounding
    assert cosine_top_k_margin(memory, keys, 4) > RANK_MARGIN
    assert torch.equal(debug["read_indices"][0].long(), expected)


def test_write_weights_interpolate_previous_reads_and_the_lru_row():
    read_w = torch.tensor([[[0.7, 0.3], [0.5, 0.5]]])  # [1, R=2, K=2]
    read_i = torch.tensor([[[1, 4], [2, 4]]])
    weights, indices = sparse_access.sparse_write_weights(
        read_w, read_i, torch.tensor([6]), torch.tensor([[0.8]]), torch.tensor([[0.25]])
    )
    assert indices.tolist() == [[1, 4, 2, 4, 6]]
    expected = 0.8 * torch.tensor([[0.25 * 0.35, 0.25 * 0.15, 0.25 * 0.25, 0.25 * 0.25, 0.75]])
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(), torch.tensor(0.8))


def test_write_erases_the_lru_row_and_adds_at_the_write_rows():
    N, W = 5, 2
    memory = torch.arange(1.0, 1.0 + N * W).view(1, N, W)
    a = torch.tensor([[10.0, -10.0]])
    w = torch.tensor([[0.5, 0.25, 0.1]])
    idx = torch.tensor([[1, 1, 3]])  # a duplicate row, and the LRU row 3 last
    out, *_ = sparse_access.SparseAccessStep.apply(
        memory.clone(), a, w, torch.ones(1, 1, W), torch.ones(1, 1),
        idx, torch.zeros(0, dtype=torch.long), sparse_access.ExactIndex(memory), 2, False,
    )  # fmt: skip
    expected = memory.clone()
    expected[0, 1] += 0.75 * a[0]
    expected[0, 3] = 0.1 * a[0]  # erased, then written
    torch.testing.assert_close(out, expected)


# -- usage and the least-recently-used row ---------------------------------------------------------


def test_lru_picks_the_row_a_scripted_sequence_of_accesses_leaves_oldest():
    N = 5
    last, time = torch.zeros(2, N), torch.zeros(2, 1)
    # element 0 touches rows 0..4 in order except 2, then 0 again; element 1 touches 4, 3, 2, 1, 0
    script = [([0], [4]), ([1], [3]), ([3], [2]), ([4], [1]), ([0], [0])]
    expected_lru = [[0, 0], [1, 0], [2, 0], [2, 0], [2, 0]]
    for (rows0, rows1), lru_before in zip(script, expected_lru, strict=True):
        assert sparse_access.least_recently_used(last).tolist() == lru_before
        idx = torch.tensor([rows0, rows1])
        last, time = sparse_access.usage_update(last, time, [(idx, torch.ones(2, 1))])
    assert sparse_access.least_recently_used(last).tolist() == [2, 4]
    assert time.flatten().tolist() == [5, 5]
    assert last.tolist() == [[5, 2, 0, 3, 4], [5, 4, 3, 2, 1]]


def test_accesses_below_the_threshold_do_not_count_and_duplicates_merge():
    last, time = torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[3.0]])
    idx = torch.tensor([[1, 1, 2]])
    weights = torch.tensor([[0.0, 0.5, sparse_access.ACCESS_THRESHOLD / 2]])
    last, time = sparse_access.usage_update(last, time, [(idx, weights)])
    assert last.tolist() == [[3.0, 4.0, 2.0]]  # row 1 accessed (one of its copies), row 2 not
    assert sparse_access.least_recently_used(last).tolist() == [2]


def test_each_element_counts_its_own_steps_and_resets_alone():
    core = _core()
    T = 5
    starts = torch.zeros(T, B)
    starts[3, 1] = 1.0
    _, state, debug = core(_x(T), core.initial_state(B), starts, return_debug=True)
    assert debug["time"][:, :, 0].tolist() == [
        [1, 1, 1],
        [2, 2, 2],
        [3, 3, 3],
        [4, 1, 4],
        [5, 2, 5],
    ]
    assert state.last_access.max(-1).values.tolist() == [5, 2, 5]
    # the row erased at a step is the LRU row of the state before it
    for t in range(1, T):
        if t == 3:
            continue
        lru = sparse_access.least_recently_used(debug["last_access"][t - 1])
        assert torch.equal(debug["lru"][t].long(), lru)  # an argmin of exact integers


# -- indexes ---------------------------------------------------------------------------------------


@needs_faiss
@pytest.mark.parametrize("zero_rows", [0, 20])
def test_exact_and_faiss_indexes_find_the_same_rows_on_small_memories(zero_rows):
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(4, 64, 8, generator=gen)
    memory[:, :zero_rows] = 0.0
    keys = torch.randn(4, 3, 8, generator=gen)
    exact = sparse_access.ExactIndex(memory)
    approx = sparse_access.FaissIndex(memory)
    assert approx.nprobe == approx.nlist  # exhaustive at this size
    # Two kernels compute the cosines (the scan, FAISS's inner products of unit rows): the same
    # rows on any CPU when the k-th and (k+1)-th nearest are further apart than their rounding.
    for k in (1, 4, 30):
        assert cosine_top_k_margin(memory, keys, k) > RANK_MARGIN
        assert torch.equal(exact.search(memory, keys, k), approx.search(memory, keys, k))
    # after a sparse write (and an erase to zero) the updated index still agrees
    rows = torch.tensor([[0, 5, 40]] * 4)
    memory[:, 0] = torch.randn(8, generator=gen)
    memory[:, 5] = 0.0
    memory[:, 40] = keys[:, 0]
    approx.update(memory, rows)
    assert cosine_top_k_margin(memory, keys, 4) > RANK_MARGIN
    assert torch.equal(exact.search(memory, keys, 4), approx.search(memory, keys, 4))
    assert (approx.search(memory, keys, 4)[:, 0] == 40).any(-1).all()


@needs_faiss
def test_exact_and_faiss_cores_give_the_same_reads_with_resets():
    exact, approx = _core(index="exact"), _core(index="faiss")
    assert approx.index_kind == "faiss"
    approx.load_state_dict(exact.state_dict())
    T = 8
    starts = torch.zeros(T, B)
    starts[4, [0, 2]] = 1.0
    s0 = _random_memory_state(exact, B)
    y_e, _, d_e = exact(_x(T), s0, starts, return_debug=True)
    y_f, _, d_f = approx(_x(T), s0, starts, return_debug=True)
    # After a reset, zero rows read with equal weights receive equal writes: rows with equal
    # content are exact ties, which the two indexes may break differently. Reads (and so the
    # outputs) are the same either way.
    torch.testing.assert_close(d_f["read_vectors"], d_e["read_vectors"])
    torch.testing.assert_close(
        d_f["read_weights"].sort(-1).values, d_e["read_weights"].sort(-1).values
    )
    torch.testing.assert_close(y_f, y_e)
    # before: no ties, and random rows whose similarities are far apart compared with the
    # rounding of the two searches' kernels (as checked in the index test above)
    assert torch.equal(d_e["read_indices"][:4], d_f["read_indices"][:4])


def test_index_resolution_and_validation():
    assert sparse_access.resolve_index("exact", 10**6) == "exact"
    assert sparse_access.resolve_index("auto", 64) == "exact"
    if sparse_access._kernel() is not None:
        expected = "ivf"
    else:
        expected = "faiss" if sparse_access.faiss_available() else "exact"
    assert sparse_access.resolve_index("auto", sparse_access.AUTO_FAISS_MIN_ROWS) == expected
    assert sparse_access.resolve_index("auto", sparse_access.AUTO_FAISS_MIN_ROWS - 1) == "exact"
    with pytest.raises(ValueError, match="index"):
        SAMCore(input_size=3, index="annoy")
    with pytest.raises(ValueError, match="sparse_reads"):
        SAMCore(input_size=3, memory_size=4, sparse_reads=4)
    with pytest.raises(ValueError, match="sparse_reads"):
        SAMCore(input_size=3, sparse_reads=0)


# -- resets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["exact", pytest.param("faiss", marks=needs_faiss)])
def test_after_a_reset_no_read_returns_content_of_the_previous_episode(index):
    core = _core(index=index, memory_size=12)
    T1, T2 = 6, 4
    x = torch.cat([10.0 * _x(T1, seed=1), _x(T2, seed=2)])
    starts = torch.zeros(T1 + T2, B)
    starts[T1, 1] = 1.0
    _, _, debug = core(x, _random_memory_state(core, B), starts, return_debug=True)
    _, _, fresh = core(x[T1:], core.initial_state(B), return_debug=True)
    for t in range(T2):
        # element 1's memory holds only what episode 2 wrote: equal to a fresh run's, up to
        # float32 rounding (the fresh run starts from the broadcast initial state, another
        # layout), and so are the rows it reads (random rows, far apart in similarity)
        torch.testing.assert_close(debug["memory"][T1 + t, 1], fresh["memory"][t, 1])
        torch.testing.assert_close(debug["read_vectors"][T1 + t, 1], fresh["read_vectors"][t, 1])
        assert torch.equal(debug["read_indices"][T1 + t, 1], fresh["read_indices"][t, 1])
    # the first step after the reset reads rows that are zero or hold its own write only
    written = debug["write_indices"][T1, 1].long()
    for row in debug["read_indices"][T1, 1].long().flatten().tolist():
        content = debug["memory"][T1, 1, row]
        assert row in written.tolist() or not content.any()


# -- gradients -------------------------------------------------------------------------------------


def _grads(core, x, s0, starts):
    x = x.clone().requires_grad_(True)
    memory = s0.memory.clone().requires_grad_(True)
    state = s0._replace(access=s0.access._replace(memory=memory))
    y, s = core(x, state, starts)
    gen = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    loss = loss + (s.memory * torch.randn(s.memory.shape, generator=gen, dtype=y.dtype)).sum()
    loss = (
        loss
        + (s.read_weights * torch.randn(s.read_weights.shape, generator=gen, dtype=y.dtype)).sum()
    )
    params = [p for p in core.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, memory, *params])
    return y.detach(), grads


def test_memory_efficient_backward_matches_the_dense_reference():
    fused = _core(torch.float64, memory_size=10, sparse_reads=3)
    dense = _core(torch.float64, memory_size=10, sparse_reads=3, fused=False)
    dense.load_state_dict(fused.state_dict())
    T = 7
    x = _x(T, dtype=torch.float64, seed=4)
    starts = torch.zeros(T, B)
    starts[3, 1] = 1.0
    y_f, g_f = _grads(fused, x, _random_memory_state(fused, B), starts)
    y_d, g_d = _grads(dense, x, _random_memory_state(dense, B), starts)
    torch.testing.assert_close(y_f, y_d, rtol=0, atol=1e-12)
    for a, b in zip(g_f, g_d, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert g_f[1].abs().sum() > 0  # the starting memory
    assert all(g.abs().sum() > 0 for g in g_f)  # every parameter, h0 through the reset


def test_fused_step_saves_no_copy_of_the_memory():
    """Autograd keeps O(T·K·W) per sequence: no saved tensor is as large as the N×W memory."""
    N, W = 256, 4
    core = _core(memory_size=N, word_size=W, index="exact")
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    s0 = _random_memory_state(core, B)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, s = core(_x(5), s0)
    assert max(saved) < N * W  # per element; the memory of the batch is B·N·W
    (y.sum() + s.memory.sum()).backward()
    grads = [p.grad for p in core.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_backward_does_not_modify_a_gradient_passed_in_by_the_caller():
    core = _core()
    y, s = core(_x(3), _random_memory_state(core, B))
    g = torch.ones_like(s.memory)
    torch.autograd.backward([y.sum(), s.memory], [None, g])
    assert torch.equal(g, torch.ones_like(s.memory))  # untouched: bitwise


def test_forward_does_not_modify_the_state_it_is_given():
    core = _core()
    s0 = _random_memory_state(core, B)
    memory = s0.memory.clone()
    core(_x(3), s0)
    core.step(_x(1)[0], s0)
    assert torch.equal(s0.memory, memory)  # untouched: bitwise


def test_gradcheck_through_steps_and_a_reset():
    """float64 numerical gradients w.r.t. the input and the starting memory (K < N)."""
    core = _core(torch.float64, hidden_size=3, memory_size=5, word_size=2, sparse_reads=2)
    T, batch = 4, 2
    x = _x(T, batch, dtype=torch.float64, seed=7).requires_grad_(True)
    s0 = _random_memory_state(core, batch, seed=8)
    memory = s0.memory.clone().requires_grad_(True)
    starts = torch.zeros(T, batch)
    starts[2, 1] = 1.0

    def run(x_in, memory_in):
        state = s0._replace(access=s0.access._replace(memory=memory_in))
        y, s = core(x_in, state, starts)
        return y, s.memory, s.read_weights

    assert torch.autograd.gradcheck(run, (x, memory), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("bad", [7.0, -1.0, float("nan")])
@pytest.mark.parametrize("field", ["read_indices", "write_indices"])
def test_a_state_with_rows_outside_the_memory_is_rejected(field, bad):
    """Native kernels index memory with the state's rows unchecked: a corrupted state must raise
    a clear error instead of reading or writing out of bounds."""
    core = SAMCore(input_size=3, hidden_size=8, memory_size=6, word_size=4, num_reads=2)
    state = core.initial_state(4)
    field_value = getattr(state.access, field).clone()
    field_value[1].view(-1)[0] = bad
    state = state._replace(access=state.access._replace(**{field: field_value}))
    with pytest.raises(
        ValueError, match=rf"state\.access\.{field} must hold row indices in \[0, 6\)"
    ):
        core(torch.randn(1, 4, 3), state)


def test_rows_reset_at_the_first_step_may_hold_anything():
    """An element whose episode starts at step 0 gets the initial state before anything reads
    its stored one, so garbage there is allowed (and changes nothing)."""
    core = SAMCore(input_size=3, hidden_size=8, memory_size=6, word_size=4, num_reads=2)
    state = core.initial_state(2)
    bad = state.access.read_indices.clone()
    bad[1] = 99.0
    x, starts = torch.randn(2, 2, 3), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    y_bad, _ = core(x, state._replace(access=state.access._replace(read_indices=bad)), starts)
    y_ok, _ = core(x, state, starts)
    # bitwise: after the reset both runs compute on the same values with the same kernels (row
    # indices only select rows; they enter no floating-point arithmetic)
    assert torch.equal(y_bad, y_ok)
