"""Sparse memories that stay sparse inside RL (SAM and SDNC): rollout steps that hand the state
over (``forward_inplace``) write it in place and carry the kNN index, the LRU block minima and
the rows each episode wrote from one call to the next (``sparse_access.Carry``).

Exactness: a sequence split into T = 1 carried calls, with episode starts at t = 0 and in the
middle, gives the same outputs and states as one ``forward`` over the sequence (float64). The
carry is used only for the tensors it was built for, unmodified; the index it keeps finds what
a rebuilt one finds; and the inverted-file index's recall against exact search stays >= 0.95
after thousands of incremental writes at N = 65,536.
"""

from __future__ import annotations

import pytest
import torch

from memagents.cores import make, sparse_access, sparse_links
from memagents.cores import state as state_lib

pytestmark = pytest.mark.skipif(
    sparse_access._kernel() is None, reason="the carried path runs on the native kernels"
)

B, I, T = 5, 6, 40


def _core(name: str, memory_size: int, index: str):
    torch.manual_seed(0)
    core = make(
        name, input_size=I, hidden_size=8, memory_size=memory_size, word_size=4,
        num_reads=2, sparse_reads=3, index=index,
    )  # fmt: skip
    return core.double()


def _inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    starts = torch.rand(T, B, generator=gen) < 0.12
    starts[0] = True  # every element starts at t = 0 ...
    starts[T // 2, 1] = True  # ... and element 1 again mid-sequence, besides the random ones
    return x, starts.double()


def _assert_states_close(a, b, atol=1e-12):
    for (name, u), (_, v) in zip(state_lib.named_leaves(a), state_lib.named_leaves(b), strict=True):
        assert u.shape == v.shape, name
        torch.testing.assert_close(u.double(), v.double(), atol=atol, rtol=0, msg=name)


def _carry_of(name, state):
    """The carry kept for ``state`` (the tensors each core's carry vouches for)."""
    a = state.access
    fields = ("last_access",)
    if name == "sdnc":
        fields += ("link", "link_t", "link_indices", "link_t_indices")
    return sparse_access.Carry.find(a.memory, *(getattr(a, f) for f in fields))


def _outputs_and_grads(core, x, state, starts, seed):
    """One training call: outputs and the parameters' gradients of a random projection of
    them (float64)."""
    core.zero_grad(set_to_none=True)
    y, _ = core(x, state, starts)
    gen = torch.Generator().manual_seed(seed)
    (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum().backward()
    return y.detach(), [p.grad.clone() for p in core.parameters() if p.requires_grad]


CASES = [
    ("sam", 64, "exact"),
    ("sam", 300, "ivf"),
    ("sam", 4096, "ivf"),  # LRU through block minima
    ("sdnc", 64, "exact"),
    ("sdnc", 300, "ivf"),
    ("sdnc", 4096, "ivf"),
]


@pytest.mark.parametrize("name,memory_size,index", CASES)
def test_carried_steps_equal_one_forward(name, memory_size, index):
    core = _core(name, memory_size, index)
    x, starts = _inputs()
    with torch.no_grad():
        y_ref, state_ref = core(x, None, starts)
        state, ys, kept = core.initial_state(B), [], 0
        for t in range(T):
            before = state.access.memory
            y, state = core.forward_inplace(x[t : t + 1], state, starts[t : t + 1])
            kept += state.access.memory is before  # written in place: the carry was found
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys), y_ref, atol=1e-12, rtol=0)
    _assert_states_close(state, state_ref)
    assert kept == T - 1  # every call but the first (which starts from the broadcast zeros)


@pytest.mark.parametrize("name", ["sam", "sdnc"])
def test_carried_steps_through_the_policy_state_equal_forward(name):
    """Carried calls of several steps (T = 7) from a state that did not come from a carried
    call (a forward's result) also equal one forward."""
    core = _core(name, 300, "ivf")
    x, starts = _inputs(2)
    with torch.no_grad():
        y_ref, state_ref = core(x, None, starts)
        _, state = core(x[:5], None, starts[:5])
        ys = [y_ref[:5]]
        for t in range(5, T, 7):
            y, state = core.forward_inplace(x[t : t + 7], state, starts[t : t + 7])
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys), y_ref, atol=1e-12, rtol=0)
    _assert_states_close(state, state_ref)


@pytest.mark.parametrize("name", ["sam", "sdnc"])
def test_a_state_modified_elsewhere_is_not_carried(name):
    """A memory written outside the core (version counter moved) rebuilds its carry: the index
    then sees the new rows, as a plain forward from that state does."""
    core = _core(name, 300, "ivf")
    x, starts = _inputs(3)
    with torch.no_grad():
        _, state = core.forward_inplace(x[:10], None, starts[:10])
        _, state = core.forward_inplace(x[10:11], state, starts[10:11])
        memory = state.access.memory
        assert _carry_of(name, state) is not None
        gen = torch.Generator().manual_seed(4)
        memory[:, :50] = torch.randn(B, 50, 4, generator=gen, dtype=torch.float64)
        reference_state = state_lib.map_state(torch.clone, state)
        y_ref, s_ref = core(x[11:], reference_state, starts[11:])
        y, s = core.forward_inplace(x[11:], state, starts[11:])
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    _assert_states_close(s, s_ref)


@pytest.mark.parametrize("name", ["sam", "sdnc"])
def test_dirty_rows_cover_the_nonzero_rows(name):
    """Invariant of the carry: every non-zero memory row is marked dirty (an episode start
    zeroes only dirty rows), and a restarting element's memory is all zero afterwards."""
    core = _core(name, 300, "ivf")
    x, starts = _inputs(5)
    state = None
    with torch.no_grad():
        for t in range(T):
            _, state = core.forward_inplace(x[t : t + 1], state, starts[t : t + 1])
            memory = state.access.memory
            carry = sparse_access.Carry.kept(memory)
            nonzero = (memory != 0).any(-1)
            assert carry.known.all()  # (from an initial memory: every element's rows tracked)
            assert not (nonzero & ~carry.dirty).any()
            if name == "sdnc":  # every link row that is not empty is marked as rewritten
                a = state.access
                empty = sparse_links.initial_link_indices(B, 300, core.temporal_reads)
                for k, (vals, idx) in enumerate(
                    ((a.link, a.link_indices), (a.link_t, a.link_t_indices))
                ):
                    changed = (vals != 0).any(-1) | (idx.long() != empty).any(-1)
                    assert not (changed & ~carry.link_rows[k]).any()
    restart = torch.zeros(1, B)
    restart[0, 2] = 1
    with torch.no_grad():
        _, state = core.forward_inplace(x[:1], state, restart)
    # after one step from a cleared memory, only the rows that step wrote can be non-zero
    rows = state.access.write_indices[2].long()
    written = torch.zeros(300, dtype=torch.bool)
    written[rows] = True
    assert not ((state.access.memory[2] != 0).any(-1) & ~written).any()


def test_ivf_recall_after_thousands_of_incremental_writes():
    """The inverted-file index kept up to date write by write (as a carried rollout keeps it)
    finds >= 95% of the exact top-K rows at N = 65,536, and the same rows as an index rebuilt
    from the final memory."""
    N, W, K, J, steps = 65_536, 16, 4, 17, 4000
    gen = torch.Generator().manual_seed(0)
    memory = torch.zeros(2, N, W)
    index = sparse_access.make_index("ivf", memory.expand(2, N, W) * 0)
    assert isinstance(index, sparse_access.IVFIndex)
    for step in range(steps):
        rows = torch.randint(0, N, (2, J), generator=gen)
        values = torch.randn(2, J, W, generator=gen)
        if step % 10 == 0:  # an erased row now and then (the LRU row is zeroed)
            values[:, -1] = 0
        memory.scatter_(1, rows[..., None].expand(-1, -1, W), values)
        index.update(memory, rows)
    keys = torch.randn(2, 512, W, generator=gen)
    exact = sparse_access.ExactIndex(memory).search(memory, keys, K)
    found = index.search(memory, keys, K)
    recall = (exact.unsqueeze(-1) == found.unsqueeze(-2)).any(-1).float().mean().item()
    assert recall >= 0.95, recall
    rebuilt = sparse_access.make_index("ivf", memory).search(memory, keys, K)
    assert torch.equal(found, rebuilt)


def test_ivf_clear_empties_only_the_given_elements():
    N, W = 1000, 8
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(3, N, W, generator=gen)
    index = sparse_access.make_index("ivf", memory)
    memory[1] = 0
    index.clear(memory, torch.tensor([1]))
    keys = torch.randn(3, 4, W, generator=gen)
    fresh = sparse_access.make_index("ivf", memory)
    assert torch.equal(index.search(memory, keys, 3), fresh.search(memory, keys, 3))
    # element 1 is all zero: its k lowest rows (score 0)
    assert index.search(memory, keys, 3)[1].tolist() == [[0, 1, 2]] * 4


@pytest.mark.parametrize(
    "name,memory_size,index",
    [("sam", 300, "ivf"), ("sam", 64, "exact"), ("sam", 4096, "ivf"), ("sdnc", 4096, "ivf")],
)
def test_training_call_with_restarts_matches_the_per_step_nodes(
    monkeypatch, name, memory_size, index
):
    """A training call whose sequence node zeroes only the rows a restarting episode wrote
    (forward) and only the rows its steps touched (backward), and finds the LRU row through
    block minima (N >= 4,096), gives the outputs and parameter gradients of the per-step nodes,
    which zero whole memories and scan for the LRU row: restarts at t = 0 (every element) and
    mid-sequence, from a used state, loss on the outputs only."""
    from memagents.cores import sam, sdnc

    core = _core(name, memory_size, index)
    x, starts = _inputs(6)
    with torch.no_grad():
        _, state = core(x, None, starts)  # a used memory to start from

    y_seq, g_seq = _outputs_and_grads(core, x, state, starts, 7)
    monkeypatch.setattr(sam if name == "sam" else sdnc, "SEQUENCE_NODE", False)
    y_ref, g_ref = _outputs_and_grads(core, x, state, starts, 7)
    torch.testing.assert_close(y_seq, y_ref, atol=1e-12, rtol=0)
    for a, b in zip(g_seq, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert all(g.abs().sum() > 0 for g in g_seq)


@pytest.mark.parametrize("name", ["sam", "sdnc"])
@pytest.mark.parametrize("memory_size,index", [(64, "exact"), (300, "ivf"), (4096, "ivf")])
def test_peek_gives_forward_and_leaves_the_carried_state_as_it_was(name, memory_size, index):
    """``peek`` on a carried state (a rollout's bootstrap value) returns ``forward``'s output,
    with a restarting element among them, and then the state (memory, links, last-access steps,
    index, LRU blocks) is what it was: the next carried steps equal the reference."""
    core = _core(name, memory_size, index)
    x, starts = _inputs(8)
    with torch.no_grad():
        y_ref, state_ref = core(x, None, starts)
        state = None
        for t in range(20):
            _, state = core.forward_inplace(x[t : t + 1], state, starts[t : t + 1])
        before = state_lib.map_state(torch.clone, state)
        peek_starts = torch.zeros(1, B)
        peek_starts[0, 3] = 1  # one element restarts in the peeked step
        probe = torch.randn(
            1, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
        )
        y_peek = core.peek(probe, state, peek_starts)
        y_fwd, _ = core(probe, before, peek_starts)
        assert _carry_of(name, state) is not None  # still valid for the state
        for (field, a), (_, b) in zip(
            state_lib.named_leaves(state), state_lib.named_leaves(before), strict=True
        ):
            assert torch.equal(a, b), field
        ys = []
        for t in range(20, T):
            y, state = core.forward_inplace(x[t : t + 1], state, starts[t : t + 1])
            ys.append(y)
    torch.testing.assert_close(y_peek, y_fwd, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(ys), y_ref[20:], atol=1e-12, rtol=0)
    _assert_states_close(state, state_ref)


@pytest.mark.parametrize("name", ["sam", "sdnc"])
@pytest.mark.parametrize("from_used", [True, False])
def test_restart_shortcuts_give_the_full_restart(monkeypatch, name, from_used):
    """Every element restarting at t = 0 (then some mid-sequence): starting from the initial
    state instead of the given one (``_restarts_whole``), and skipping the zeroing of an initial
    memory and links at t = 0 (``fresh``), give the outputs and parameter gradients of the full
    restart (float64; training call through the sequence node, loss on the outputs)."""
    core = _core(name, 300, "ivf")
    x, starts = _inputs(10)
    starts[0] = 1
    state = None
    if from_used:
        with torch.no_grad():
            _, state = core(x, None, starts)

    y_fast, g_fast = _outputs_and_grads(core, x, state, starts, 11)
    monkeypatch.setattr(type(core), "_restarts_whole", lambda self, state, starts: False)
    if name == "sdnc":
        monkeypatch.setattr(type(core), "_is_initial_access", lambda self, a: False)
    y_ref, g_ref = _outputs_and_grads(core, x, state, starts, 11)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-12, rtol=0)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["sam", "sdnc"])
def test_snapshot_equals_the_state_and_stays_as_it_was(name):
    """``snapshot`` of a carried state (a rollout buffer's start state, copied from the rows the
    episodes wrote) equals the state, and the carried steps that follow leave it unchanged."""
    core = _core(name, 300, "ivf")
    x, starts = _inputs(12)
    with torch.no_grad():
        state = None
        for t in range(15):
            _, state = core.forward_inplace(x[t : t + 1], state, starts[t : t + 1])
        snap = core.snapshot(state)
        reference = state_lib.map_state(torch.clone, state)
        for t in range(15, T):
            _, state = core.forward_inplace(x[t : t + 1], state, starts[t : t + 1])
    assert state.access.memory is not snap.access.memory
    for (field, a), (_, b) in zip(
        state_lib.named_leaves(snap), state_lib.named_leaves(reference), strict=True
    ):
        assert torch.equal(a, b), field


def test_a_debug_training_call_with_restarts_has_the_gradients_of_the_sequence_node():
    """``return_debug`` under autograd runs the per-step nodes, whose backward zeroes a
    restarting element's whole gradient: the forward must then restart the memory whole as
    well (not only its written rows), or the gradients would differ from the sequence node's."""
    core = _core("sam", 300, "ivf")
    x, starts = _inputs(13)
    with torch.no_grad():
        _, state = core(x, None, starts)
    y_ref, g_ref = _outputs_and_grads(core, x, state, starts, 14)
    core.zero_grad(set_to_none=True)
    y, _, _ = core(x, state, starts, return_debug=True)
    gen = torch.Generator().manual_seed(14)
    (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum().backward()
    torch.testing.assert_close(y.detach(), y_ref, atol=1e-12, rtol=0)
    grads = [p.grad for p in core.parameters() if p.requires_grad]
    for a, b in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
