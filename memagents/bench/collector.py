"""The ``batched`` preset of ``python -m memagents.bench train``: the device collector against
SB3's, on 1,024 batched envs of the algorithmic tasks, with the time split.

Each row trains ``MemoryPPO`` (sequence-start buffer, joint critic) for a few PPO iterations on
``env.vec_env: batched`` with one collector (``ppo.collector: sb3 | device``), everything else
equal, in a fresh process; the first iteration is a warm-up. The update is split by timing the
calls it is made of: minibatch preparation (the buffer's flattening, segment plan and gathers),
the policy's forward (``evaluate_actions``) and backward, and the optimizer step; what remains
(losses, gradient clipping, logging) is "other". Evaluation plays ``eval_episodes`` deterministic
episodes on a batched env of up to 256 envs: with SB3's ``evaluate_policy`` (numpy, one
``predict`` per step) for the ``sb3`` rows and with ``memagents.sb3.device.evaluate_batched`` (all
episodes as tensors on the device) for the ``device`` rows.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import statistics
import time
from collections import defaultdict
from typing import Any

ENVS = ("memagents/Copy-v0", "memagents/Recall-v0")
COLLECTORS = ("sb3", "device")
PRESET: dict[str, Any] = {
    "n_envs": 1024,
    "n_steps": 32,
    "batch_size": 8192,
    "n_epochs": 4,
    "hidden_size": 64,
    "net_arch": [64],
    "iterations": 4,  # one warm-up, three timed
    "eval_episodes": 1024,
}
QUICK: dict[str, Any] = {
    **PRESET,
    "n_envs": 16,
    "n_steps": 8,
    "batch_size": 64,
    "n_epochs": 1,
    "iterations": 2,
    "eval_episodes": 16,
}
#: memory cores at N = 64, W = 16 (as the other presets)
MEMORY = {
    "ntm": {"memory_size": 64, "word_size": 16, "num_heads": 1},
    "dnc": {"memory_size": 64, "word_size": 16, "num_reads": 4},
    "sam": {"memory_size": 64, "word_size": 16, "num_reads": 4},
    "sdnc": {"memory_size": 64, "word_size": 16, "num_reads": 4},
    "fwp": {},
}
SPLIT = ("prep", "forward", "backward", "optimizer")


def config_for(
    env_id: str,
    core: str,
    collector: str,
    hyper: dict[str, Any],
    device: str,
    core_kwargs: dict[str, Any] | None = None,
):
    """The training config of a row; ``core_kwargs`` replace :data:`MEMORY`'s for the core."""
    from memagents.config import from_dict

    memory = MEMORY.get(core, {}) if core_kwargs is None else core_kwargs

    return from_dict(
        {
            "env": {"id": env_id, "n_envs": hyper["n_envs"], "vec_env": "batched"},
            "core": {
                "name": core,
                "kwargs": {"hidden_size": hyper["hidden_size"], **memory},
            },
            "policy": {"critic": "joint", "net_arch": list(hyper["net_arch"])},
            "ppo": {
                "n_steps": hyper["n_steps"],
                "batch_size": hyper["batch_size"],
                "n_epochs": hyper["n_epochs"],
                "collector": collector,
            },
            "train": {"device": device, "seed": 0},
        }
    )


def measure(
    env_id: str,
    core: str,
    collector: str,
    hyper: dict[str, Any],
    device: str,
    core_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``hyper["iterations"]`` iterations with ``collector``; time the parts; evaluate.
    ``core_kwargs``: as :func:`config_for`."""
    import torch
    from stable_baselines3.common.evaluation import evaluate_policy

    from memagents import train
    from memagents.bench.train import iteration_clock

    torch.set_num_threads(1)
    config = config_for(env_id, core, collector, hyper, device, core_kwargs)
    env = train.make_env(config, seed=0)
    model = train.make_model(config, env, device)
    cuda = device.startswith("cuda")

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    spent: dict[str, float] = defaultdict(float)
    timing = [False]

    def timed(name: str, fn):
        def wrapper(*args: Any, **kwargs: Any):
            if not timing[0]:
                return fn(*args, **kwargs)
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += now() - t0

        return wrapper

    buffer, policy = model.rollout_buffer, model.policy
    buffer._ready = timed("prep", buffer._ready)
    buffer._get_samples = timed("prep", buffer._get_samples)
    policy.evaluate_actions = timed("forward", policy.evaluate_actions)
    policy.optimizer.step = timed("optimizer", policy.optimizer.step)
    backward = torch.Tensor.backward
    torch.Tensor.backward = timed("backward", backward)

    def start_timing(iteration: int) -> None:
        timing[0] = iteration >= 1  # the first iteration is a warm-up

    clock = iteration_clock(now, start_timing)
    per_iter = hyper["n_envs"] * hyper["n_steps"]
    try:
        model.learn(per_iter * hyper["iterations"], callback=clock)
    finally:
        torch.Tensor.backward = backward
    rollout, update = clock.split()
    n = len(rollout)
    split = {name: spent[name] / n for name in SPLIT}
    mean_update = sum(update) / n

    episodes = hyper["eval_episodes"]
    eval_env = train.make_env(config, seed=1, n_envs=min(episodes, 256))
    t0 = now()
    if collector == "device":
        result = train.evaluate(model, eval_env, episodes)
        mean_reward = result["mean_reward"]
    else:
        rewards, _ = evaluate_policy(
            model, eval_env, episodes, deterministic=True, return_episode_rewards=True, warn=False
        )
        mean_reward = float(sum(rewards) / len(rewards))
    eval_s = now() - t0
    single_ms = float("nan")
    if collector == "sb3":  # SB3's evaluate_policy on one env, as training evaluated before
        few = max(1, min(episodes, 64))
        one = train.make_env(config, seed=1, n_envs=1)
        t0 = now()
        evaluate_policy(model, one, few, deterministic=True, warn=False)
        single_ms = 1000 * (now() - t0) / few
    return {
        "steps_per_s": per_iter
        / statistics.median(r + u for r, u in zip(rollout, update, strict=True)),
        "rollout_s": sum(rollout) / n,
        "update_s": mean_update,
        **{f"{k}_s": v for k, v in split.items()},
        "other_s": mean_update - sum(split.values()),
        "eval_s": eval_s,
        "eval_ms_per_episode": 1000 * eval_s / episodes,
        "eval_single_ms_per_episode": single_ms,
        "eval_reward": mean_reward,
    }


def _in_subprocess(*args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def run(
    env_ids: list[str],
    cores: list[str],
    hyper: dict[str, Any],
    device: str = "cpu",
    in_process: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for env_id in env_ids:
        for core in cores:
            for collector in COLLECTORS:
                args = (env_id, core, collector, hyper, device)
                result = (measure if in_process else _in_subprocess)(*args)
                rows.append({"env_id": env_id, "core": core, "collector": collector, **result})
                print(
                    f"batched {env_id:<20} {core:<5} {collector:<6} "
                    f"{result['steps_per_s']:8.0f} steps/s  rollout {result['rollout_s']:.3f} s  "
                    f"prep {result['prep_s']:.3f} s  fwd {result['forward_s']:.3f} s  "
                    f"bwd {result['backward_s']:.3f} s  opt {result['optimizer_s']:.3f} s  "
                    f"eval {result['eval_s']:.2f} s",
                    flush=True,
                )
    return rows


def to_markdown(rows: list[dict[str, Any]], hyper: dict[str, Any], device: str, command: str):
    """The section: one row per (env, core, collector) with the ratios of device to sb3."""
    lines = [
        "## Training on batched envs: the device collector against SB3's",
        "",
        f"Command: `{command}`  ",
        f"torch threads 1, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, device {device}.",
        "",
        f"{hyper['n_envs']} batched envs x {hyper['n_steps']} steps per rollout, batch "
        f"{hyper['batch_size']}, {hyper['n_epochs']} epochs, hidden {hyper['hidden_size']}, "
        f"joint critic, sequence-start buffer; memory cores at N=64, W=16. "
        f"{hyper['iterations'] - 1} timed iterations after a warm-up, each row in a fresh "
        f"process. Seconds per iteration: *rollout* (collection), *prep* (minibatch "
        f"preparation: flattening, segment plan, gathers), *fwd*/*bwd* (the policy's "
        f"`evaluate_actions` and the backward pass), *opt* (Adam), *other* (the rest of the "
        f"update). *eval*: {hyper['eval_episodes']} deterministic episodes on 256 batched envs "
        "(sb3 rows: SB3's `evaluate_policy`; device rows: `evaluate_batched`); *1 env*: "
        "`evaluate_policy` on one env (how training evaluated before batched evaluation), up to "
        "64 episodes, per episode. Ratios: device "
        "row over the sb3 row above it (for times, sb3 time / device time: > 1 is faster).",
        "",
        "| env | core | collector | steps/s | rollout | prep | fwd | bwd | opt | other | eval "
        "| eval ms/episode (1 env) | fwd+bwd share of update "
        "| speed-up: steps/s, prep, eval (vs 1 env) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ref: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["env_id"], r["core"])
        share = (r["forward_s"] + r["backward_s"]) / r["update_s"]
        ratio = ""
        if r["collector"] == "sb3":
            ref[key] = r
        elif key in ref:
            s = ref[key]
            single = s["eval_single_ms_per_episode"] / r["eval_ms_per_episode"]
            ratio = (
                f"**{r['steps_per_s'] / s['steps_per_s']:.2f}x**, "
                f"**{s['prep_s'] / r['prep_s']:.1f}x**, **{s['eval_s'] / r['eval_s']:.1f}x** "
                f"({single:.0f}x)"
            )
        single_ms = r["eval_single_ms_per_episode"]
        single_cell = "-" if single_ms != single_ms else f"{single_ms:.2f}"  # NaN: not measured
        lines.append(
            f"| {r['env_id']} | {r['core']} | {r['collector']} | {r['steps_per_s']:,.0f} "
            f"| {r['rollout_s']:.3f} | {r['prep_s']:.3f} | {r['forward_s']:.3f} "
            f"| {r['backward_s']:.3f} | {r['optimizer_s']:.3f} | {r['other_s']:.3f} "
            f"| {r['eval_s']:.2f} | {single_cell} | {share:.0%} "
            f"| {ratio} |"
        )
    return "\n".join(lines) + "\n"
