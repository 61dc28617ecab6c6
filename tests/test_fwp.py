"""The fast-weight core ``"fwp"`` (Schlag et al. 2021; chunk form of Yang et al. 2024).

The contract every core meets (shapes, resets, step = unroll, batch independence, pack/unpack) is
checked here on all four rule x feature-map variants and on both execution paths, since
``tests/test_cores_contract.py`` only sees the default variant. Beyond the contract: the step form
and the chunk-parallel form agree with resets inside chunks and a ragged last chunk; the delta rule
and DPFP match numbers computed by hand from the papers' formulas; bad kwargs raise ValueError.

The two hand-written autograd Functions are checked against plain autograd in float64 (~1e-10,
values and gradients of every input): the slow-net heads (:func:`slow_net_heads`, native kernel
and torch path, step and chunk layout, zero keys and exact zeros) against ``sum_normalise(dpfp(·))``
etc., and the chunk form (:func:`fast_weight_chunked`) against the step recurrence, with episode
starts inside chunks, on chunk boundaries and at the last step; both are ``gradcheck``-ed, and the
kernel must load whenever a C++ compiler is present.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from conftest import HAS_NATIVE

import memagents.cores as cores
from memagents.cores import fwp, native
from memagents.cores import state as state_lib
from memagents.cores.fwp import (
    FWPCore,
    FWPState,
    dpfp,
    elu1,
    fast_weight_chunked,
    fast_weight_step,
    slow_net_heads,
    sum_normalise,
)

UPDATES = ("sum", "delta")
FEATURE_MAPS = ("elu1", "dpfp")
VARIANTS = list(itertools.product(UPDATES, FEATURE_MAPS))
VARIANT_IDS = [f"{u}-{f}" for u, f in VARIANTS]

I, B = 5, 3  # input size, batch size
TOL = {"rtol": 1e-5, "atol": 1e-6}  # two float32 paths over a few steps
PATHS_TOL = {"rtol": 1e-4, "atol": 1e-4}  # the issue's 1e-4 between step and chunk form


def make(update="delta", feature_map="dpfp", chunk_size=4, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    kwargs = {"hidden_size": 6, "num_heads": 2, "key_size": 3, **kw}
    core = cores.make(
        "fwp",
        input_size=I,
        update=update,
        feature_map=feature_map,
        chunk_size=chunk_size,
        **kwargs,
    )
    return core.to(dtype)


def step_twin(core: FWPCore) -> FWPCore:
    """The same core (same parameters) in the step form, ``chunk_size = 1``."""
    twin = cores.make(
        "fwp",
        input_size=core.input_size,
        hidden_size=core.output_size,
        num_heads=core.num_heads,
        key_size=core.key_size,
        update=core.update,
        feature_map=core.feature_map,
        chunk_size=1,
        dpfp_nu=core.dpfp_nu,
    ).to(core.slow.weight.dtype)
    twin.load_state_dict(core.state_dict())
    return twin


def inputs(T, batch=B, seed=0, dtype=torch.float32, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(T, batch, I, generator=gen, dtype=dtype)


def random_state(core, batch=B, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *core.state_shapes()["fast_weights"])
    return FWPState(torch.randn(shape, generator=gen, dtype=core.slow.weight.dtype))


def no_starts(T, batch=B):
    return torch.zeros(T, batch)


# -- shapes, state layout, registry --------------------------------------------------------------


@pytest.mark.parametrize(("update", "feature_map"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_shapes_and_state_layout(update, feature_map, chunk_size):
    core = make(update, feature_map, chunk_size, key_size=3, dpfp_nu=2)
    d_phi = 3 * 2 * 2 if feature_map == "dpfp" else 3  # 2 d_key ν, or d_key
    assert core.feature_size == d_phi
    assert core.state_shapes() == {"fast_weights": (2, 3, d_phi)}  # [H, d_v, d_φ]
    assert core.state_size == 2 * 3 * d_phi
    x = inputs(7)
    y, s = core(x)
    assert y.shape == (7, B, 6)
    assert s.fast_weights.shape == (B, 2, 3, d_phi)
    assert torch.isfinite(y).all()
    init = core.initial_state(B)
    assert isinstance(init, FWPState)
    assert not init.fast_weights.any()  # fast weights start each episode at zero


def test_registered_as_fwp_with_the_issue_kwargs():
    assert cores.REGISTRY["fwp"] is FWPCore
    assert cores.core_kwargs("fwp") == [
        "hidden_size",
        "num_heads",
        "key_size",
        "update",
        "feature_map",
        "chunk_size",
        "dpfp_nu",
    ]


def test_sum_rule_has_no_learning_rate_parameters():
    """β exists only for the delta rule: the sum rule's slow net has no unused outputs."""
    H, d = 2, 3
    assert make("sum").slow.out_features == 2 * H * d + H * d  # [k | q], v
    assert make("delta").slow.out_features == 2 * H * d + H * d + H  # [k | q], v, β


# -- the reset rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(("update", "feature_map"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_back_to_back_episodes_equal_each_episode_alone(update, feature_map, chunk_size):
    """Episode 2 starts mid-chunk (chunk_size 3: at step 5) and the run starts from a random
    state with a start flag at step 0."""
    core = make(update, feature_map, chunk_size)
    x1, x2 = inputs(5, seed=1), inputs(4, seed=2)
    y1, _ = core(x1)
    y2, s2 = core(x2)
    starts = no_starts(9)
    starts[0] = 1.0
    starts[5] = 1.0
    y, s = core(torch.cat([x1, x2]), random_state(core), starts)
    torch.testing.assert_close(y[:5], y1, **TOL)
    torch.testing.assert_close(y[5:], y2, **TOL)
    torch.testing.assert_close(s.fast_weights, s2.fast_weights, **TOL)


@pytest.mark.parametrize("update", UPDATES)
def test_resets_at_different_steps_per_element(update):
    core = make(update, chunk_size=4)
    T = 10
    x = inputs(T, seed=3)
    reset_at = [2, 5, 9]  # inside chunk 0, inside chunk 1, the last step of a ragged chunk
    starts = no_starts(T)
    for b, t in enumerate(reset_at):
        starts[t, b] = 1.0
    y, s = core(x, random_state(core), starts)
    for b, t in enumerate(reset_at):
        y_alone, s_alone = core(x[t:])
        torch.testing.assert_close(y[t:, b], y_alone[:, b], **TOL)
        torch.testing.assert_close(s.fast_weights[b], s_alone.fast_weights[b], **TOL)


# -- stepping equals unrolling; the two paths agree ----------------------------------------------


@pytest.mark.parametrize(("update", "feature_map"), VARIANTS, ids=VARIANT_IDS)
def test_core_step_equals_one_unrolled_call(update, feature_map):
    core = make(update, feature_map, chunk_size=3)
    T = 7
    x = inputs(T, seed=5)
    starts = no_starts(T)
    starts[4, 1] = 1.0
    s0 = random_state(core)
    y_full, s_full = core(x, s0, starts)
    state, ys, initial = s0, [], core.initial_state(B)
    for t in range(T):
        state = state_lib.reset_where(state, initial, starts[t].bool())
        y_t, state = core.step(x[t], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys), y_full, **TOL)
    torch.testing.assert_close(state.fast_weights, s_full.fast_weights, **TOL)


@pytest.mark.parametrize(("update", "feature_map"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunk_form_equals_step_form_with_resets_inside_chunks(update, feature_map, chunk_size):
    """float32, T = 37 (not a multiple of the chunk), resets in the middle of chunks, at chunk
    boundaries, twice in one chunk and at the last step, from a random starting state."""
    torch.manual_seed(0)
    core = make(update, feature_map, chunk_size, hidden_size=8, num_heads=3, key_size=4)
    twin = step_twin(core)
    T, batch = 37, 4
    x = inputs(T, batch, seed=6)
    starts = no_starts(T, batch)
    starts[[5, 6, 30], 0] = 1.0  # mid-chunk, twice in a row
    starts[[16, 36], 1] = 1.0  # a chunk boundary (C = 4, 16) and the last step
    starts[[2, 9, 11], 2] = 1.0  # two starts inside one chunk of 16
    # element 3 never resets
    s0 = random_state(core, batch, seed=7)
    y_chunk, s_chunk = core(x, s0, starts)
    y_step, s_step = twin(x, s0, starts)
    torch.testing.assert_close(y_chunk, y_step, **PATHS_TOL)
    torch.testing.assert_close(s_chunk.fast_weights, s_step.fast_weights, **PATHS_TOL)
    # without any episode_starts (the unmasked chunk path)
    y_chunk, s_chunk = core(x, s0)
    y_step, s_step = twin(x, s0)
    torch.testing.assert_close(y_chunk, y_step, **PATHS_TOL)
    torch.testing.assert_close(s_chunk.fast_weights, s_step.fast_weights, **PATHS_TOL)


@pytest.mark.parametrize("update", UPDATES)
def test_chunk_function_equals_step_function_on_long_sequences(update):
    """The functional forms at the benchmark's chunk size, two chunks and a ragged third."""
    gen = torch.Generator().manual_seed(8)
    T, batch, H, Dk, Dv = 150, 2, 2, 6, 5
    k = sum_normalise(elu1(torch.randn(T, batch, H, Dk, generator=gen)))
    q = sum_normalise(elu1(torch.randn(T, batch, H, Dk, generator=gen)))
    v = torch.randn(T, batch, H, Dv, generator=gen)
    beta = torch.rand(T, batch, H, generator=gen)
    W0 = torch.randn(batch, H, Dv, Dk, generator=gen)
    starts = torch.zeros(T, batch, dtype=torch.bool)
    starts[100, 0] = True
    y_c, W_c = fast_weight_chunked(W0, k, v, q, beta, starts, 64, update)
    W, ys = W0, []
    for t in range(T):
        W = torch.where(starts[t].view(-1, 1, 1, 1), 0.0, W)
        y, W = fast_weight_step(W, k[t], v[t], q[t], beta[t], update)
        ys.append(y)
    torch.testing.assert_close(y_c, torch.stack(ys), **PATHS_TOL)
    torch.testing.assert_close(W_c, W, **PATHS_TOL)


def test_one_step_calls_equal_one_unrolled_call():
    """T = 1 calls (rollouts) run the step form and continue the chunk form's state."""
    core = make("delta", chunk_size=3)
    T = 6
    x = inputs(T, seed=9)
    starts = no_starts(T)
    starts[3, 0] = 1.0
    s0 = random_state(core)
    y_full, s_full = core(x, s0, starts)
    state, ys = s0, []
    for t in range(T):
        y_t, state = core(x[t : t + 1], state, starts[t : t + 1])
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys), y_full, **TOL)
    torch.testing.assert_close(state.fast_weights, s_full.fast_weights, **TOL)


def test_return_debug_runs_the_step_form_and_matches_the_state():
    core = make("delta", chunk_size=4)
    x = inputs(5, seed=10)
    y, _ = core(x)
    y_d, s_d, debug = core(x, return_debug=True)
    torch.testing.assert_close(y_d, y, **TOL)
    assert set(debug) == {"fast_weights", "key", "query", "value", "beta"}
    assert debug["fast_weights"].shape == (5, B, *core.state_shapes()["fast_weights"])
    assert torch.equal(debug["fast_weights"][-1], s_d.fast_weights)  # the same values
    assert ((debug["beta"] > 0) & (debug["beta"] < 1)).all()
    # keys and queries are sum-normalised: non-negative with unit L1 norm, except DPFP features
    # that are all zero (with ν = 1, keys whose signs alternate: r_j r_{j+1} = 0 for every j)
    for name in ("key", "query"):
        assert (debug[name] >= 0).all()
        sums = debug[name].sum(-1)
        assert torch.isclose(sums, torch.ones_like(sums)).logical_or(sums == 0).all()
    _, _, debug = make("delta", "elu1")(x, return_debug=True)
    for name in ("key", "query"):
        torch.testing.assert_close(debug[name].sum(-1), torch.ones(5, B, 2))
    assert "beta" not in make("sum")(x, return_debug=True)[2]


# -- batch independence, pack / unpack -----------------------------------------------------------


@pytest.mark.parametrize("update", UPDATES)
def test_batch_elements_do_not_leak_into_each_other(update):
    """Bitwise on any CPU: both runs are the same kernels on the same shapes and layouts (the
    chunk form applies resets as masks, so element 0's extra start changes no shape), and every
    library call treats elements as independent rows or blocks, whose arithmetic cannot depend
    on another element's values. (The contract test's tolerance is for lstm/gru, whose calls a
    reset splits.)"""
    core = make(update, chunk_size=4)
    T = 9
    x = inputs(T, seed=11)
    starts = no_starts(T)
    starts[6, 2] = 1.0
    s0 = random_state(core)
    y, s = core(x, s0, starts)
    x_p, starts_p = x.clone(), starts.clone()
    x_p[:, 0] += 5.0
    starts_p[2, 0] = 1.0
    y_p, s_p = core(x_p, s0, starts_p)
    assert not torch.equal(y_p[:, 0], y[:, 0])
    assert torch.equal(y_p[:, 1:], y[:, 1:])
    assert torch.equal(s_p.fast_weights[1:], s.fast_weights[1:])


def test_pack_unpack_round_trip_and_continuation():
    """The round trip is bitwise (copies and views); the continued runs agree to ``TOL``: the
    two starting states hold the same values in other layouts (``mid``'s is a view into the
    chunk form's state buffer), for which a library matmul may take another kernel."""
    core = make("delta", chunk_size=4)
    x = inputs(9, seed=12)
    _, mid = core(x[:5])
    flat = core.pack_state(mid)
    assert flat.shape == (B, core.state_size)
    back = core.unpack_state(flat.clone())
    assert torch.equal(back.fast_weights, mid.fast_weights)
    assert torch.equal(core.pack_state(back), flat)
    y_a, s_a = core(x[5:], mid)
    y_b, s_b = core(x[5:], back)
    torch.testing.assert_close(y_b, y_a, **TOL)
    torch.testing.assert_close(s_b.fast_weights, s_a.fast_weights, **TOL)


# -- numerical gradients (float64) ---------------------------------------------------------------


@pytest.mark.parametrize(("update", "feature_map"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("chunk_size", [1, 2])
def test_gradcheck_wrt_input_and_starting_state(update, feature_map, chunk_size):
    """Through both paths, a reset inside a chunk (step 3 of chunks of 2) and a ragged chunk."""
    core = make(update, feature_map, chunk_size, dtype=torch.float64, hidden_size=2, key_size=2)
    T, batch = 5, 2
    x = inputs(T, batch, seed=13, dtype=torch.float64).requires_grad_(True)
    W0 = random_state(core, batch, seed=14).fast_weights.requires_grad_(True)
    starts = no_starts(T, batch)
    starts[3, 1] = 1.0

    def run(x_in, w_in):
        y, s = core(x_in, FWPState(w_in), starts)
        return y, s.fast_weights

    assert torch.autograd.gradcheck(run, (x, W0), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_parameters_receive_gradients_in_the_chunk_form():
    core = make("delta", chunk_size=4)
    y, _ = core(inputs(7, seed=15))
    y.square().sum().backward()
    for name, p in core.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- the formulas by hand ------------------------------------------------------------------------


def test_delta_rule_one_scripted_step_matches_the_hand_computed_matrix():
    """W' = W + β (v - W k) kᵀ with W = [[1, 2], [0, 1]], k = [0.5, 0.5], v = [3, 1], β = 0.5:
    W k = [1.5, 0.5]; β (v - W k) = [0.75, 0.25]; outer with k = [[.375, .375], [.125, .125]];
    y = W' q with q = [1, 0]."""
    W = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    k = torch.tensor([0.5, 0.5]).view(1, 1, 2)
    v = torch.tensor([3.0, 1.0]).view(1, 1, 2)
    q = torch.tensor([1.0, 0.0]).view(1, 1, 2)
    beta = torch.tensor([[0.5]])
    W_expected = torch.tensor([[1.375, 2.375], [0.125, 1.125]])
    y_expected = torch.tensor([1.375, 0.125])

    y, W_new = fast_weight_step(W, k, v, q, beta, "delta")
    torch.testing.assert_close(W_new.view(2, 2), W_expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(y.view(2), y_expected, rtol=0, atol=1e-7)
    # the chunk form (one chunk of one step) gives the same
    y_c, W_c = fast_weight_chunked(
        W, k.unsqueeze(0), v.unsqueeze(0), q.unsqueeze(0), beta.unsqueeze(0), None, 64, "delta"
    )
    torch.testing.assert_close(W_c.view(2, 2), W_expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_c.view(2), y_expected, rtol=0, atol=1e-6)
    # the sum rule ignores β and only adds: W + v kᵀ
    _, W_sum = fast_weight_step(W, k, v, q, beta, "sum")
    torch.testing.assert_close(W_sum.view(2, 2), torch.tensor([[2.5, 3.5], [0.5, 1.5]]))


def test_delta_rule_two_steps_in_one_chunk_match_hand_computation():
    """Two delta steps from W = 0 within one chunk (the WY/UT path with a nonzero A):
    step 1: k = [1, 0], v = [2], β = 0.5 -> W = [[1, 0]];
    step 2: k = [0.5, 0.5], v = [4], β = 1: W k = 0.5, W += (4 - 0.5) [0.5, 0.5] -> [[2.75, 1.75]].
    Reads with q = [0, 1]: y_1 = 0, y_2 = 1.75."""
    k = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(2, 1, 1, 2)
    v = torch.tensor([[2.0], [4.0]]).view(2, 1, 1, 1)
    q = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(2, 1, 1, 2)
    beta = torch.tensor([0.5, 1.0]).view(2, 1, 1)
    y, W = fast_weight_chunked(torch.zeros(1, 1, 1, 2), k, v, q, beta, None, 2, "delta")
    torch.testing.assert_close(W.view(2), torch.tensor([2.75, 1.75]))
    torch.testing.assert_close(y.view(2), torch.tensor([0.0, 1.75]))


def test_dpfp_dimension_and_values_by_hand():
    """k = [1, 2, -3]: r = ReLU([k, -k]) = [1, 2, 0, 0, 0, 3] (2 d_key = 6 entries).
    ν = 1: r_j r_{j+1} = [1·2, 2·0, 0·0, 0·0, 0·3, 3·1] = [2, 0, 0, 0, 0, 3].
    ν = 2 appends r_j r_{j+2} = [1·0, 2·0, 0·0, 0·3, 0·1, 3·2] = [0, 0, 0, 0, 0, 6]."""
    k = torch.tensor([1.0, 2.0, -3.0])
    nu1 = torch.tensor([2.0, 0, 0, 0, 0, 3])
    nu2 = torch.cat([nu1, torch.tensor([0.0, 0, 0, 0, 0, 6])])
    assert dpfp(k, 1).shape == (6,)  # d_φ = 2 d_key ν
    assert dpfp(k, 2).shape == (12,)
    # exact on any CPU: products of small integers
    torch.testing.assert_close(dpfp(k, 1), nu1, rtol=0, atol=0)
    torch.testing.assert_close(dpfp(k, 2), nu2, rtol=0, atol=0)
    # sum normalisation: divide by the sum (5 and 11)
    torch.testing.assert_close(sum_normalise(dpfp(k, 1)), nu1 / 5.0)
    torch.testing.assert_close(sum_normalise(dpfp(k, 2)), nu2 / 11.0)
    # batched input keeps the leading axes
    assert dpfp(torch.randn(4, 2, 3), 2).shape == (4, 2, 12)
    # a feature vector of all zeros stays zero instead of 0 / 0
    zero = sum_normalise(dpfp(torch.tensor([0.0, 0.0]), 1))
    assert torch.equal(zero, torch.zeros(4))


def test_elu1_features_are_positive_and_sum_normalised():
    x = torch.tensor([-1.0, 0.0, 2.0])
    phi = elu1(x)
    torch.testing.assert_close(phi, torch.tensor([torch.exp(torch.tensor(-1.0)).item(), 1.0, 3.0]))
    torch.testing.assert_close(sum_normalise(phi), phi / phi.sum())


# -- construction errors -------------------------------------------------------------------------

BAD_KWARGS = [
    ({"hidden_size": 0}, "hidden_size", "0"),
    ({"num_heads": -1}, "num_heads", "-1"),
    ({"key_size": 2.5}, "key_size", "2.5"),
    ({"chunk_size": 0}, "chunk_size", "0"),
    ({"chunk_size": True}, "chunk_size", "True"),
    ({"update": "hebb"}, "update", "'hebb'"),
    ({"feature_map": "softmax"}, "feature_map", "'softmax'"),
    ({"dpfp_nu": 0}, "dpfp_nu", "0"),
    ({"key_size": 2, "dpfp_nu": 4}, "dpfp_nu", "4"),  # ν ≤ 2 d_key - 1 = 3
]


@pytest.mark.parametrize(
    ("kwargs", "field", "value"), BAD_KWARGS, ids=[f"{f}={v}" for _, f, v in BAD_KWARGS]
)
def test_bad_kwargs_raise_value_error_naming_them(kwargs, field, value):
    with pytest.raises(ValueError) as info:
        cores.make("fwp", input_size=3, **kwargs)
    message = str(info.value)
    assert field in message and value in message


def test_value_errors_list_the_allowed_choices():
    with pytest.raises(ValueError, match="'sum', 'delta'"):
        cores.make("fwp", input_size=3, update="hebb")
    with pytest.raises(ValueError, match="'elu1', 'dpfp'"):
        cores.make("fwp", input_size=3, feature_map="relu")
    with pytest.raises(ValueError, match=re.escape("1 .. 2 * key_size - 1 = 3")):
        cores.make("fwp", input_size=3, key_size=2, dpfp_nu=9)
    with pytest.raises(ValueError, match="input_size"):
        cores.make("fwp", input_size=0)


# -- the hand-written autograd Functions against plain autograd (float64) ------------------------

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
HAS_KERNEL = HAS_NATIVE  # conftest: the loader would build the kernel here


def test_heads_kernel_loads_when_a_compiler_exists():
    if not HAS_KERNEL:
        pytest.skip("no C++ compiler ($CXX or c++), or MEMAGENTS_NATIVE=0")
    assert fwp._heads_kernel() is not None, native._errors.get("fwp_heads")


@pytest.fixture(params=["native", "torch"])
def heads_path(request, monkeypatch):
    """Run :func:`slow_net_heads` on its C++ kernel or on its torch implementation."""
    if request.param == "native":
        if not HAS_KERNEL:
            pytest.skip("no C++ compiler, or MEMAGENTS_NATIVE=0")
    else:
        monkeypatch.setattr(fwp, "_heads_kernel", lambda: None)
    return request.param


def reference_heads(z, H, Dk, Dv, feature_map, nu, delta):
    """The slow-net heads under plain autograd, from the reference feature maps."""
    kq, v, *b = z.split([2 * H * Dk, H * Dv] + ([H] if delta else []), dim=-1)
    phi = (lambda x: dpfp(x, nu)) if feature_map == "dpfp" else elu1
    k = sum_normalise(phi(kq[..., : H * Dk].unflatten(-1, (H, Dk))))
    q = sum_normalise(phi(kq[..., H * Dk :].unflatten(-1, (H, Dk))))
    return k, q, v.unflatten(-1, (H, Dv)), (torch.sigmoid(b[0]) if delta else None)


def heads_input(T, batch, H, Dk, Dv, delta, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(T, batch, 2 * H * Dk + H * Dv + (H if delta else 0), generator=gen)
    z = z.to(F64)
    z[0, 0, :Dk] = 0.0  # an all-zero key: the zero DPFP feature, the clamped normalisation
    z[1, -1, H * Dk + 1 : H * Dk + 3] = 0.0  # exact zeros in a query: ReLU at 0
    z[2 % T, 0, 2 * H * Dk :] = 25.0  # β = σ(25) ≈ 1 - 1e-11
    return z.requires_grad_(True)


HEADS_CASES = [
    ("dpfp", 1, True),
    ("dpfp", 1, False),
    ("dpfp", 2, True),
    ("elu1", 1, True),
    ("elu1", 1, False),
]


@pytest.mark.parametrize(("feature_map", "nu", "delta"), HEADS_CASES)
@pytest.mark.parametrize("chunk_size", [None, 3, 4, 64], ids=["steps", "C3", "C4", "C64"])
def test_slow_net_heads_equal_plain_autograd(heads_path, feature_map, nu, delta, chunk_size):
    """Outputs and the gradient wrt ``z`` (random upstream gradients into every output), in the
    step layout and in the chunk layout (T = 7: ragged with C = 3 and 4, one padded chunk
    with C = 64)."""
    T, batch, H, Dk, Dv = 7, 3, 2, 3, 2
    z = heads_input(T, batch, H, Dk, Dv, delta)
    ref = reference_heads(z, H, Dk, Dv, feature_map, nu, delta)
    out = slow_net_heads(z, H, Dk, Dv, feature_map, nu, delta, chunk_size)
    if chunk_size is not None:  # the reference in chunk layout, zero padded
        C = min(chunk_size, T)
        N = -(-T // C)
        ref = [fwp._rows_to_chunks(a, N, C) for a in ref[:3]] + [
            fwp._rows_to_chunks(ref[3].unsqueeze(-1), N, C) if delta else None
        ]
    assert (out[3] is None) == (not delta)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(a.shape, generator=gen, dtype=F64) for a in ref if a is not None]
    for got, want in zip(out, ref, strict=True):
        if want is not None:
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **TIGHT)
    (dz,) = torch.autograd.grad([o for o in out if o is not None], z, grads)
    (dz_ref,) = torch.autograd.grad([r for r in ref if r is not None], z, grads)
    torch.testing.assert_close(dz, dz_ref, **TIGHT)
    key_00 = out[0][0, 0, 0] if chunk_size is None else out[0][0, 0]  # step 0, element 0, head 0
    assert (not key_00.any()) == (feature_map == "dpfp")  # the zero key has the zero feature
    if chunk_size is not None and T % min(chunk_size, T):
        C = min(chunk_size, T)
        for a in out:
            if a is not None:  # padded steps are zero
                assert not a.view(-1, batch, H, C, a.shape[-1])[-1, :, :, T % C :].any()


@pytest.mark.parametrize(("feature_map", "nu", "delta"), HEADS_CASES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_slow_net_heads_gradcheck(heads_path, feature_map, nu, delta, chunk_size):
    T, batch, H, Dk, Dv = 3, 2, 2, 2, 2
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(T, batch, 2 * H * Dk + H * Dv + (H if delta else 0), generator=gen, dtype=F64)
    z.requires_grad_(True)

    def run(z_in):
        out = slow_net_heads(z_in, H, Dk, Dv, feature_map, nu, delta, chunk_size)
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradcheck(run, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.skipif(not HAS_KERNEL, reason="no C++ compiler, or MEMAGENTS_NATIVE=0")
@pytest.mark.parametrize("chunk_size", [None, 64])
def test_slow_net_heads_native_equals_torch_path_in_float32(monkeypatch, chunk_size):
    z = heads_input(70, 4, 4, 16, 16, True).detach().float().requires_grad_(True)
    args = (4, 16, 16, "dpfp", 1, True, chunk_size)
    out = slow_net_heads(z, *args)
    grads = [torch.randn_like(o) for o in out]
    (dz,) = torch.autograd.grad(out, z, grads)
    monkeypatch.setattr(fwp, "_heads_kernel", lambda: None)
    out_t = slow_net_heads(z, *args)
    (dz_t,) = torch.autograd.grad(out_t, z, grads)
    for a, b in zip(out, out_t, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, dz_t, rtol=1e-5, atol=1e-5)


def step_reference(W0, k, v, q, beta, starts, update):
    """The step recurrence under plain autograd, resetting where ``starts``."""
    W, ys = W0, []
    for t in range(k.shape[0]):
        if starts is not None:
            W = torch.where(starts[t].view(-1, 1, 1, 1), 0.0, W)
        y, W = fast_weight_step(W, k[t], v[t], q[t], beta[t], update)
        ys.append(y)
    return torch.stack(ys), W


def chunk_inputs(T, batch, H, d_phi, Dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = sum_normalise(dpfp(torch.randn(T, batch, H, d_phi // 2, generator=gen, dtype=F64)))
    k[3 % T, 0, 0] = 0.0  # a zero key (DPFP of an all-zero or sign-alternating key)
    q = sum_normalise(elu1(torch.randn(T, batch, H, d_phi, generator=gen, dtype=F64)))
    v = torch.randn(T, batch, H, Dv, generator=gen, dtype=F64)
    beta = torch.rand(T, batch, H, generator=gen, dtype=F64)
    beta[0, 0, 0] = 1.0  # β at its bound (a projection: I - k kᵀ / kᵀk scaled)
    W0 = torch.randn(batch, H, Dv, d_phi, generator=gen, dtype=F64)
    return [a.requires_grad_(True) for a in (W0, k, v, q, beta)]


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8, 64])
@pytest.mark.parametrize("with_starts", [True, False], ids=["starts", "no-starts"])
@pytest.mark.parametrize("part", [None, 1, 3], ids=["whole", "part1", "part3"])
def test_chunk_function_equals_step_recurrence_in_float64(
    monkeypatch, update, chunk_size, with_starts, part
):
    """Values and gradients of ``W0, k, v, q, β`` (random upstream gradients into the outputs
    and the final state), T = 21: ragged for C = 4, 8; one padded chunk for C = 64. ``part``:
    the backward's C x C blocks in parts of 1 or 3 of the 4 elements (as for large batches)."""
    T, batch, H, d_phi, Dv = 21, 4, 2, 6, 3
    if part is not None:
        C = min(chunk_size, T)
        monkeypatch.setattr(fwp, "CACHE_FLOATS", part * H * 2 * C * C)
    W0, k, v, q, beta = chunk_inputs(T, batch, H, d_phi, Dv)
    starts = None
    if with_starts:
        starts = torch.zeros(T, batch, dtype=torch.bool)
        starts[[5, 6, 13], 0] = True  # mid-chunk, twice in a row
        starts[[8, 20], 1] = True  # a chunk boundary (C = 4, 8) and the last step
        starts[[0, 9, 11], 2] = True  # step 0, and twice inside one chunk
        # element 3 never resets
    y, W = fast_weight_chunked(W0, k, v, q, beta, starts, chunk_size, update)
    y_ref, W_ref = step_reference(W0, k, v, q, beta, starts, update)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(W, W_ref, **TIGHT)
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    gW = torch.randn(W.shape, generator=gen, dtype=F64)
    inputs = (W0, k, v, q, beta) if update == "delta" else (W0, k, v, q)
    grads = torch.autograd.grad((y * gy).sum() + (W * gW).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (W_ref * gW).sum(), inputs)
    for name, got, want in zip("W0 k v q beta".split(), grads, grads_ref, strict=False):
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("with_starts", [True, False], ids=["starts", "no-starts"])
def test_chunk_function_gradcheck(update, with_starts):
    T, batch, H, d_phi, Dv = 7, 2, 1, 4, 2
    W0, k, v, q, beta = chunk_inputs(T, batch, H, d_phi, Dv, seed=4)
    starts = None
    if with_starts:
        starts = torch.zeros(T, batch, dtype=torch.bool)
        starts[[2, 4], 1] = True  # two starts inside one chunk of 3... and across

    def run(*args):
        return fast_weight_chunked(*args, starts, 3, update)

    assert torch.autograd.gradcheck(run, (W0, k, v, q, beta), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not HAS_KERNEL, reason="no C++ compiler, or MEMAGENTS_NATIVE=0")
@pytest.mark.parametrize("update", UPDATES)
def test_core_native_heads_equal_torch_heads_in_float64(monkeypatch, update):
    """The whole chunk-form core (slow net into the chunk layout, chunk form, output layer):
    outputs, final state and every parameter's gradient, native heads vs torch heads."""
    core = make(update, "dpfp", chunk_size=4, dtype=F64, hidden_size=5, key_size=3)
    T = 11
    x = inputs(T, seed=16, dtype=F64)
    starts = no_starts(T)
    starts[6, 1] = 1.0

    def run():
        core.zero_grad(set_to_none=True)
        y, s = core(x, random_state(core, seed=17), starts)
        (y.square().sum() + s.fast_weights.sum()).backward()
        return y.detach(), s.fast_weights.detach(), [p.grad for p in core.parameters()]

    y, W, grads = run()
    monkeypatch.setattr(fwp, "_heads_kernel", lambda: None)
    y_t, W_t, grads_t = run()
    torch.testing.assert_close(y, y_t, **TIGHT)
    torch.testing.assert_close(W, W_t, **TIGHT)
    for g, g_t in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(g, g_t, **TIGHT)
