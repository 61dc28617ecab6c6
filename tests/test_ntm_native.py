"""The fused NTM access step (:mod:`memagents.cores.ntm_access`): its C++ kernel and its torch
implementation against each other and against the plain-autograd reference (``fused=False``).

- one step: outputs and the gradients of every input (memory, both previous weightings, all raw
  head parameters) agree in float64 to ~1e-12, native vs torch vs the reference built from the
  :mod:`addressing` functions, for 1-3 head pairs and shifts 1-2 (including ``N = 2S + 1``, raw
  values past softplus' threshold, and the all-1e-6 fresh memory);
- a whole sequence with mid-sequence episode starts: outputs, final state and the gradients of the
  input, of a starting state and of every module parameter agree between the three paths;
- ``gradcheck`` of the native and torch backward in float64; float32 agreement;
- the kernel builds and loads whenever a C++ compiler is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HAS_NATIVE, INPUT_SIZE, build_core, needs_native, randomize_initial_state

from memagents.cores import native, ntm_access
from memagents.cores.ntm import NTMState
from memagents.cores.ntm_access import NTMAccessStep, head_sizes
from memagents.cores.rnn import LSTMState

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}

needs_kernel = needs_native


@pytest.fixture
def torch_path(monkeypatch):
    """Run :class:`NTMAccessStep` on its torch implementation (no kernel)."""
    monkeypatch.setattr(ntm_access, "_kernel", lambda: None)


def test_kernel_loads_when_a_compiler_exists():
    if not HAS_NATIVE:
        pytest.skip("no C++ compiler, or MEMAGENTS_NATIVE=0")
    lib = ntm_access._kernel()
    assert lib is not None, native._errors.get("ntm_access")
    assert lib.ntm_workspace_size_f64(5, 3, 2, 1) > 0


# -- one step ----------------------------------------------------------------------------------
def _step_inputs(B, N, W, H, S, seed=0, dtype=F64, scale=1.0, memory="random"):
    gen = torch.Generator().manual_seed(seed)
    P = sum(sum(s) for s in head_sizes(H, W, S))
    if memory == "fresh":
        mem = torch.full((B, N, W), 1e-6, dtype=dtype)
    else:
        mem = torch.randn(B, N, W, generator=gen, dtype=dtype)
    read = torch.softmax(torch.randn(B, H, N, generator=gen, dtype=dtype) * 2, -1)
    write = torch.softmax(torch.randn(B, H, N, generator=gen, dtype=dtype) * 2, -1)
    params = torch.randn(B, P, generator=gen, dtype=dtype) * scale
    return [t.requires_grad_() for t in (mem, read, write, params)]


def _reference_step(memory, read_prev, write_prev, params, H, S):
    """The plain-autograd access of ``NTMCore._access`` on the same raw parameters."""
    W, N = memory.shape[-1], memory.shape[1]
    core = build_core(
        "ntm",
        dtype=memory.dtype,
        hidden_size=1,
        memory_size=N,
        word_size=W,
        num_heads=H,
        max_shift=S,
        fused=False,
    )
    core.heads = _Constant(params)  # the access reads self.heads(h): return the raw row
    state = NTMState(
        controller=None,
        memory=memory,
        read_weights=read_prev,
        write_weights=write_prev,
        read_vectors=None,
    )
    return core._access(memory.new_zeros(memory.shape[0], 1), state)


class _Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, h):
        return self.value


def _outputs_and_grads(fn, inputs, seed=5):
    outs = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs], grads


STEP_CASES = [
    # B, N, W, H, S
    (3, 6, 4, 1, 1),
    (3, 7, 5, 2, 1),
    (2, 8, 3, 1, 2),
    (2, 5, 4, 2, 2),  # N = 2S + 1: every row is within reach of every shift
    (2, 9, 10, 3, 1),  # three head pairs: the erase product's "all others" terms
    (2, 3, 1, 1, 1),  # W = 1, N = 3
]


@pytest.mark.parametrize(("B", "N", "W", "H", "S"), STEP_CASES)
@pytest.mark.parametrize("case", ["random", "large", "fresh"])
def test_step_native_torch_and_reference_agree_in_float64(monkeypatch, B, N, W, H, S, case):
    """``large`` scales the raw parameters so that some β and γ pass softplus' threshold (20) and
    gates saturate; ``fresh`` starts from the constant 1e-6 memory of a new episode."""
    scale = 15.0 if case == "large" else 1.0
    memory = "fresh" if case == "fresh" else "random"
    inputs = _step_inputs(B, N, W, H, S, scale=scale, memory=memory)
    if case == "large":
        assert (inputs[3].abs() > 20).any()

    def fused(*xs):
        return NTMAccessStep.apply(*xs, H, S)

    def reference(*xs):
        return _reference_step(*xs, H, S)

    ref_out, ref_grads = _outputs_and_grads(reference, inputs)
    nat_out, nat_grads = _outputs_and_grads(fused, inputs)
    monkeypatch.setattr(ntm_access, "_kernel", lambda: None)
    tor_out, tor_grads = _outputs_and_grads(fused, inputs)
    names = ["memory", "write_weights", "read_weights", "read_vectors"]
    for name, r, n, t in zip(names, ref_out, nat_out, tor_out, strict=True):
        torch.testing.assert_close(n, r, **TIGHT, msg=lambda m, k=name: f"native {k}: {m}")
        torch.testing.assert_close(t, r, **TIGHT, msg=lambda m, k=name: f"torch {k}: {m}")
    grad_names = ["memory", "read_prev", "write_prev", "params"]
    tol = {"rtol": 1e-9, "atol": 1e-10} if case == "large" else TIGHT
    for name, r, n, t in zip(grad_names, ref_grads, nat_grads, tor_grads, strict=True):
        torch.testing.assert_close(n, r, **tol, msg=lambda m, k=name: f"native d{k}: {m}")
        torch.testing.assert_close(t, r, **tol, msg=lambda m, k=name: f"torch d{k}: {m}")


@needs_kernel
def test_step_takes_the_native_path_on_cpu():
    """The agreement above is not vacuous: the kernel runs (its forward saves a workspace)."""
    inputs = _step_inputs(2, 6, 4, 1, 1)
    outs = NTMAccessStep.apply(*inputs, 1, 1)
    node = outs[0].grad_fn
    assert node.native is True
    assert len(node.saved_tensors) == 8  # inputs, outputs and the kernel's workspace


@needs_kernel
@pytest.mark.parametrize(("H", "S"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_gradcheck_native_step(H, S):
    inputs = _step_inputs(2, 2 * S + 2, 3, H, S, seed=H + S)
    assert torch.autograd.gradcheck(
        lambda *xs: NTMAccessStep.apply(*xs, H, S), inputs, eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize(("H", "S"), [(1, 1), (2, 2)])
def test_gradcheck_torch_step(torch_path, H, S):
    inputs = _step_inputs(2, 2 * S + 2, 3, H, S, seed=10 + H + S)
    assert torch.autograd.gradcheck(
        lambda *xs: NTMAccessStep.apply(*xs, H, S), inputs, eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("path", ["native", "torch"])
def test_step_float32_agrees_with_the_float64_reference(monkeypatch, path):
    if path == "torch":
        monkeypatch.setattr(ntm_access, "_kernel", lambda: None)
    B, N, W, H, S = 4, 16, 8, 2, 1
    inputs64 = _step_inputs(B, N, W, H, S, seed=3)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    ref_out, ref_grads = _outputs_and_grads(lambda *xs: _reference_step(*xs, H, S), inputs64)
    out, grads = _outputs_and_grads(lambda *xs: NTMAccessStep.apply(*xs, H, S), inputs32)
    for a, b in zip([*out, *grads], [*ref_out, *ref_grads], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_no_grad_forward_equals_the_recording_forward():
    """Bitwise: the same kernel (or torch ops) on the same inputs; recording only saves more."""
    inputs = _step_inputs(3, 6, 4, 2, 1)
    recorded = NTMAccessStep.apply(*inputs, 2, 1)
    with torch.no_grad():
        plain = NTMAccessStep.apply(*inputs, 2, 1)
    for a, b in zip(recorded, plain, strict=True):
        assert torch.equal(a.detach(), b)


def test_step_rejects_a_parameter_row_of_the_wrong_size():
    mem, read, write, params = _step_inputs(2, 6, 4, 1, 1)
    with pytest.raises(ValueError, match="params"):
        NTMAccessStep.apply(mem, read, write, params[:, :-1], 1, 1)


def test_head_sizes_match_the_core_layout():
    core = build_core("ntm", num_heads=2, max_shift=2, word_size=3)
    read, write = head_sizes(2, 3, 2)
    assert core.heads.out_features == sum(read) + sum(write)
    assert read == [6, 2, 2, 10, 2] and write == [*read, 6, 6]


# -- whole sequences through the core ------------------------------------------------------------
def _sequence_grads(core, x, start_state, starts):
    y, final = core(x, start_state, starts)
    gen = torch.Generator().manual_seed(9)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    loss = loss + (final.memory * 0.3).sum() + (final.write_weights * final.read_weights).sum()
    leaves = [x, *_state_leaves(start_state), *core.parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return y.detach(), final, grads


def _state_leaves(state: NTMState) -> list[torch.Tensor]:
    return [*state.controller, *state[1:]]


def _start_state(core, B, seed=4):
    gen = torch.Generator().manual_seed(seed)
    H, N, W, Hd = core.num_heads, core.memory_size, core.word_size, core.hidden_size

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    state = NTMState(
        controller=LSTMState(rand(B, 1, Hd), rand(B, 1, Hd)),
        memory=rand(B, N, W),
        read_weights=torch.softmax(rand(B, H, N), -1),
        write_weights=torch.softmax(rand(B, H, N), -1),
        read_vectors=rand(B, H, W),
    )
    return NTMState(
        controller=LSTMState(*(t.requires_grad_() for t in state.controller)),
        **{k: getattr(state, k).requires_grad_() for k in NTMState._fields[1:]},
    )


#: The three fused paths: the whole sequence as one node (native), step by step with the native
#: access kernel, step by step with the torch implementation of the access.
PATHS = ["sequence", "steps", "torch"]


def _use_path(monkeypatch, path: str) -> None:
    if path == "steps":
        monkeypatch.setattr(ntm_access, "sequence_available", lambda *tensors: False)
    elif path == "torch":
        monkeypatch.setattr(ntm_access, "_kernel", lambda: None)


def _starts(pattern: str, T: int, B: int) -> torch.Tensor | None:
    starts = torch.zeros(T, B)
    if pattern == "none":
        return None
    if pattern == "mid":  # different elements at different steps, two at once at t = 4
        starts[2, 1] = starts[4, 0] = starts[4, 2] = 1.0
    elif pattern == "first":  # at t = 0 (the given state is replaced) and again later
        starts[0, 0] = starts[0, 2] = starts[3, 0] = 1.0
    elif pattern == "all":  # every element at the same step, twice in a row
        starts[T - 3] = starts[T - 2] = 1.0
    return starts


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("H", "S"), [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("pattern", ["mid", "first", "all", "none"])
def test_sequence_paths_agree_with_the_reference(monkeypatch, path, H, S, pattern):
    """Outputs, final state and gradients (input, starting state, every parameter) through a
    sequence in which elements start new episodes (the learned initial state), float64."""
    T, B = 7, 3
    fused = build_core(
        "ntm", dtype=F64, hidden_size=5, memory_size=7, word_size=4, num_heads=H, max_shift=S
    )
    randomize_initial_state(fused)
    with torch.no_grad():
        fused.heads.weight.mul_(10.0)  # away from the neutral initial heads: sharp, shifted
    reference = copy.deepcopy(fused)
    reference.fused = False
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, INPUT_SIZE, generator=gen, dtype=F64, requires_grad=True)
    starts = _starts(pattern, T, B)
    ref_y, ref_final, ref_grads = _sequence_grads(reference, x, _start_state(fused, B), starts)
    _use_path(monkeypatch, path)
    y, final, grads = _sequence_grads(fused, x, _start_state(fused, B), starts)
    torch.testing.assert_close(y, ref_y, **TIGHT)
    for a, b in zip(_state_leaves(final), _state_leaves(ref_final), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    names = ["x", "h", "c", "memory", "read_weights", "write_weights", "read_vectors"]
    names += [n for n, _ in fused.named_parameters()]
    initial = {"h0", "c0", "read0", "read_logits0", "write_logits0"}
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        if pattern == "none" and name in initial:
            assert g is None and r is None, name
            continue
        assert r.abs().max() > 0, name
        torch.testing.assert_close(
            g, r, rtol=1e-9, atol=1e-11, msg=lambda m, k=name: f"{path} d{k}: {m}"
        )


@needs_kernel
def test_fused_forward_runs_the_sequence_as_one_node(monkeypatch):
    core = build_core("ntm", dtype=F64)
    calls = []
    original = ntm_access.NTMSequence.apply

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(ntm_access.NTMSequence, "apply", spy)
    x = torch.randn(5, 2, INPUT_SIZE, dtype=F64, requires_grad=True)
    y, _ = core(x)
    assert calls == [(5, 2, 4 * core.hidden_size)]
    assert type(y.grad_fn).__name__ == "NTMSequenceBackward"
    _, _, debug = core(x, return_debug=True)  # debug tensors come from the step path
    assert len(calls) == 1 and debug["memory"].shape[0] == 5


@needs_kernel
@pytest.mark.parametrize(("H", "S"), [(1, 1), (2, 1)])
def test_gradcheck_native_sequence(H, S):
    """Every differentiable input of :class:`NTMSequence`, including the reset state, float64."""
    T, B, Hd, N, W = 3, 2, 2, 4, 2
    gen = torch.Generator().manual_seed(H)
    P = sum(sum(s) for s in head_sizes(H, W, S))

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).requires_grad_()

    def dist(*shape):
        return torch.softmax(torch.randn(*shape, generator=gen, dtype=F64), -1).requires_grad_()

    weights = [rand(T, B, 4 * Hd), rand(4 * Hd, Hd + H * W), rand(P, Hd, scale=2.0), rand(P)]
    start = [rand(B, Hd), rand(B, Hd), rand(B, H, W), rand(B, N, W), dist(B, H, N), dist(B, H, N)]
    init = [rand(B, Hd), rand(B, Hd), rand(B, H, W), rand(B, N, W), dist(B, H, N), dist(B, H, N)]
    starts = torch.tensor([[False, False], [False, True], [True, False]])

    def run(*inputs):
        return ntm_access.NTMSequence.apply(*inputs, starts, H, S, True)

    assert torch.autograd.gradcheck(run, (*weights, *start, *init), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_no_grad_sequence_equals_the_recording_sequence(monkeypatch, path):
    """Bitwise: with and without grad each path runs the same kernels on the same shapes and
    layouts (recording only saves more for the backward)."""
    _use_path(monkeypatch, path)
    core = build_core("ntm", dtype=F64)
    randomize_initial_state(core)
    x = torch.randn(6, 3, INPUT_SIZE, dtype=F64)
    starts = _starts("mid", 6, 3)
    y, final = core(x, None, starts)
    with torch.no_grad():
        y_plain, final_plain = core(x, None, starts)
    assert torch.equal(y.detach(), y_plain)
    for a, b in zip(_state_leaves(final), _state_leaves(final_plain), strict=True):
        assert torch.equal(a.detach(), b)


def test_fused_false_is_the_addressing_reference_path(monkeypatch):
    """``fused=False`` never touches the fused function."""
    core = build_core("ntm", fused=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a fused function called with fused=False")

    monkeypatch.setattr(NTMAccessStep, "apply", forbidden)
    monkeypatch.setattr(ntm_access.NTMSequence, "apply", forbidden)
    y, _ = core(torch.randn(3, 2, INPUT_SIZE))
    assert torch.isfinite(y).all()


@needs_kernel
def test_sequence_float32_native_agrees_with_the_reference():
    fused = build_core("ntm", hidden_size=8, memory_size=16, word_size=6, num_heads=2)
    randomize_initial_state(fused)
    reference = copy.deepcopy(fused)
    reference.fused = False
    x = torch.randn(12, 4, INPUT_SIZE)
    starts = torch.zeros(12, 4)
    starts[6, 1] = 1.0
    y_ref, _ = reference(x, None, starts)
    y, _ = fused(x, None, starts)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("B", "N", "W", "H", "S", "hidden"),
    [(1, 3, 1, 1, 1, 1), (2, 5, 3, 3, 2, 2), (4, 9, 2, 1, 4, 3)],
)
def test_sequence_at_edge_sizes_agrees_with_the_reference(B, N, W, H, S, hidden):
    """One element, one unit, one-wide words, N = 2S + 1, three head pairs."""
    fused = build_core(
        "ntm", dtype=F64, hidden_size=hidden, memory_size=N, word_size=W, num_heads=H, max_shift=S
    )
    randomize_initial_state(fused)
    reference = copy.deepcopy(fused)
    reference.fused = False
    T = 5
    x = torch.randn(T, B, INPUT_SIZE, dtype=F64, requires_grad=True)
    starts = torch.zeros(T, B)
    starts[3, 0] = 1.0
    ref_y, ref_final, ref_grads = _sequence_grads(reference, x, _start_state(fused, B), starts)
    y, final, grads = _sequence_grads(fused, x, _start_state(fused, B), starts)
    torch.testing.assert_close(y, ref_y, **TIGHT)
    for a, b in zip(_state_leaves(final), _state_leaves(ref_final), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
