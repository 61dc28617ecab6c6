"""``ppo.collector: device``: rollouts kept as tensors from the batched env to the update.

The reference is the numpy path (sb3-contrib's collector with our sequence-start buffer): for
one seed both collectors must produce the same rollout and the same parameters after the update,
for the lstm and a packed memory core, step and element credit, Discrete and MultiBinary
actions. Also checked: GAE by hand, the padded minibatch layout against the numpy buffer's, the
batched evaluation against SB3's ``evaluate_policy``, episode statistics, the curriculum, bad
input, and (when there is a GPU) everything on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.evaluation import evaluate_policy

from memagents import train
from memagents.cores import available
from memagents.sb3 import MemoryPolicy, MemoryPPO, TorchVecEnv
from memagents.sb3.curriculum import CurriculumCallback
from memagents.sb3.device import DeviceRolloutBuffer, evaluate_batched
from memagents.sb3.ppo import SequenceStartRolloutBuffer

N_ENVS, N_STEPS = 8, 16
#: ``critic: joint``: one core trained by both losses (the shipped configs' critic mode)
JOINT = {"shared_lstm": True, "train_shared_core": True, "enable_critic_lstm": False}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


#: critic mode -> MemoryPolicy's keyword arguments (``memagents.train.policy_kwargs``)
CRITICS = {
    "joint": JOINT,
    "shared": {"shared_lstm": True, "train_shared_core": False, "enable_critic_lstm": False},
    "separate": {"shared_lstm": False, "enable_critic_lstm": True},
    "feedforward": {"shared_lstm": False, "enable_critic_lstm": False},
}
#: small memories for the memory cores
SMALL = {
    "ntm": {"memory_size": 8, "word_size": 4},
    "dnc": {"memory_size": 8, "word_size": 4, "num_reads": 2},
    "sam": {"memory_size": 8, "word_size": 4, "num_reads": 2},
    "sdnc": {"memory_size": 8, "word_size": 4, "num_reads": 2},
}


def make_model(
    collector: str,
    env_id: str,
    core: str = "lstm",
    device: str = "cpu",
    critic: str = "joint",
    **kwargs,
):
    env = TorchVecEnv.make(env_id, N_ENVS, device=device, seed=3, **kwargs.pop("env_kwargs", {}))
    core_kwargs = {"hidden_size": 16, **SMALL.get(core, {})}
    return MemoryPPO(
        MemoryPolicy,
        env,
        n_steps=N_STEPS,
        batch_size=32,
        n_epochs=2,
        seed=0,
        device=device,
        collector=collector,
        policy_kwargs={"core": core, "core_kwargs": core_kwargs, **CRITICS[critic]},
        **kwargs,
    )


def flat_rollout(model: MemoryPPO) -> dict[str, np.ndarray]:
    """The trained-on rollout, env-major ``[n_envs * n_steps, ...]``, whichever the buffer."""
    buffer = model.rollout_buffer
    names = ("observations", "actions", "rewards", "episode_starts", "log_probs", "advantages")
    if isinstance(buffer, DeviceRolloutBuffer):
        out = {name: buffer.flat(name).cpu().numpy() for name in names}
        out["values"] = buffer.flat("value_tensor").cpu().numpy()
        out["returns"] = buffer.flat("return_tensor").cpu().numpy()
    else:
        out = {name: getattr(buffer, name) for name in (*names, "values", "returns")}
        out["rewards"] = buffer.swap_and_flatten(buffer.rewards)  # not flattened by the update
    n = N_ENVS * N_STEPS
    return {k: np.asarray(v, dtype=np.float64).reshape(n, -1) for k, v in out.items()}


CASES = [
    ("memagents/Copy-v0", "lstm", "step", {"max_length": 3}, "joint"),
    ("memagents/Copy-v0", "lstm", "element", {"max_length": 3}, "joint"),
    ("memagents/Copy-v0", "dnc", "element", {"max_length": 3}, "joint"),  # packed segments
    ("memagents/Recall-v0", "lstm", "step", {}, "joint"),  # Discrete actions
    *[("memagents/Recall-v0", core, "step", {}, "joint") for core in ("gru", "ntm", "dnc", "fwp")],
    *[("memagents/Recall-v0", core, "step", {}, "joint") for core in ("sam", "sdnc")],
    *[
        ("memagents/Recall-v0", "lstm", "step", {}, c)
        for c in ("shared", "separate", "feedforward")
    ],
]


@pytest.mark.parametrize(("env_id", "core", "credit", "env_kwargs", "critic"), CASES)
def test_device_and_sb3_collectors_give_the_same_rollout_and_update(
    env_id: str, core: str, credit: str, env_kwargs: dict, critic: str
) -> None:
    """Same seed: the same observations, actions, rewards, episode starts, values,
    log-probabilities, advantages and returns, the same episode logs, and the same parameters
    after one rollout and its update (2 epochs)."""
    results = {}
    for collector in ("sb3", "device"):  # one after the other: the model's seed sets torch's RNG
        if core not in ("lstm", "gru") and core not in available():
            pytest.skip(f"core {core!r} is not available here")
        model = make_model(collector, env_id, core, critic=critic, credit=credit,
                           env_kwargs=env_kwargs)  # fmt: skip
        model.learn(N_ENVS * N_STEPS)
        results[collector] = model
    sb3, device = results["sb3"], results["device"]
    assert isinstance(device.rollout_buffer, DeviceRolloutBuffer)
    assert isinstance(sb3.rollout_buffer, SequenceStartRolloutBuffer)
    assert device.rollout_buffer.pack_segments == sb3.rollout_buffer.pack_segments
    ours, ref = flat_rollout(device), flat_rollout(sb3)
    for name, expected in ref.items():
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-6, err_msg=name)
    assert ref["episode_starts"][1:].sum() > 0  # episodes ended inside the rollout
    assert [e["l"] for e in device.ep_info_buffer] == [e["l"] for e in sb3.ep_info_buffer]
    np.testing.assert_allclose(
        [e["r"] for e in device.ep_info_buffer], [e["r"] for e in sb3.ep_info_buffer], atol=1e-6
    )
    assert list(device.ep_success_buffer) == list(sb3.ep_success_buffer)
    assert len(device.ep_info_buffer) > 0
    theirs = sb3.policy.state_dict()
    for name, value in device.policy.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_gae_by_hand_one_env() -> None:
    """One env, three steps, an episode ending after the second: δ and Â from the equations
    (Schulman et al. 2016, eq. 16), γ = 0.9, λ = 0.8; element advantages sum to Â."""
    buffer = DeviceRolloutBuffer(
        3, spaces.Box(0, 1, (2,)), spaces.MultiBinary(2), "cpu", 0.9, 0.8, 1, reward_elements=2
    )
    buffer.set_start_states(RNNStates(torch.zeros(1, 3), None))  # (the update is not run)
    r = [1.0, 0.5, 2.0]
    v = [0.3, 0.2, 0.6]
    starts = [1.0, 0.0, 1.0]  # step 2 starts a new episode: step 1 was terminal
    elements = [[1.0, 0.0], [0.25, 0.25], [1.5, 0.5]]
    for t in range(3):
        buffer.add(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.tensor([r[t]]),
            torch.tensor([starts[t]]),
            torch.tensor([[v[t]]]),
            torch.zeros(1),
            reward_elements=torch.tensor([elements[t]]),
        )
    last_value, gamma, lam = 0.7, 0.9, 0.8
    buffer.compute_returns_and_advantage(torch.tensor([last_value]), torch.tensor([0.0]))
    a2 = r[2] + gamma * last_value - v[2]
    a1 = r[1] - v[1]  # terminal: no bootstrap, no carry
    a0 = r[0] + gamma * v[1] - v[0] + gamma * lam * a1
    expected = torch.tensor([[a0], [a1], [a2]])
    torch.testing.assert_close(buffer.advantages, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(buffer.return_tensor, expected + torch.tensor(v)[:, None])
    e2 = torch.tensor(elements[2]) + gamma * last_value / 2 - v[2] / 2
    e1 = torch.tensor(elements[1]) - v[1] / 2
    e0 = torch.tensor(elements[0]) + gamma * v[1] / 2 - v[0] / 2 + gamma * lam * e1
    torch.testing.assert_close(buffer.element_advantages[:, 0], torch.stack([e0, e1, e2]))
    torch.testing.assert_close(
        buffer.element_advantages.sum(-1), buffer.advantages, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("pack", [False, True])
def test_minibatch_layout_matches_the_numpy_buffer(pack: bool) -> None:
    """Random episode boundaries: the device buffer's padded indices and masks are the numpy
    buffer's, for every chunk of segments."""
    rng = np.random.default_rng(0)
    n_steps, n_envs = 24, 6
    starts = (rng.random((n_steps, n_envs)) < 0.2).astype(np.float32)
    box, act = spaces.Box(0, 1, (1,)), spaces.MultiBinary(1)
    ref = SequenceStartRolloutBuffer(
        n_steps, box, act, (n_steps, 1, n_envs, 2), "cpu", n_envs=n_envs, pack_segments=pack
    )
    ours = DeviceRolloutBuffer(n_steps, box, act, "cpu", n_envs=n_envs, pack_segments=pack)
    ref.reset()
    zeros = torch.zeros(1, n_envs, 2)
    ours.set_start_states(RNNStates(torch.zeros(n_envs, 2), None))  # (layout only)
    for t in range(n_steps):
        ones = np.ones((n_envs, 1), dtype=np.float32)
        ref.add(ones, ones, np.zeros(n_envs), starts[t], torch.zeros(n_envs), torch.zeros(n_envs),
                lstm_states=RNNStates((zeros, zeros), (zeros, zeros)))  # fmt: skip
        ours.add(torch.ones(n_envs, 1), torch.ones(n_envs, 1), torch.zeros(n_envs),
                 torch.as_tensor(starts[t]), torch.zeros(n_envs), torch.zeros(n_envs))  # fmt: skip
    ref._ready()
    ours._ready()
    np.testing.assert_array_equal(ours.segment_starts, ref.segment_starts)
    order = rng.permutation(len(ref.segment_starts))
    for segments in ref._chunks(order, 17):
        indices, valid = ref._padded_indices(ref._columns(segments))
        got, got_valid, _, T = ours._layout(segments)
        assert T == indices.shape[1]
        np.testing.assert_array_equal(got_valid.numpy(), valid.reshape(-1))
        np.testing.assert_array_equal(got.numpy()[valid.reshape(-1)], indices[valid])


@pytest.mark.parametrize(("n_envs", "episodes"), [(8, 20), (5, 23), (16, 16)])
def test_batched_evaluation_plays_the_episodes_of_evaluate_policy(n_envs: int, episodes: int):
    """Deterministic policy, same seed: the same episode rewards and lengths as SB3's
    ``evaluate_policy`` (which spreads the episodes over the envs the same way)."""
    model = make_model("device", "memagents/Copy-v0", env_kwargs={"max_length": 4})
    model.learn(N_ENVS * N_STEPS)
    envs = [TorchVecEnv.make("memagents/Copy-v0", n_envs, seed=7, max_length=4) for _ in "ab"]
    rewards, lengths = evaluate_policy(
        model, envs[0], episodes, deterministic=True, return_episode_rewards=True, warn=False
    )
    played = evaluate_batched(model.policy, envs[1].batched, episodes)
    assert len(played["rewards"]) == episodes
    np.testing.assert_allclose(np.sort(played["rewards"]), np.sort(rewards), rtol=0, atol=1e-6)
    assert sorted(played["lengths"].tolist()) == sorted(lengths)
    # success: a perfect episode returns 1 (up to float32 rounding)
    np.testing.assert_array_equal(played["successes"], played["rewards"] > 1 - 1e-5)


def test_curriculum_promotes_at_the_same_steps_with_either_collector() -> None:
    """The curriculum counts training episodes from the collector's tensors: the same levels
    at the same steps as from the sb3 collector's infos."""
    history = {}
    for collector in ("sb3", "device"):
        model = make_model(collector, "memagents/Recall-v0", env_kwargs={"max_delay": 1})
        callback = CurriculumCallback("max_delay", freq=N_ENVS * 4, threshold=0.0, min_episodes=4)
        model.learn(N_ENVS * N_STEPS * 2, callback=callback)
        history[collector] = callback.history
    assert len(history["device"]) >= 2
    assert history["device"] == history["sb3"]


def test_device_collector_logs_episode_statistics() -> None:
    model = make_model("device", "memagents/Copy-v0", env_kwargs={"max_length": 2})
    model.learn(N_ENVS * N_STEPS)
    lengths = [e["l"] for e in model.ep_info_buffer]
    assert lengths and all(3 <= n <= 5 for n in lengths)  # L inputs, a delimiter, L answers
    assert all(0 <= e["r"] <= 1 + 1e-6 for e in model.ep_info_buffer)
    assert len(model.ep_success_buffer) == len(lengths)


def test_collector_choice_and_bad_values() -> None:
    assert isinstance(make_model("auto", "memagents/Copy-v0").rollout_buffer, DeviceRolloutBuffer)
    sb3 = make_model("sb3", "memagents/Copy-v0").rollout_buffer
    assert isinstance(sb3, SequenceStartRolloutBuffer)
    with pytest.raises(ValueError, match=r"collector='gpu' is invalid.*auto, device, sb3"):
        make_model("gpu", "memagents/Copy-v0")
    from stable_baselines3.common.env_util import make_vec_env

    dummy = make_vec_env("CartPole-v1", n_envs=2)
    with pytest.raises(ValueError, match="collector='device' needs the batched env"):
        MemoryPPO(MemoryPolicy, dummy, n_steps=8, collector="device", device="cpu")
    auto = MemoryPPO(MemoryPolicy, dummy, n_steps=8, batch_size=16, device="cpu")
    assert isinstance(auto.rollout_buffer, SequenceStartRolloutBuffer)


def test_step_tensor_check_false_skips_only_the_value_check() -> None:
    env = TorchVecEnv.make("memagents/Copy-v0", 4, seed=0, bits=3).batched
    env.reset_tensor()
    bad_values = torch.full((4, 3), 2)
    with pytest.raises(Exception, match="not in the action space"):
        env.step_tensor(bad_values)
    with pytest.raises(Exception, match="expected shape"):
        env.step_tensor(torch.zeros(4, 2), check=False)


@pytest.mark.parametrize(
    ("sets", "must_name"),
    [
        (["ppo.collector=gpu"], "ppo.collector"),
        (["env.device=tpu"], "env.device"),
        (["ppo.collector=device", "env.vec_env=dummy"], "ppo.collector"),
        (["env.device=cuda:0", "env.vec_env=dummy"], "env.device"),
    ],
)
def test_cli_bad_collector_and_env_device_exit_2(sets, must_name, capsys, tmp_path) -> None:
    argv = ["--env", "memagents/Recall-v0", "--run-dir", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and must_name in err[0], err


# -- CUDA -------------------------------------------------------------------------------------
@CUDA
def test_cuda_rollout_and_update_stay_on_the_gpu() -> None:
    model = make_model("device", "memagents/Copy-v0", "dnc", device="cuda", credit="element")
    model.learn(N_ENVS * N_STEPS)
    buffer = model.rollout_buffer
    for name in ("observations", "actions", "rewards", "value_tensor", "element_advantages"):
        assert getattr(buffer, name).device.type == "cuda", name
    assert all(p.device.type == "cuda" for p in model.policy.parameters())
    result = evaluate_batched(model.policy, model.env.batched, 16)
    assert len(result["rewards"]) == 16


@CUDA
@pytest.mark.parametrize("core", ["lstm", "gru", "ntm", "dnc", "sam", "sdnc", "fwp"])
def test_cuda_short_training_of_each_core(core: str) -> None:
    import memagents.cores as cores

    if core not in cores.available():
        pytest.skip(f"{core} is not available here")
    model = make_model("device", "memagents/Recall-v0", core if core != "dnc" else "dnc",
                       device="cuda")  # fmt: skip
    model.learn(N_ENVS * N_STEPS)
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())


def test_chunk_segments_groups_as_the_step_by_step_rule() -> None:
    """Segments in order, a chunk closing at the first segment that brings it to at least
    ``batch_size`` steps (the last chunk may hold fewer): checked against that rule written as
    a loop, on random lengths and batch sizes."""
    from memagents.sb3.segments import chunk_segments

    rng = np.random.default_rng(1)
    for _ in range(50):
        lengths = rng.integers(1, 30, size=int(rng.integers(1, 200)))
        order = rng.permutation(len(lengths))
        batch = int(rng.integers(1, 400))
        expected, chunk, steps = [], [], 0
        for seg in order:
            chunk.append(seg)
            steps += lengths[seg]
            if steps >= batch:
                expected.append(chunk)
                chunk, steps = [], 0
        if chunk:
            expected.append(chunk)
        got = [c.tolist() for c in chunk_segments(order, lengths, batch)]
        assert got == [[int(s) for s in c] for c in expected]


@pytest.mark.parametrize("critic", list(CRITICS))
@pytest.mark.parametrize("core", ["lstm", "dnc", "sam"])
def test_rollout_step_on_native_states_matches_forward_on_packed_ones(core: str, critic: str):
    """Five rollout steps with episode starts at steps 0 and 3 for some envs: ``rollout_step``
    on the cores' own states gives ``forward``'s actions, values and log-probabilities (same
    RNG draws), and its states packed are ``forward``'s packed states."""
    if core not in available():
        pytest.skip(f"core {core!r} is not available here")
    model = make_model("device", "memagents/Copy-v0", core, critic=critic)
    policy = model.policy
    packed = policy.initial_state(N_ENVS)
    native = policy.unpack_states(packed)
    gen = torch.Generator().manual_seed(0)
    for t in range(5):
        obs = torch.rand(N_ENVS, *policy.observation_space.shape, generator=gen)
        starts = torch.zeros(N_ENVS)
        if t in (0, 3):
            starts[: N_ENVS // 2] = 1.0
        torch.manual_seed(t)
        with torch.no_grad():
            a_ref, v_ref, lp_ref, packed = policy(obs, packed, starts)
        torch.manual_seed(t)
        a, v, lp, native = policy.rollout_step(obs, native, starts)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=0)
        torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
        torch.testing.assert_close(lp, lp_ref, rtol=0, atol=0)
        repacked = policy.pack_states(native)
        for x, y in zip((*repacked.pi, *repacked.vf), (*packed.pi, *packed.vf), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize(("core", "critic"), [("sam", "joint"), ("sdnc", "separate")])
def test_native_loop_on_a_numpy_env_equals_sb3_contribs_loop(core: str, critic: str) -> None:
    """A core that carries its state on a numpy VecEnv: ``collector='auto'`` steps the cores'
    own states (``MemoryPPO._collect_native``), ``'sb3'`` runs sb3-contrib's packed loop. Same
    seed: the same rollout (observations, actions, rewards, values, log-probabilities,
    advantages, returns) and the same parameters after the update, with episodes that end by
    truncation (Recall's episodes are cut by a TimeLimit of 3 steps here) bootstrapped alike."""
    from gymnasium.wrappers import TimeLimit
    from stable_baselines3.common.env_util import make_vec_env

    results = {}
    for collector in ("sb3", "auto"):
        env = make_vec_env(
            "memagents/Recall-v0", n_envs=4, seed=5,
            wrapper_class=lambda e: TimeLimit(e, max_episode_steps=3),
        )  # fmt: skip
        model = MemoryPPO(
            MemoryPolicy, env, n_steps=N_STEPS, batch_size=32, n_epochs=2, seed=0,
            device="cpu", collector=collector,
            policy_kwargs={"core": core, "core_kwargs": {"hidden_size": 16, **SMALL[core]},
                           **CRITICS[critic]},
        )  # fmt: skip
        calls: list[int] = []

        def spy(*args, _original=model._collect_native, _calls=calls, **kwargs):
            _calls.append(1)
            return _original(*args, **kwargs)

        model._collect_native = spy
        model.learn(4 * N_STEPS)
        assert bool(calls) == (collector == "auto")
        buffer = model.rollout_buffer
        rollout = {
            name: np.asarray(getattr(buffer, name), dtype=np.float64)
            for name in ("observations", "actions", "rewards", "values", "log_probs",
                         "advantages", "returns")
        }  # fmt: skip
        params = [p.detach().clone() for p in model.policy.parameters()]
        results[collector] = (rollout, params)
    (ref, ref_params), (got, got_params) = results["sb3"], results["auto"]
    assert ref["rewards"].any()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-6, rtol=0, err_msg=name)
    for a, b in zip(got_params, ref_params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
