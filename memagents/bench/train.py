"""``python -m memagents.bench train``: env steps per second of full RecurrentPPO training.

On ``MiniGrid-MemoryS7-v0`` and ``memagents/Copy-v0``, with identical hyperparameters in every
row (one table per preset of :data:`PRESETS`), it trains for a fixed number of PPO iterations
(rollout + update) each of:

- ``stock``: sb3-contrib's ``RecurrentPPO`` with its own LSTM policy (``MlpLstmPolicy``;
  :class:`memagents.sb3.StockLstmPolicy` adds only a dtype cast so it can train on Copy's
  ``MultiBinary`` actions);
- ``lstm``: our bridge (``MemoryPolicy``) with the ``lstm`` core;
- every registered memory core at N=64 (``ntm``, ``dnc``, ``sam``, ``sdnc``; ``fwp`` has no
  N);
- ``lstm`` and every memory core again with our sequence-start rollout buffer (``MemoryPPO``,
  ``ppo.buffer: sequence-start``), which trains on whole episode segments and, for the memory
  cores, packs several into one training sequence (same loss, fewer padded steps).

All rows share the observation pipeline of ``python -m memagents.train`` (MiniGrid: grid-code
wrapper + ``minigrid`` extractor), the hidden size, heads and critic mode (a separate critic
recurrent module, sb3-contrib's default). Each row runs in a fresh process; the first iteration
is a warm-up and is not timed. Beside steps/s the rollout is profiled: the policy's forward pass
for one step of all envs (``T = 1``, what ``collect_rollouts`` calls every step) and the env step.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

ENVS = ("MiniGrid-MemoryS7-v0", "memagents/Copy-v0")

#: hyperparameter presets; every row of a table uses the same preset. ``light``: a short
#: update (4 epochs of 2 minibatches); ``sb3``: sb3-contrib's RecurrentPPO defaults for the
#: PPO knobs (n_steps 128, batch 128, 10 epochs), so the update dominates.
PRESETS: dict[str, dict[str, Any]] = {
    "light": {
        "n_envs": 8,
        "n_steps": 64,
        "batch_size": 256,
        "n_epochs": 4,
        "hidden_size": 64,
        "net_arch": [64],
        "iterations": 6,  # the first is a warm-up; five timed (rows vary +-7% with three)
    },
    "sb3": {
        "n_envs": 8,
        "n_steps": 128,
        "batch_size": 128,
        "n_epochs": 10,
        "hidden_size": 64,
        "net_arch": [64],
        "iterations": 2,  # one timed iteration: memory cores take a few seconds each here
    },
}
HYPER = PRESETS["light"]
QUICK: dict[str, Any] = {**HYPER, "n_envs": 2, "n_steps": 8, "batch_size": 16, "n_epochs": 1}
QUICK["iterations"] = 2
#: critic mode -> how the tables describe it.
CRITICS = {
    "separate": "a separate critic recurrent module (sb3-contrib's default)",
    "shared": "one recurrent module shared by actor and critic",
}

#: memory-core hyperparameters at N = 64 (the issue's target size), W = 16.
MEMORY = {
    "ntm": {"memory_size": 64, "word_size": 16, "num_heads": 1},
    "dnc": {"memory_size": 64, "word_size": 16, "num_reads": 4},
    "fwp": {},
    "sam": {"memory_size": 64, "word_size": 16, "num_reads": 4},
    "sdnc": {"memory_size": 64, "word_size": 16, "num_reads": 4},
}


@dataclass
class Spec:
    """One row: a system on an env."""

    label: str  # e.g. "dnc N=64"
    system: str  # "stock" | a core name
    env_id: str
    core_kwargs: dict[str, Any] = field(default_factory=dict)
    buffer: str = "stock"  # "stock" | "sequence-start"


def build_specs(env_ids: list[str], systems: list[str] | None = None) -> list[Spec]:
    """The rows: stock, lstm, then each registered memory core at N=64, per env."""
    import memagents.cores as cores

    specs = []
    ours = {"lstm": {}, **{k: v for k, v in MEMORY.items() if k in cores.available()}}
    for env_id in env_ids:
        rows = [Spec("stock RecurrentPPO LSTM", "stock", env_id)]
        for buffer in ("stock", "sequence-start"):
            for core, kwargs in ours.items():
                n = kwargs.get("memory_size")
                label = f"{core} N={n}" if n else core
                if buffer != "stock":
                    label += ", sequence-start buffer"
                rows.append(Spec(label, core, env_id, dict(kwargs), buffer))
        specs += [s for s in rows if systems is None or s.system in systems]
    return specs


def _config(spec: Spec, hyper: dict[str, Any]):
    from memagents.config import from_dict

    core = {"name": "lstm" if spec.system == "stock" else spec.system}
    core["kwargs"] = {"hidden_size": hyper["hidden_size"], **spec.core_kwargs}
    return from_dict(
        {
            "env": {"id": spec.env_id, "n_envs": hyper["n_envs"]},
            "core": core,
            "policy": {
                "critic": hyper.get("critic", "separate"),
                "net_arch": list(hyper["net_arch"]),
            },
            "ppo": {
                "n_steps": hyper["n_steps"],
                "batch_size": hyper["batch_size"],
                "n_epochs": hyper["n_epochs"],
                "buffer": spec.buffer,
            },
            "train": {"device": "cpu", "seed": 0},
        }
    )


def _make_model(spec: Spec, hyper: dict[str, Any], env):
    from memagents import train

    config = _config(spec, hyper)
    if spec.system != "stock":
        return train.make_model(config, env, "cpu")
    from sb3_contrib import RecurrentPPO

    from memagents.sb3 import StockLstmPolicy

    ours = train.policy_kwargs(config)  # the same extractor, heads and critic mode
    policy_kwargs = {
        "lstm_hidden_size": hyper["hidden_size"],
        "net_arch": ours["net_arch"],
        "enable_critic_lstm": ours["enable_critic_lstm"],
        "shared_lstm": ours["shared_lstm"],
    }
    for key in ("features_extractor_class", "features_extractor_kwargs"):
        if key in ours:
            policy_kwargs[key] = ours[key]
    return RecurrentPPO(
        StockLstmPolicy,
        env,
        **train.ppo_kwargs(config),  # the hyperparameters of every other row
        policy_kwargs=policy_kwargs,
        seed=config.train.seed,
        device="cpu",
    )


def iteration_clock(now=time.perf_counter, on_rollout_start=None):
    """A callback that stamps each PPO iteration's rollout start and end and the training end;
    ``.split()`` gives the rollout and update seconds of every iteration but the first (a
    warm-up). ``on_rollout_start(i)`` is called with the iteration's number (0 first)."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Clock(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.done = 0.0

        def _on_rollout_start(self) -> None:
            self.starts.append(now())
            if on_rollout_start is not None:
                on_rollout_start(len(self.starts) - 1)

        def _on_rollout_end(self) -> None:
            self.ends.append(now())

        def _on_training_end(self) -> None:
            self.done = now()

        def _on_step(self) -> bool:
            return True

        def split(self) -> tuple[list[float], list[float]]:
            # iteration i: rollout starts[i] -> ends[i], update ends[i] -> starts[i + 1] (or done)
            nexts = [*self.starts[1:], self.done]
            timed = range(1, len(self.starts))
            rollout = [self.ends[i] - self.starts[i] for i in timed]
            return rollout, [nexts[i] - self.ends[i] for i in timed]

    return Clock()


def _measure(spec: Spec, hyper: dict[str, Any]) -> dict[str, Any]:
    """Train ``hyper["iterations"]`` PPO iterations; time all but the first; profile a step."""
    import numpy as np
    import torch
    from sb3_contrib.common.recurrent.type_aliases import RNNStates

    from memagents import train

    torch.set_num_threads(1)
    config = _config(spec, hyper)
    env = train.make_env(config, seed=0)
    model = _make_model(spec, hyper, env)

    clock = iteration_clock()
    per_iter = hyper["n_envs"] * hyper["n_steps"]
    model.learn(per_iter * hyper["iterations"], callback=clock)
    rollout, update = clock.split()
    # the median iteration: a GC pause or a burst of other work on this machine stretches single
    # iterations by up to ~60% (seen in 10-iteration traces), which a mean would carry
    iteration = statistics.median(r + u for r, u in zip(rollout, update, strict=True))

    # profile one rollout step: policy forward (T = 1, B = n_envs) and the env step
    policy = model.policy
    obs = torch.as_tensor(env.reset(), dtype=torch.float32)
    starts = torch.zeros(hyper["n_envs"])
    n = policy.lstm_actor.num_layers
    shape = (n, hyper["n_envs"], policy.lstm_actor.hidden_size)
    states = RNNStates(
        (torch.zeros(shape), torch.zeros(shape)), (torch.zeros(shape), torch.zeros(shape))
    )
    if spec.system != "stock" and policy.lstm_critic is not None:
        critic = (1, hyper["n_envs"], policy.lstm_critic.hidden_size)
        states = RNNStates(states.pi, (torch.zeros(critic), torch.zeros(critic)))
    fwd = []
    with torch.no_grad():
        for _ in range(5):
            policy.forward(obs, states, starts)
        for _ in range(30):
            t0 = time.perf_counter()
            policy.forward(obs, states, starts)
            fwd.append(time.perf_counter() - t0)
    env_ms = []
    for _ in range(30):
        actions = np.stack([env.action_space.sample() for _ in range(hyper["n_envs"])])
        t0 = time.perf_counter()
        env.step(actions)
        env_ms.append(time.perf_counter() - t0)
    env.close()
    return {
        "steps_per_s": per_iter / iteration,
        "rollout_s": statistics.median(rollout),
        "update_s": statistics.median(update),
        "policy_fwd_ms": 1000 * statistics.median(fwd),
        "env_step_ms": 1000 * statistics.median(env_ms),
        "params": sum(p.numel() for p in policy.parameters()),
        "timed_steps": per_iter * len(rollout),
    }


def _measure_in_subprocess(spec: Spec, hyper: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (spec, hyper))


def to_markdown(
    rows: list[dict[str, Any]], preset: str, hyper: dict[str, Any], fresh: bool = True
) -> str:
    """One table (one preset): every row with its ratio to the stock row of the same env."""
    lines = [
        f"### Preset `{preset}`: {hyper['n_envs']} envs (DummyVecEnv) x {hyper['n_steps']} steps "
        f"per rollout, batch {hyper['batch_size']}, {hyper['n_epochs']} epoch(s)",
        "",
        f"Hidden {hyper['hidden_size']}, heads {hyper['net_arch']}, "
        f"{CRITICS[hyper.get('critic', 'separate')]} in every row; memory cores at N=64, W=16 "
        "(R=4 reads for DNC, SAM and SDNC). "
        f"{hyper['iterations'] - 1} timed iteration(s) after one warm-up, "
        f"{'each row in a fresh process' if fresh else 'all rows in one process'}."
        + (f" Systems: {', '.join(hyper['systems'])} only." if hyper.get("systems") else ""),
        "",
        "| env | system | params | steps/s | vs stock | rollout s/iter | update s/iter "
        "| policy fwd ms | env step ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for env_id in dict.fromkeys(r["env_id"] for r in rows):
        group = [r for r in rows if r["env_id"] == env_id]
        stock = next((r for r in group if r["system"] == "stock"), None)
        for r in group:
            ratio = f"**{r['steps_per_s'] / stock['steps_per_s']:.2f}x**" if stock else ""
            lines.append(
                f"| {env_id} | {r['label']} | {r['params']:,} | {r['steps_per_s']:.0f} | {ratio} "
                f"| {r['rollout_s']:.2f} | {r['update_s']:.2f} | {r['policy_fwd_ms']:.2f} "
                f"| {r['env_step_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def report(tables: list[str], command: str) -> str:
    """The whole section: what was measured, then one table per preset."""
    head = [
        "## Training: env steps per second of RecurrentPPO (rollout + update)",
        "",
        f"Command: `{command}`  ",
        f"torch threads 1, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}.",
        "",
        "Targets (issue 5): our `lstm` >= 2x the stock LSTM's steps/s; every memory core at "
        "N=64 >= 0.5x. *steps/s* is the env steps (all envs) of one iteration over the wall "
        "time of the median timed iteration (a single iteration can be stretched by a GC pause "
        "or other work on the machine); *rollout* and *update* split it (medians); *policy fwd* "
        "is one rollout "
        "step of the policy for all envs (T = 1, no grad: what `collect_rollouts` calls per "
        "step, actor and critic); *env step* is one `VecEnv.step` with random actions.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memagents.bench train", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--envs",
        default=None,
        help=f"env ids, comma-separated (default {','.join(ENVS)}; for the batched preset "
        "memagents/Copy-v0,memagents/Recall-v0)",
    )
    parser.add_argument(
        "--systems", default=None, help="subset of rows: stock and/or core names, comma-separated"
    )
    parser.add_argument(
        "--presets",
        default=",".join(PRESETS),
        help=f"hyperparameter presets, comma-separated ({', '.join(PRESETS)}), or 'batched': "
        "1,024 batched envs, the device collector against SB3's, with the time split "
        "(its own section of BENCHMARKS.md)",
    )
    parser.add_argument(
        "--device", default="cpu", help="batched preset: where env, policy and buffer live"
    )
    parser.add_argument("--iterations", type=int, default=None, help="PPO iterations per row")
    parser.add_argument(
        "--critic",
        choices=list(CRITICS),
        default="separate",
        help="critic mode of every row (separate: sb3-contrib's default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, in this process (smoke run)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="measure every row in this process"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; keep BENCHMARKS.md")
    parser.add_argument("--output", default=None, help="Markdown file to update")
    args = parser.parse_args(argv)
    if "batched" in args.presets.split(","):
        return _main_batched(parser, args, argv)
    if args.device != "cpu":
        parser.error(f"--device {args.device}: only --presets batched runs off the CPU")
    if args.envs is None:
        args.envs = ",".join(ENVS)
    presets = ["quick"] if args.quick else [p for p in args.presets.split(",") if p]
    for preset in presets:
        if preset != "quick" and preset not in PRESETS:
            parser.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if args.iterations is not None and args.iterations < 2:
        parser.error(f"--iterations must be >= 2 (one warm-up); got {args.iterations}")
    env_ids = [e for e in args.envs.split(",") if e]
    systems = args.systems.split(",") if args.systems else None
    specs = build_specs(env_ids, systems)
    if not specs:
        parser.error(f"no rows for --envs {args.envs!r} --systems {args.systems!r}")
    from memagents import train

    for env_id in env_ids:
        try:
            train.check_names(_config(Spec("", "lstm", env_id), HYPER))
        except ValueError as exc:
            parser.error(str(exc))

    in_process = args.quick or args.in_process
    tables = []
    for preset in presets:
        hyper = dict(QUICK if preset == "quick" else PRESETS[preset])
        if args.iterations is not None:
            hyper["iterations"] = args.iterations
        hyper["critic"] = args.critic
        rows = []
        allowed = hyper.get("systems")
        for spec in specs:
            if allowed is not None and spec.system not in allowed:
                continue
            result = (_measure if in_process else _measure_in_subprocess)(spec, hyper)
            rows.append({**asdict(spec), **result})
            print(
                f"{preset:<6} {spec.env_id:<22} {spec.label:<32} "
                f"{result['steps_per_s']:7.0f} steps/s  rollout {result['rollout_s']:6.2f} s  "
                f"update {result['update_s']:6.2f} s  policy fwd "
                f"{result['policy_fwd_ms']:5.2f} ms  env {result['env_step_ms']:5.2f} ms",
                flush=True,
            )
        tables.append(to_markdown(rows, preset, hyper, fresh=not in_process))
    command = _command(argv)
    markdown = report(tables, command)
    print()
    print(markdown)
    if not args.no_write:
        from memagents.bench.report import write_section

        path = write_section("train", markdown, args.output)
        print(f"wrote the train section of {path}")
    return 0


def _command(argv: list[str] | None) -> str:
    """The command line of this run, as the section prints it."""
    args = argv if argv is not None else sys.argv[2:]
    return ("python -m memagents.bench train " + " ".join(args)).rstrip()


def _main_batched(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> int:
    """``--presets batched``: the collector rows (``memagents.bench.collector``)."""
    import torch

    from memagents import train
    from memagents.bench import collector

    if args.presets != "batched":
        parser.error("--presets batched runs alone (its own table and section)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    env_ids = [e for e in (args.envs or ",".join(collector.ENVS)).split(",") if e]
    cores = args.systems.split(",") if args.systems else ["lstm", *collector.MEMORY]
    import memagents.cores as core_registry

    known = ["lstm", *core_registry.available()]
    for core in cores:
        if core not in known:
            parser.error(f"--systems: unknown core {core!r}; choose from {', '.join(known)}")
    cores = [c for c in cores if c in known]
    for env_id in env_ids:
        try:
            train.check_names(
                collector.config_for(env_id, "lstm", "device", collector.PRESET, "cpu")
            )
        except ValueError as exc:
            parser.error(str(exc))
        if not env_id.startswith("memagents/"):
            parser.error(f"--envs {env_id!r}: the batched preset needs memagents/ tasks")
    hyper = dict(collector.QUICK if args.quick else collector.PRESET)
    if args.iterations is not None:
        hyper["iterations"] = args.iterations
    rows = collector.run(env_ids, cores, hyper, args.device, args.quick or args.in_process)
    command = _command(argv)
    markdown = collector.to_markdown(rows, hyper, args.device, command)
    print()
    print(markdown)
    if not args.no_write:
        from memagents.bench.report import write_section

        path = write_section("train-batched", markdown, args.output)
        print(f"wrote the train-batched section of {path}")
    return 0
