"""SAM's native kernels (``csrc/sparse_access.cpp``) against the torch reference paths.

Each test runs the same computation twice, once with the kernels and once with
``sparse_access.lib = None`` (the torch reference), in float64, and compares values and gradients
to ~1e-10; the native path is also checked with ``gradcheck``. Memories are random (no ties), so
both paths pick the same rows.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from conftest import (
    HAS_NATIVE,
    RANK_MARGIN,
    build_core,
    cosine_top_k_margin,
    counting,
    needs_native,
    randomize_initial_state,
    top_k_margin,
)

from memagents.cores import sparse_access
from memagents.cores import state as state_lib

TOL = {"rtol": 0, "atol": 1e-10}


@pytest.fixture
def torch_path(monkeypatch):
    """Run the block under it with the torch reference (no kernels)."""

    def use(on: bool):
        monkeypatch.setattr(sparse_access, "lib", None if on else sparse_access._load())

    return use


def test_kernel_loads_when_a_compiler_exists():
    if not HAS_NATIVE:
        pytest.skip("no C++ compiler or MEMAGENTS_NATIVE=0")
    assert sparse_access._load() is not None
    assert sparse_access._kernel() is not None


def _step_inputs(B=3, N=9, W=4, R=2, K=3, seed=0, dtype=torch.float64, extra=0):
    gen = torch.Generator().manual_seed(seed)
    J = R * K + 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    memory = randn(B, N, W)
    memory[1, 2] = 0.0  # a zero row
    diff = {
        "write_vector": randn(B, W),
        "write_weights": torch.rand(B, J, generator=gen, dtype=dtype),
        "read_keys": randn(B, R, W),
        "read_strengths": 1 + torch.rand(B, R, generator=gen, dtype=dtype) * 3,
    }
    write_indices = torch.randint(0, N, (B, J), generator=gen)
    write_indices[0, 1] = write_indices[0, 0]  # a duplicate write row
    extra_indices = torch.randint(0, N, (B, extra), generator=gen) if extra else None
    return memory, diff, write_indices, extra_indices


def _run_step(memory0, diff, write_indices, reset, k, extra_indices, owns_grad, seed=1):
    """Two chained steps (so the memory gradient flows through one), with random loss weights."""
    memory = memory0.clone().requires_grad_(True)
    leaves = {n: t.clone().requires_grad_(True) for n, t in diff.items()}
    index = sparse_access.make_index("exact", memory.detach().clone())
    work = memory.clone()
    outs = []
    for t in range(2):
        out = sparse_access.SparseAccessStep.apply(
            work, leaves["write_vector"] * (1 + t), leaves["write_weights"],
            leaves["read_keys"] - t, leaves["read_strengths"], write_indices,
            reset if t == 1 else torch.zeros(0, dtype=torch.long), index, k,
            owns_grad or t == 0, extra_indices,
        )  # fmt: skip
        work = out[0]
        outs.append(out)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for out in outs:
        for i, o in enumerate(out[1:], start=1):
            if i != 2:  # not the (non-differentiable) indices
                loss = loss + (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (work * torch.randn(work.shape, generator=gen, dtype=work.dtype)).sum()
    grads = torch.autograd.grad(loss, [memory, *leaves.values()])
    values = [o.detach() for out in outs for o in out]
    return values, grads


@needs_native
@pytest.mark.parametrize("extra", [0, 5])
@pytest.mark.parametrize("reset", [[], [1], [0, 2]])
@pytest.mark.parametrize("owns_grad", [True, False])
def test_native_step_matches_the_torch_step(torch_path, extra, reset, owns_grad):
    memory, diff, write_indices, extra_indices = _step_inputs(extra=extra)
    reset = torch.tensor(reset, dtype=torch.long)
    torch_path(False)
    v_native, g_native = _run_step(memory, diff, write_indices, reset, 3, extra_indices, owns_grad)
    torch_path(True)
    v_torch, g_torch = _run_step(memory, diff, write_indices, reset, 3, extra_indices, owns_grad)
    for a, b in zip(v_native, v_torch, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(g_native, g_torch, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert all(g.abs().sum() > 0 for g in g_native)


@needs_native
def test_native_step_gradcheck(torch_path):
    torch_path(False)
    memory, diff, write_indices, extra_indices = _step_inputs(B=2, N=6, W=3, K=2, extra=3)
    reset = torch.tensor([1])

    def run(memory_in, a, ww, keys, beta):
        index = sparse_access.make_index("exact", memory_in.detach().clone())
        work = memory_in.clone()
        outs = []
        for t in range(2):
            out = sparse_access.SparseAccessStep.apply(
                work, a, ww, keys + t, beta, write_indices,
                reset if t else torch.zeros(0, dtype=torch.long), index, 2, True, extra_indices,
            )  # fmt: skip
            work = out[0]
            outs += [out[1], out[3], out[4]]
        return (work, *outs)

    inputs = [memory.requires_grad_(True)] + [t.requires_grad_(True) for t in diff.values()]
    assert isinstance(sparse_access.make_index("exact", memory.detach()).sqnorm, torch.Tensor)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("zero_rows", [0, 7])
def test_native_exact_search_matches_the_torch_scan(torch_path, zero_rows):
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        memory = torch.randn(4, 50, 6, generator=gen, dtype=dtype)
        memory[:, 10 : 10 + zero_rows] = 0.0
        keys = torch.randn(4, 3, 6, generator=gen, dtype=dtype)
        for k in (1, 4, 20):
            torch_path(False)
            fast = sparse_access.ExactIndex(memory)
            assert fast.sqnorm is not None
            got = fast.search(memory, keys, k)
            torch_path(True)
            expected = sparse_access.ExactIndex(memory).search(memory, keys, k)
            # the kernel's cosines and torch's round differently: the same rows on any CPU
            # when the k-th and (k+1)-th nearest are further apart than that
            assert cosine_top_k_margin(memory, keys, k) > RANK_MARGIN
            assert torch.equal(got, expected)


@needs_native
def test_native_usage_and_lru_match_torch(torch_path):
    gen = torch.Generator().manual_seed(4)
    B, N, J = 3, 12, 5
    last = torch.randint(0, 6, (B, N), generator=gen).double()
    time = torch.full((B, 1), 6.0, dtype=torch.float64)
    time[2] = 2.0
    idx = [torch.randint(0, N, (B, J), generator=gen) for _ in range(2)]
    w = [torch.rand(B, J, generator=gen, dtype=torch.float64) * 0.02 for _ in range(2)]
    accesses = list(zip(idx, w, strict=True))
    torch_path(False)
    u_n, t_n, lru_n = sparse_access.usage_update_lru(last.clone(), time, accesses)
    u_n2, t_n2 = sparse_access.usage_update(last.clone(), time, accesses, inplace=True)
    torch_path(True)
    u_t, t_t = sparse_access.usage_update(last, time, accesses)
    # bitwise: steps are exact integers, and both paths compare the same weights with the
    # threshold
    for got in (u_n, u_n2):
        assert torch.equal(got, u_t)
    assert torch.equal(t_n, t_t) and torch.equal(t_n2, t_t)
    assert torch.equal(lru_n, torch.argmin(u_t, dim=-1))
    assert (u_t != last).any()  # some access crossed the threshold, some did not
    assert (u_t == last).any()
    torch_path(False)
    ties = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert sparse_access.least_recently_used(ties).tolist() == [1, 0]


def _sam(dtype=torch.float64, **kw):
    sizes = {"hidden_size": 5, "memory_size": 10, "word_size": 3, "num_reads": 2, "sparse_reads": 3}
    sizes.update(kw)
    core = build_core("sam", dtype=dtype, **sizes)
    randomize_initial_state(core)
    return core


def _sam_grads(core, T=6, B=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, core.input_size, generator=gen, dtype=torch.float64, requires_grad=True)
    s0 = core.initial_state(B)
    memory = torch.randn(s0.memory.shape, generator=gen, dtype=torch.float64)
    memory.requires_grad_(True)
    s0 = s0._replace(access=s0.access._replace(memory=memory))
    starts = torch.zeros(T, B)
    starts[2, 1] = 1.0
    starts[4, 0] = 1.0
    y, s = core(x, s0, starts)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    loss = loss + (s.memory * torch.randn(s.memory.shape, generator=gen, dtype=y.dtype)).sum()
    params = [p for p in core.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, memory, *params])
    return y.detach(), s, grads


@needs_native
def test_sam_core_native_matches_torch_with_resets(torch_path):
    core = _sam()
    torch_path(False)
    y_n, s_n, g_n = _sam_grads(core)
    torch_path(True)
    y_t, s_t, g_t = _sam_grads(core)
    torch.testing.assert_close(y_n, y_t, **TOL)
    for a, b in zip(s_n.access, s_t.access, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
    for a, b in zip(g_n, g_t, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@needs_native
def test_sam_core_native_matches_torch_from_a_packed_state(torch_path):
    """A state unpacked from SB3's flat layout (non-contiguous views) runs the same."""
    core = _sam(memory_size=12)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(7, 3, core.input_size, generator=gen, dtype=torch.float64)
    _, mid = core(x[:4], core.initial_state(3))
    packed = core.unpack_state(core.pack_state(mid).clone())
    assert not packed.access.time.is_contiguous()
    torch_path(False)
    y_n, s_n = core(x[4:], packed)
    torch_path(True)
    y_t, s_t = core(x[4:], mid)
    torch.testing.assert_close(y_n, y_t, **TOL)
    for a, b in zip(s_n.access, s_t.access, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# -- the native inverted-file index ----------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("zero_rows", [0, 20])
def test_ivf_index_is_exact_on_small_memories_and_after_updates(zero_rows):
    """With ``nprobe >= nlist`` (N <= 1024) every list is probed: the exact top-k."""
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(4, 64, 8, generator=gen)
    memory[:, :zero_rows] = 0.0
    keys = torch.randn(4, 3, 8, generator=gen)
    exact, ivf = sparse_access.ExactIndex(memory), sparse_access.IVFIndex(memory)
    assert ivf.nprobe == ivf.nlist
    # the two searches compute the cosines with other kernels (the IVF on float32 unit rows):
    # the same rows on any CPU when the k-th and (k+1)-th nearest are further apart than that
    for k in (1, 4, 30):
        assert cosine_top_k_margin(memory, keys, k) > RANK_MARGIN
        assert torch.equal(ivf.search(memory, keys, k), exact.search(memory, keys, k))
    rows = torch.tensor([[0, 5, 40, 40]] * 4)  # a duplicate row
    memory[:, 0] = torch.randn(8, generator=gen)
    memory[:, 5] = 0.0
    memory[:, 40] = keys[:, 0]
    ivf.update(memory, rows)
    assert cosine_top_k_margin(memory, keys, 4) > RANK_MARGIN
    assert torch.equal(ivf.search(memory, keys, 4), exact.search(memory, keys, 4))
    assert (ivf.search(memory, keys, 4)[:, 0] == 40).any(-1).all()
    memory[2] = torch.randn(64, 8, generator=gen)
    memory[2, 3] = 0.0
    ivf.reset(memory, torch.tensor([2]))
    assert cosine_top_k_margin(memory, keys, 4) > RANK_MARGIN
    assert torch.equal(ivf.search(memory, keys, 4), exact.search(memory, keys, 4))


def _ivf_margin(
    index: sparse_access.IVFIndex, memory: torch.Tensor, keys: torch.Tensor, k: int
) -> float:
    """The smallest :func:`conftest.top_k_margin` of the IVF search's rankings, in float64: each
    non-zero row's nearest centroid (its list), each key's ``nprobe`` nearest centroids (the
    lists it probes) and each key's ``k`` best candidates (the probed lists' rows and the zero
    rows, scoring 0; all rows when they are fewer than ``k``, the exact fallback)."""
    centroids = index.centroids.double()  # [nlist, W], unit rows

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x / torch.sqrt(x.square().sum(-1, keepdim=True) + sparse_access.EPSILON)

    rows, queries = unit(memory), unit(keys)  # [B, N, W], [B, R, W]
    live = memory.square().sum(-1) != 0  # [B, N]
    to_lists, to_probes = rows @ centroids.T, queries @ centroids.T  # [B, N | R, nlist]
    probed = to_probes.topk(index.nprobe, dim=-1).indices  # [B, R, nprobe]
    in_probed = (to_lists.argmax(-1)[:, None, :, None] == probed[:, :, None, :]).any(-1)
    zero = (~live)[:, None].expand(-1, keys.shape[1], -1)  # [B, R, N]
    candidate = (in_probed & ~zero) | zero
    candidate |= candidate.sum(-1, keepdim=True) < k
    scores = (queries @ rows.transpose(1, 2)).masked_fill(zero, 0.0)
    return min(
        top_k_margin(to_lists[live], 1),
        top_k_margin(to_probes, index.nprobe),
        top_k_margin(scores.masked_fill(~candidate, -math.inf), k, exact=zero),
    )


@needs_native
@pytest.mark.skipif(not sparse_access.faiss_available(), reason="faiss not installed")
def test_ivf_index_finds_what_the_faiss_index_finds():
    """Approximate (nprobe < nlist) and with too few rows in the probed lists (exact fallback).

    The same algorithm in two float32 implementations (the kernel, FAISS's inner products): the
    same rows on any CPU when every ranking it makes has a margin above their rounding."""
    gen = torch.Generator().manual_seed(1)
    for N, live in ((4096, 4096), (4096, 3)):
        memory = torch.zeros(3, N, 16)
        memory[:, :live] = torch.randn(3, live, 16, generator=gen)
        keys = torch.randn(3, 8, 16, generator=gen)
        ivf, fai = sparse_access.IVFIndex(memory), sparse_access.FaissIndex(memory)
        assert (
            (ivf.nlist, ivf.nprobe) == (fai.nlist, fai.nprobe) == (64, sparse_access.FAISS_NPROBE)
        )
        assert _ivf_margin(ivf, memory, keys, 4) > RANK_MARGIN
        assert torch.equal(ivf.search(memory, keys, 4), fai.search(memory, keys, 4))
        rows = torch.randint(0, N, (3, 17), generator=gen)
        memory[torch.arange(3)[:, None], rows] = torch.randn(3, 17, 16, generator=gen)
        ivf.update(memory, rows)
        fai.update(memory, rows)
        assert _ivf_margin(ivf, memory, keys, 4) > RANK_MARGIN
        assert torch.equal(ivf.search(memory, keys, 4), fai.search(memory, keys, 4))


@needs_native
def test_sam_core_with_the_ivf_index_matches_exact_on_a_small_memory(torch_path):
    exact, ivf = _sam(index="exact"), _sam(index="ivf")
    assert ivf.index_kind == "ivf"
    ivf.load_state_dict(exact.state_dict())
    torch_path(False)
    y_i, s_i, g_i = _sam_grads(ivf)
    torch_path(True)
    y_e, s_e, g_e = _sam_grads(exact)
    torch.testing.assert_close(y_i, y_e, **TOL)
    # two searches (the IVF on float32 unit rows): the same rows while similarities of random
    # rows are further apart than float32 rounding, as the index tests check
    assert torch.equal(s_i.read_indices, s_e.read_indices)
    for a, b in zip(g_i, g_e, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@needs_native
@pytest.mark.parametrize("blocks", [False, True])
def test_sam_core_native_with_lru_blocks_and_a_starting_memory_without_grad(
    torch_path, monkeypatch, blocks
):
    """The block-minima LRU and the lazily zeroed gradient buffer (starting memory needs no
    gradient) give the torch path's outputs, states and parameter gradients, across resets."""
    from memagents.cores import sam

    monkeypatch.setattr(sam, "BLOCK_LRU_MIN_ROWS", 4 if blocks else 10**9)
    core = _sam(memory_size=11)

    def run():
        gen = torch.Generator().manual_seed(2)
        T, B = 9, 3
        x = torch.randn(T, B, core.input_size, generator=gen, dtype=torch.float64)
        x.requires_grad_(True)
        starts = torch.zeros(T, B)
        starts[3, 1] = starts[6, 0] = starts[6, 2] = 1.0
        y, s = core(x, core.initial_state(B), starts)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
        params = [p for p in core.parameters() if p.requires_grad]
        return y.detach(), s, torch.autograd.grad(loss, [x, *params])

    torch_path(False)
    y_n, s_n, g_n = run()
    torch_path(True)
    y_t, s_t, g_t = run()
    torch.testing.assert_close(y_n, y_t, **TOL)
    for a, b in zip(s_n.access, s_t.access, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
    for a, b in zip(g_n, g_t, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert (s_n.last_access > 0).all(-1).any()  # the memory filled: the LRU left the zero rows


def test_owned_copy_of_a_broadcast_zero_is_a_writable_zero_memory():
    zero = torch.zeros((), dtype=torch.float64).expand(2, 5, 3)
    assert sparse_access.is_zero_broadcast(zero)
    assert not sparse_access.is_zero_broadcast(torch.zeros(2, 5, 3))  # materialised: copied
    assert not sparse_access.is_zero_broadcast(torch.ones(()).expand(2, 5, 3))
    assert not sparse_access.is_zero_broadcast(torch.tensor(-0.0).expand(2, 5, 3))
    copy = sparse_access.owned_copy(zero)  # copies: bitwise
    assert copy.is_contiguous() and copy.dtype == torch.float64 and torch.equal(copy, zero)
    copy[1, 2] = 7.0  # writable, and the source is untouched
    assert zero.sum() == 0
    other = torch.randn(2, 5, 3)
    assert torch.equal(sparse_access.owned_copy(other), other)


def test_is_zero_broadcast_reads_one_element_without_materialising():
    huge = torch.zeros(()).expand(1 << 20, 1 << 20, 4)  # 16 TB if a reshape copied it
    assert sparse_access.is_zero_broadcast(huge)


@pytest.mark.parametrize("mmap_from", [1, 1 << 30])  # bytes: mapped memory / torch.zeros
def test_owned_copy_of_a_broadcast_zero_is_a_lazily_zeroed_base_tensor(monkeypatch, mmap_from):
    monkeypatch.setattr(sparse_access, "ZERO_BUFFER_MMAP_BYTES", mmap_from)
    zero = torch.zeros((), dtype=torch.float32).expand(3, 40, 5)
    copy = sparse_access.owned_copy(zero)
    assert copy._base is None and copy.is_contiguous() and copy.shape == (3, 40, 5)
    assert copy.dtype == torch.float32 and not copy.any()
    copy[1, 2, 3] = 7.0
    assert copy.sum() == 7.0 and zero.sum() == 0.0


@needs_native
@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_an_index_built_on_a_broadcast_zero_memory_equals_one_built_by_a_scan(kind):
    gen = torch.Generator().manual_seed(5)
    B, N, W = 2, 70, 4
    zero = torch.zeros(()).expand(B, N, W)
    lazy = sparse_access.make_index(kind, zero)
    memory = sparse_access.owned_copy(zero)
    scanned = sparse_access.make_index(kind, memory)
    keys = torch.randn(B, 3, W, generator=gen)
    # bitwise: the two indexes hold the same values (zeros, then the updated rows' norms from
    # the same function) and search with the same kernel
    if kind == "exact":
        assert torch.equal(lazy.sqnorm, scanned.sqnorm)
    assert torch.equal(lazy.search(memory, keys, 4), torch.arange(4).expand(B, 3, 4))
    rows = torch.randint(0, N, (B, 9), generator=gen)
    memory[torch.arange(B)[:, None], rows] = torch.randn(B, 9, W, generator=gen)
    for index in (lazy, scanned):
        index.update(memory, rows)
    assert torch.equal(lazy.search(memory, keys, 4), scanned.search(memory, keys, 4))


# -- the sequence node ----------------------------------------------------------------------------


def _warm_sam_state(core, B, seed):
    """A state after a few steps (memory written, read weights non-zero), detached, with its
    differentiable fields as leaves that require gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = torch.randn(5, B, core.input_size, generator=gen, dtype=torch.float64)
        _, s = core(x, core.initial_state(B))
    s = state_lib.map_state(lambda t: t.detach().clone(), s)
    access = s.access._replace(
        **{f: getattr(s.access, f).requires_grad_(True) for f in ("memory", "read_weights")}
    )
    h, c = (t.requires_grad_(True) for t in s.controller)
    return s._replace(
        controller=type(s.controller)(h, c),
        access=access,
        read_vectors=s.read_vectors.requires_grad_(True),
    )


@needs_native
@pytest.mark.parametrize("T", [1, 7])
def test_sam_sequence_node_equals_the_per_step_nodes(monkeypatch, T):
    """:class:`sam.SAMSequence` (the whole call, controller included, as one node) against
    :class:`sparse_access.SAMAccessStep` per step under autograd: outputs, the final state and
    the gradients of every parameter and differentiable state input (memory, read weights,
    controller, read vectors), with resets at step 0 and mid-sequence."""
    from memagents.cores import sam

    core = _sam(memory_size=11)
    B = 3
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(T, B, core.input_size, generator=gen, dtype=torch.float64)
    starts = torch.zeros(T, B)
    starts[0, 1] = 1.0
    if T > 1:
        starts[4, 0] = starts[4, 2] = 1.0
    s0 = _warm_sam_state(core, B, seed=22)
    leaves = [*s0.controller, s0.read_vectors, s0.access.memory, s0.access.read_weights]

    def run():
        core.zero_grad()
        for t in leaves:
            t.grad = None
        y, s = core(x, s0, starts)
        g = torch.Generator().manual_seed(5)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
        for t in (s.memory, s.read_weights, s.write_weights):
            loss = loss + (t * torch.randn(t.shape, generator=g, dtype=y.dtype)).sum()
        loss = loss + s.controller.c.square().sum() + s.read_vectors.sum()
        loss.backward()
        grads = [p.grad.clone() for p in core.parameters()]
        grads += [t.grad.clone() for t in leaves]
        return y.detach(), [t.detach() for t in state_lib.leaves(s)], grads

    calls = []
    monkeypatch.setattr(sam.SAMSequence, "apply", counting(sam.SAMSequence.apply, calls))
    seq = run()
    assert len(calls) == 1  # the sequence node ran
    monkeypatch.setattr(sam, "SEQUENCE_NODE", False)
    steps = run()
    assert len(calls) == 1
    torch.testing.assert_close(seq[0], steps[0], **TOL)
    for a, b in zip(seq[1], steps[1], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert len(seq[2]) == len(steps[2])
    for a, b in zip(seq[2], steps[2], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert all(g.abs().sum() > 0 for g in seq[2])  # every parameter and state input learns


@needs_native
def test_sam_sequence_node_gradcheck():
    """``gradcheck`` (float64) through the sequence node: the input, the starting memory and the
    controller state, across a reset."""
    from memagents.cores import sam

    core = _sam(memory_size=8, hidden_size=3, word_size=2, sparse_reads=2)
    B, T = 2, 4
    gen = torch.Generator().manual_seed(3)
    s0 = _warm_sam_state(core, B, seed=4)
    starts = torch.zeros(T, B)
    starts[2, 0] = 1.0
    x = torch.randn(T, B, core.input_size, generator=gen, dtype=torch.float64)
    calls = []

    def f(x, memory, h):
        state = s0._replace(
            controller=s0.controller._replace(h=h), access=s0.access._replace(memory=memory)
        )
        y, s = core(x, state, starts)
        return y, s.memory

    inputs = (
        x.requires_grad_(True),
        s0.access.memory.detach().clone().requires_grad_(True),
        s0.controller.h.detach().clone().requires_grad_(True),
    )
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sam.SAMSequence, "apply", counting(sam.SAMSequence.apply, calls))
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)
    assert calls


@needs_native
@pytest.mark.parametrize("backward", [True, False])
def test_sam_sequence_node_outputs_are_freed(backward):
    """No output of the sequence node is referenced from its own context (a cycle through the
    graph that nothing frees): every tensor of ``y`` and the new state dies with its last
    reference, whether or not backward ran."""
    core = _sam()
    gen = torch.Generator().manual_seed(43)
    x = torch.randn(5, 3, core.input_size, generator=gen, dtype=torch.float64)
    y, s = core(x, core.initial_state(3))
    assert type(y.grad_fn).__name__ == "SAMSequenceBackward"
    outputs = [y, *s.controller, s.read_vectors, *s.access]
    alive = [weakref.ref(t) for t in outputs]
    if backward:
        (y.sum() + s.memory.sum() + s.write_weights.sum() + s.read_weights.sum()).backward()
    del y, s, outputs
    gc.collect()
    assert [i for i, r in enumerate(alive) if r() is not None] == []


@needs_native
def test_sam_sequence_node_in_float32_matches_the_per_step_nodes(monkeypatch):
    """The float32 kernels of the sequence node (the LSTM cell's included) against the per-step
    path (torch's LSTM cell): same outputs and parameter gradients up to float32 rounding."""
    from memagents.cores import sam

    core = _sam(dtype=torch.float32, memory_size=11)
    T, B = 6, 3
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(T, B, core.input_size, generator=gen)
    starts = torch.zeros(T, B)
    starts[0, 0] = starts[3, 1] = 1.0

    def run():
        core.zero_grad()
        y, s = core(x, core.initial_state(B), starts)
        (y.square().sum() + s.memory.sum()).backward()
        return y.detach(), [p.grad.clone() for p in core.parameters()]

    seq = run()
    monkeypatch.setattr(sam, "SEQUENCE_NODE", False)
    steps = run()
    torch.testing.assert_close(seq[0], steps[0], atol=1e-5, rtol=1e-4)
    for a, b in zip(seq[1], steps[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
