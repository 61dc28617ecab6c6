"""SDNC (Rae et al. 2016, supplementary): SAM's sparse access plus sparse temporal links.

The core contract (shapes, resets, step = unroll, batch independence, pack/unpack) is checked for
``sdnc`` and its variants by ``test_cores_contract.py``; SAM's sparse access by ``test_sam.py``.
This file checks the read-weight support, the sparse links against the dense DNC's, the link
read modes, resets and gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PATH_TOL, build_core, randomize_initial_state

from memagents.cores import addressing, sparse_links
from memagents.cores import state as state_lib
from memagents.cores.sdnc import SDNCCore

B = 3


def _core(dtype=torch.float32, **kw) -> SDNCCore:
    sizes = {
        "hidden_size": 6,
        "memory_size": 12,
        "word_size": 3,
        "num_reads": 2,
        "sparse_reads": 3,
        "temporal_reads": 3,
    }
    sizes.update(kw)
    core = build_core("sdnc", dtype=dtype, **sizes)
    randomize_initial_state(core)
    return core


def _x(T, batch=B, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, batch, 3, generator=gen, dtype=dtype)


def _random_memory_state(core, batch, seed=3):
    gen = torch.Generator().manual_seed(seed)
    s0 = core.initial_state(batch)
    memory = torch.randn(s0.memory.shape, generator=gen, dtype=s0.memory.dtype)
    return s0._replace(access=s0.access._replace(memory=memory))


def _empty_links(batch, N, KL, dtype=torch.float64):
    idx = sparse_links.initial_link_indices(batch, N, KL).contiguous()
    zeros = torch.zeros(batch, N, KL, dtype=dtype)
    prec = (torch.zeros(batch, KL, dtype=dtype), sparse_links.initial_precedence_indices(batch, KL))
    return [zeros.clone(), zeros.clone(), idx.clone(), idx.clone(), *prec]


def _link_step(links, write_w, write_idx, read_idx=None):
    """One :class:`SparseLinkStep` (in place on ``links``) and the precedence update."""
    link, link_t, link_idx, link_t_idx, prec, prec_idx = links
    if read_idx is None:
        read_idx = torch.zeros(write_idx.shape[0], 1, dtype=torch.long)
    out = sparse_links.SparseLinkStep.apply(
        link, link_t, write_w, prec, link_idx, link_t_idx, write_idx, prec_idx, read_idx,
        torch.zeros(0, dtype=torch.long), False,
    )  # fmt: skip
    prec, prec_idx = sparse_links.sparse_precedence_update(prec, prec_idx, write_w, write_idx)
    return [out[0], out[1], link_idx, link_t_idx, prec, prec_idx], out[2:]


def _dense(values, indices, N):
    return sparse_links.to_dense(values, indices, N)


# -- read weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_read_weight_support_is_k_content_rows_plus_k_forward_and_k_backward(index):
    """Content part: exactly K non-zeros summing to 1. Each link part: K entries ≥ 0 summing to
    ≤ 1. The mixed w^R = π_b b + π_c c + π_f f: between K and 3K non-zero rows (containing the
    content rows), summing to ≤ 1."""
    N, K, R = 12, 3, 2
    core = _core(index=index)
    T = 8
    _, _, debug = core(_x(T), _random_memory_state(core, B), return_debug=True)
    content, content_idx = debug["content_weights"], debug["content_indices"].long()
    assert content.shape == (T, B, R, K)
    assert (content > 0).all()
    torch.testing.assert_close(content.sum(-1), torch.ones(T, B, R))
    dense_c = _dense(content, content_idx, N)
    assert ((dense_c != 0).sum(-1) == K).all()

    for mode in ("forward", "backward"):
        w = debug[f"{mode}_weights"]
        assert w.shape == (T, B, R, K)
        assert (w >= 0).all() and (w.sum(-1) <= 1 + 1e-6).all()
    assert debug["forward_weights"][1:].sum() > 0  # the links are used after the first write

    modes = debug["read_modes"]  # [T, B, R, 3]: backward, content, forward
    read_w, read_idx = debug["read_weights"], debug["read_indices"].long()
    assert read_w.shape == (T, B, R, 3 * K)
    torch.testing.assert_close(read_w[..., K : 2 * K], modes[..., 1:2] * content)
    torch.testing.assert_close(read_w[..., :K], modes[..., :1] * debug["backward_weights"])
    torch.testing.assert_close(read_w[..., 2 * K :], modes[..., 2:] * debug["forward_weights"])
    dense = _dense(read_w, read_idx, N)
    support = (dense != 0).sum(-1)
    assert ((support >= K) & (support <= 3 * K)).all()
    assert (dense[dense_c != 0] > 0).all()  # the content rows are in the support
    assert (dense.sum(-1) <= 1 + 1e-6).all()


def test_read_vector_is_the_mixed_weighting_applied_to_the_memory():
    core = _core()
    _, _, debug = core(_x(5), _random_memory_state(core, B), return_debug=True)
    dense = _dense(debug["read_weights"], debug["read_indices"].long(), 12)  # [T, B, R, N]
    expected = torch.einsum("tbrn,tbnw->tbrw", dense, debug["memory"])
    torch.testing.assert_close(debug["read_vectors"], expected)


# -- sparse links ----------------------------------------------------------------------------------


def test_link_rows_keep_at_most_k_l_distinct_off_diagonal_entries_in_unit_range():
    N, KL = 12, 3
    core = _core(temporal_reads=KL)
    _, _, debug = core(_x(10, seed=4), _random_memory_state(core, B), return_debug=True)
    rows = torch.arange(N).view(1, 1, N, 1)
    for name in ("link", "link_t"):
        values, idx = debug[name], debug[f"{name}_indices"].long()  # [T, B, N, K_L]
        assert values.shape[-1] == KL
        assert ((values >= 0) & (values <= 1)).all(), name
        assert (idx != rows).all(), name  # zero diagonal
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), name  # distinct columns
        dense = _dense(values, idx, N)
        assert (dense.diagonal(dim1=-2, dim2=-1) == 0).all()
        assert ((dense != 0).sum(-1) <= KL).all()
        assert (dense.sum(-1) <= 1 + 1e-6).all()  # rows of L (and of Lᵀ: columns of L) sum ≤ 1
    assert debug["link"][-1].sum() > 0
    prec = debug["precedence"]
    assert (prec >= 0).all() and (prec.sum(-1) <= 1 + 1e-6).all()
    for shape in core.state_shapes().values():  # no N×N anywhere
        assert shape.count(N) <= 1


def test_scripted_one_hot_writes_give_the_dense_dnc_forward_links():
    """Writes to a -> b -> c: L[b, a] = L[c, b] = 1 and nothing else, as the dense DNC's."""
    N, KL, (a, b, c) = 6, 2, (4, 1, 3)
    links = _empty_links(1, N, KL)
    dense_link = torch.zeros(1, 1, N, N, dtype=torch.float64)
    dense_prec = torch.zeros(1, 1, N, dtype=torch.float64)
    for slot in (a, b, c):
        w = torch.ones(1, 1, dtype=torch.float64)
        links, _ = _link_step(links, w, torch.tensor([[slot]]))
        w_dense = torch.nn.functional.one_hot(torch.tensor([[slot]]), N).to(torch.float64)
        dense_link = addressing.link_update(dense_link, w_dense, dense_prec)
        dense_prec = addressing.precedence_update(dense_prec, w_dense)
    L = _dense(links[0], links[2], N)[0]
    Lt = _dense(links[1], links[3], N)[0]
    expected = torch.zeros(N, N, dtype=torch.float64)
    expected[b, a] = expected[c, b] = 1.0
    torch.testing.assert_close(L, expected)
    torch.testing.assert_close(L, dense_link[0, 0])
    torch.testing.assert_close(Lt, expected.T)  # backward links a <- b, b <- c
    torch.testing.assert_close(_dense(links[4], links[5], N)[0], dense_prec[0, 0])


def test_soft_writes_match_the_dense_dnc_while_no_row_is_truncated():
    """Random soft writes to 2 rows per step for 3 steps (≤ 6 rows ever written, K_L = 6): the
    sparse L, Lᵀ and p equal the dense DNC's exactly."""
    N, KL, batch = 8, 6, 4
    gen = torch.Generator().manual_seed(0)
    links = _empty_links(batch, N, KL)
    dense_link = torch.zeros(batch, 1, N, N, dtype=torch.float64)
    dense_prec = torch.zeros(batch, 1, N, dtype=torch.float64)
    rows = torch.stack([torch.randperm(N, generator=gen)[:6] for _ in range(batch)]).view(-1, 3, 2)
    for t in range(3):
        idx = rows[:, t]
        w = torch.rand(batch, 2, generator=gen, dtype=torch.float64) * 0.45
        links, _ = _link_step(links, w, idx)
        w_dense = torch.zeros(batch, N, dtype=torch.float64).scatter_add(1, idx, w).unsqueeze(1)
        dense_link = addressing.link_update(dense_link, w_dense, dense_prec)
        dense_prec = addressing.precedence_update(dense_prec, w_dense)
        torch.testing.assert_close(_dense(links[0], links[2], N), dense_link[:, 0])
        torch.testing.assert_close(_dense(links[1], links[3], N), dense_link[:, 0].transpose(1, 2))
        torch.testing.assert_close(_dense(links[4], links[5], N), dense_prec[:, 0])


def test_truncated_links_keep_the_strongest_entries():
    """Writes 0 (weight 0.9), 1 (0.1), then 2 (1.0) with K_L = 1: the precedence keeps only
    row 0 (0.81 > 0.1), so row 2 of L links to row 0 alone."""
    N, KL = 6, 1
    links = _empty_links(1, N, KL)
    for slot, weight in ((0, 0.9), (1, 0.1), (2, 1.0)):
        links, _ = _link_step(
            links, torch.tensor([[weight]], dtype=torch.float64), torch.tensor([[slot]])
        )
    L = _dense(links[0], links[2], N)[0]
    # p before writing row 2: (1 - 0.1)·0.9 at row 0 = 0.81 and 0.1 at row 1
    assert links[2][0, 2].tolist() == [0]
    torch.testing.assert_close(L[2, 0], torch.tensor(0.81, dtype=torch.float64))
    assert (L[2, 1] == 0).all()


# -- forward / backward read modes -----------------------------------------------------------------


def _replay_core(mode: int, K: int = 1):
    """A core whose interface ignores the controller: read mode ``mode`` (0 backward, 1
    content, 2 forward) with weight ~1, write gate ~0 (no writes that matter)."""
    core = _core(torch.float64, sparse_reads=K, num_reads=1, temporal_reads=2)
    R, W = 1, 3
    with torch.no_grad():
        core.interface.weight.zero_()
        bias = torch.zeros_like(core.interface.bias)
        gates = R * W + W + R
        bias[gates] = -40.0  # α ≈ 0
        bias[gates + 2 + mode] = 40.0  # π[mode] ≈ 1
        core.interface.bias.copy_(bias)
    return core


@pytest.mark.parametrize(("mode", "order"), [(2, [1, 2, 3]), (0, [2, 1, 0])])
def test_forward_and_backward_read_modes_replay_the_written_sequence(mode, order):
    """Rows 7 -> 2 -> 5 -> 9 written in that order; a read that starts on the first (last) row
    replays the rest in order (in reverse) through the forward (backward) links."""
    N, seq = 12, [7, 2, 5, 9]
    core = _replay_core(mode)
    links = _empty_links(1, N, 2)
    for slot in seq:
        links, _ = _link_step(links, torch.ones(1, 1, dtype=torch.float64), torch.tensor([[slot]]))
    s0 = core.initial_state(1)
    memory = torch.randn(1, N, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = seq[0] if mode == 2 else seq[-1]
    read_w = torch.zeros(1, 1, 3, dtype=torch.float64)
    read_w[..., 1] = 1.0  # the content slot on the start row
    read_idx = torch.zeros(1, 1, 3, dtype=torch.float64)
    read_idx[..., 1] = start
    last_access = torch.full((1, N), 100.0, dtype=torch.float64)
    last_access[0, 0] = 0.0  # the LRU row (erased every step) is outside the sequence
    access = s0.access._replace(
        memory=memory,
        last_access=last_access,
        read_weights=read_w,
        read_indices=read_idx,
        link=links[0],
        link_t=links[1],
        link_indices=links[2].to(torch.float64),
        link_t_indices=links[3].to(torch.float64),
        precedence=links[4],
        precedence_indices=links[5].to(torch.float64),
    )
    _, _, debug = core(
        torch.zeros(3, 1, 3, dtype=torch.float64), s0._replace(access=access), return_debug=True
    )
    expected_rows = [seq[i] for i in order]
    torch.testing.assert_close(
        debug["read_vectors"][:, 0, 0], memory[0, expected_rows], atol=1e-9, rtol=0
    )
    key = "forward" if mode == 2 else "backward"
    assert debug[f"{key}_indices"][:, 0, 0, 0].long().tolist() == expected_rows


# -- resets ----------------------------------------------------------------------------------------


def test_after_a_reset_no_read_returns_content_or_links_of_the_previous_episode():
    core = _core()
    T, T1 = 10, 6
    x = _x(T, seed=5)
    starts = torch.zeros(T, B)
    starts[T1] = 1.0
    y, _, debug = core(x, None, starts, return_debug=True)
    y_fresh, _, debug_fresh = core(x[T1:], None, return_debug=True)
    torch.testing.assert_close(y[T1:], y_fresh)
    for key in ("read_weights", "read_indices", "link", "link_indices", "link_t", "precedence"):
        torch.testing.assert_close(debug[key][T1:], debug_fresh[key], msg=key)
    # every link after the reset joins rows written after the reset
    written = set()
    for t in range(T1, T):
        written |= set(debug["write_indices"][t, 0].long().tolist())
        linked = debug["link"][t, 0] > 0
        rows = linked.any(-1).nonzero().flatten().tolist()
        cols = debug["link_indices"][t, 0][linked].long().tolist()
        assert set(rows) | set(cols) <= written
        # a read row is one written in this episode, or an empty (all-zero) row
        read = debug["read_weights"][t, 0] > 0
        for row in set(debug["read_indices"][t, 0][read].long().tolist()) - written:
            assert (debug["memory"][t, 0, row] == 0).all()


# -- gradients and state -----------------------------------------------------------------------------


def test_gradcheck_of_the_sparse_link_step():
    N, KL, batch = 5, 2, 2
    gen = torch.Generator().manual_seed(0)
    links = _empty_links(batch, N, KL)
    # positive entries everywhere (no ties at 0 that a perturbation could reorder)
    links[0] = torch.rand(batch, N, KL, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    links[1] = torch.rand(batch, N, KL, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    links[4] = torch.rand(batch, KL, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    write_w = torch.rand(batch, 3, generator=gen, dtype=torch.float64) * 0.3
    write_idx = torch.tensor([[2, 2, 4], [1, 0, 3]])
    read_idx = torch.tensor([[2, 0], [3, 3]])

    def run(link, link_t, w, prec):
        out = sparse_links.SparseLinkStep.apply(
            link.clone(), link_t.clone(), w, prec, links[2].clone(), links[3].clone(),
            write_idx, links[5], read_idx, torch.tensor([1]), True,
        )  # fmt: skip
        return out[0], out[1], out[2], out[4]

    inputs = [t.clone().requires_grad_(True) for t in (links[0], links[1], write_w, links[4])]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_of_the_core_through_steps_and_a_reset():
    core = _core(
        torch.float64, hidden_size=3, memory_size=6, word_size=2, num_reads=1, sparse_reads=2,
        temporal_reads=2,
    )  # fmt: skip
    T, batch = 4, 2
    x = _x(T, batch, dtype=torch.float64, seed=7).requires_grad_(True)
    s0 = _random_memory_state(core, batch, seed=8)
    memory = s0.memory.clone().requires_grad_(True)
    starts = torch.zeros(T, batch)
    starts[2, 1] = 1.0

    def run(x_in, memory_in):
        state = s0._replace(access=s0.access._replace(memory=memory_in))
        y, s = core(x_in, state, starts)
        return y, s.memory, s.link, s.link_t, s.read_weights, s.precedence

    assert torch.autograd.gradcheck(run, (x, memory), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fused_and_dense_memory_steps_agree_in_outputs_and_gradients():
    fused, dense = _core(torch.float64), _core(torch.float64, fused=False)
    dense.load_state_dict(fused.state_dict())
    x = _x(6, dtype=torch.float64, seed=9)
    starts = torch.zeros(6, B)
    starts[3, 2] = 1.0
    s0 = state_lib.map_state(lambda t: t.detach().clone(), _random_memory_state(fused, B))
    grads = []
    for core in (fused, dense):
        core.zero_grad()
        y, s = core(x, s0, starts)
        (y.square().sum() + s.link.sum()).backward()
        grads.append([p.grad.clone() for p in core.parameters() if p.grad is not None])
        grads[-1].insert(0, y.detach())
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_pack_unpack_round_trip_is_exact_and_continues_the_run():
    """The round trip is bitwise (copies and views); the run continued from the unpacked state
    agrees up to float32 rounding: its leaves are views with other strides and alignment, for
    which a library matmul may take another kernel (as in ``test_cores_contract.py``)."""
    core = _core()
    x = _x(8, seed=11)
    _, s = core(x[:5], _random_memory_state(core, B))
    flat = core.pack_state(s)
    assert flat.shape == (B, core.state_size)
    s2 = core.unpack_state(flat)
    for a, b in zip(state_lib.leaves(s), state_lib.leaves(s2), strict=True):
        assert torch.equal(a, b)
    y1, _ = core(x[5:], s)
    y2, _ = core(x[5:], s2)
    torch.testing.assert_close(y2, y1, **PATH_TOL)


def test_forward_does_not_modify_the_state_it_is_given():
    core = _core()
    s0 = _random_memory_state(core, B)
    _, s = core(_x(3), s0)
    snapshot = [t.clone() for t in state_lib.leaves(s)]
    core(_x(4, seed=2), s)
    for a, b in zip(snapshot, state_lib.leaves(s), strict=True):
        assert torch.equal(a, b)  # untouched: bitwise


@pytest.mark.parametrize("bad", [6.0, -1.0, float("nan")])
@pytest.mark.parametrize(
    "field",
    ["read_indices", "write_indices", "link_indices", "link_t_indices", "precedence_indices"],
)
def test_a_state_with_rows_outside_the_memory_is_rejected(field, bad):
    """The native kernels index memory and links with the state's rows unchecked: a corrupted
    state must raise a clear error instead of reading or writing out of bounds (it crashed the
    process before); an element reset at step 0 may hold anything."""
    core = SDNCCore(input_size=3, hidden_size=8, memory_size=6, word_size=4, num_reads=2)
    state = core.initial_state(2)
    value = getattr(state.access, field).clone()
    value[1].view(-1)[0] = bad
    corrupt = state._replace(access=state.access._replace(**{field: value}))
    x = torch.randn(2, 2, 3)
    with pytest.raises(
        ValueError, match=rf"state\.access\.{field} must hold row indices in \[0, 6\)"
    ):
        core(x, corrupt)
    starts = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    y_bad, _ = core(x, corrupt, starts)
    y_ok, _ = core(x, state, starts)
    # bitwise: after the reset both runs compute on the same values with the same kernels (row
    # indices only select rows and links; they enter no floating-point arithmetic)
    assert torch.equal(y_bad, y_ok)
