"""Recording an episode with the memory beside it: one frame per step, same actions as predict."""

from __future__ import annotations

import dataclasses
import glob

import numpy as np
import pytest
import torch
from PIL import Image
from sb3_contrib import RecurrentPPO

from memagents import train
from memagents.config import from_dict, read_yaml
from memagents.record import record_episode, save_frames

DNC_TINY = [
    "--core",
    "dnc",
    "--set",
    "core.kwargs={hidden_size: 8, memory_size: 8, word_size: 4, num_reads: 1}",
    "--set",
    "policy.net_arch=[8]",
    "--n-envs",
    "2",
    "--set",
    "ppo.n_steps=32",
    "--set",
    "ppo.batch_size=32",
    "--set",
    "ppo.n_epochs=1",
    "--set",
    "train.eval_episodes=2",
    "--set",
    "train.eval_freq=0",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rec") / "run"
    assert train.main([*DNC_TINY, "--total-timesteps", "64", "--run-dir", str(run_dir)]) == 0
    return run_dir


def render_env(run_dir, seed):
    config = from_dict(read_yaml(run_dir / "config.yaml"))
    kwargs = {**config.env.kwargs, "render_mode": "rgb_array"}
    config = dataclasses.replace(config, env=dataclasses.replace(config.env, kwargs=kwargs))
    return train.make_env(config, seed, n_envs=1)


def test_recording_has_one_frame_per_step(tiny_run, tmp_path):
    model = RecurrentPPO.load(tiny_run / "model.zip", device="cpu")
    frames, info = record_episode(model, render_env(tiny_run, seed=5))
    steps = info["episode"]["l"]  # the Monitor's episode length
    assert len(frames) == steps >= 3  # Recall: cue, at least one delay, query
    assert all(f.dtype == np.uint8 and f.ndim == 3 and f.shape == frames[0].shape for f in frames)
    gif, pngs = tmp_path / "ep.gif", tmp_path / "frames"
    save_frames(frames, gif, pngs)
    with Image.open(gif) as image:
        assert image.n_frames == steps
    assert len(list(pngs.glob("frame_*.png"))) == steps
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        save_frames(frames, tmp_path / "ep.avi", None)


def test_debug_step_acts_like_predict(tiny_run):
    """The recording path (core with return_debug) picks the actions predict picks: discrete
    actions of logits that the two paths compute up to float32 rounding, the same unless two
    logits tie to that precision."""
    model = RecurrentPPO.load(tiny_run / "model.zip", device="cpu")
    policy = model.policy
    venv = render_env(tiny_run, seed=9)
    obs = venv.reset()
    state, hc, start = None, None, np.ones(1, dtype=bool)
    for _ in range(12):
        expected, hc = model.predict(obs, state=hc, episode_start=start, deterministic=True)
        obs_tensor, _ = policy.obs_to_tensor(obs)
        actions, state, debug = policy.debug_step(
            obs_tensor, state, torch.as_tensor(start, dtype=torch.float32)
        )
        np.testing.assert_array_equal(actions.numpy(), expected)
        assert debug["memory"].shape == (1, 8, 4)
        weights = debug["read_weights"]
        assert bool((weights >= 0).all()) and bool((weights.sum(-1) <= 1 + 1e-5).all())
        obs, _, done, _ = venv.step(expected)
        start = done


def test_memory_images_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    argv = [*DNC_TINY, "--total-timesteps", "128", "--log-memory-every", "64"]
    assert train.main([*argv, "--run-dir", str(run_dir)]) == 0
    events = EventAccumulator(glob.glob(str(run_dir / "events*"))[0])
    events.Reload()
    images = events.Images("memory/episode")
    assert len(images) >= 2
    assert images[0].width > images[0].height > 0
