"""``python -m memagents.evaluate --run RUN_DIR``: evaluate a trained run, and its length generalisation.

Loads the run's final ``model.zip`` (or ``--checkpoint PATH``) with the run's own
``config.yaml``, plays ``--episodes N`` deterministic episodes on a fresh environment (seed
``train.seed + 20000`` unless ``--seed``; training evaluated on ``+ 10000``) and prints and writes
mean/std reward and success rate to ``RUN_DIR/evaluate.json`` (``evaluate-<checkpoint>.json``
for a checkpoint).

``--lengths 5,10,20,40`` (algorithmic ``memagents/`` tasks only) repeats the evaluation with every
episode at exactly each "length", beyond the training range if asked. What a length sets depends
on the task (:data:`LENGTH_KNOBS`): ``Recall``: the delay (``min_delay = max_delay = L``);
``AssociativeRecall``: the number of items (``min_items = max_items = L``); ``Copy``,
``RepeatCopy``, ``PrioritySort``, ``Adding``, ``Argmax``: the sequence length
(``min_length = max_length = L``). The other knobs keep their training values.

Bad input (no such run, checkpoint, a malformed ``--lengths``, a length the task cannot take)
exits with code 2 and one line, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from memagents.config import Config, ConfigError, from_dict, read_yaml

EXIT_BAD_INPUT = 2
#: offset of the evaluation seed from the training seed (training's own evaluations use 10000).
SEED_OFFSET = 20_000


def _length_knobs() -> dict[type, tuple[str, str]]:
    import envs
    from envs.numbers import NumberSequenceEnv

    return {
        envs.RecallEnv: ("min_delay", "max_delay"),
        envs.AssociativeRecallEnv: ("min_items", "max_items"),
        envs.CopyEnv: ("min_length", "max_length"),
        envs.RepeatCopyEnv: ("min_length", "max_length"),
        envs.PrioritySortEnv: ("min_length", "max_length"),
        NumberSequenceEnv: ("min_length", "max_length"),  # Adding, Argmax
    }


#: task class -> (low, high) difficulty knobs that a "length" L sets to (L, L); see the docstring.
LENGTH_KNOBS = _length_knobs()


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m memagents.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a run directory of train")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint .zip instead of model.zip")
    p.add_argument("--episodes", type=int, default=100, help="deterministic episodes (100)")
    p.add_argument("--lengths", metavar="L1,L2,...", help="lengths to evaluate at, e.g. 5,10,20,40")
    p.add_argument("--seed", type=int, help="seed of the evaluation env (train.seed + 20000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cpu)")
    p.add_argument("--output", metavar="PATH", help="JSON file to write (RUN_DIR/evaluate.json)")
    p.add_argument(
        "--record",
        metavar="OUT.gif",
        help="record one episode (environment beside the memory heatmaps) as .gif or .mp4",
    )
    p.add_argument("--png-dir", metavar="DIR", help="also write the recorded frames as PNGs")
    p.add_argument("--fps", type=int, default=2, help="frames per second of the recording (2)")
    return p


def parse_lengths(text: str) -> list[int]:
    """``"5,10,20"`` -> ``[5, 10, 20]``; anything but positive integers is a ConfigError."""
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--lengths {text!r}: expected comma-separated integers, e.g. 5,10,20,40"
        ) from None
    if not lengths or any(n < 0 for n in lengths):
        raise ConfigError(f"--lengths {text!r}: lengths must be integers >= 0")
    return lengths


def length_knobs(task: Any, length: int) -> dict[str, int]:
    """The difficulty knobs that put every episode of ``task`` at ``length`` (see the docstring)."""
    for cls, (low, high) in LENGTH_KNOBS.items():
        if isinstance(task, cls):
            return {low: length, high: length}
    raise ConfigError(
        f"--lengths: {type(task).__name__} has no length knob; --lengths works for the "
        "algorithmic memagents/ tasks (Recall, Copy, RepeatCopy, AssociativeRecall, "
        "PrioritySort, Adding, Argmax)"
    )


def load_run(run_dir: Path, checkpoint: str | None) -> tuple[Config, Path]:
    """The run's validated config and the model file to load."""
    from memagents.train import check_names

    if not run_dir.is_dir():
        raise ConfigError(f"--run {str(run_dir)!r}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {str(run_dir)!r}: no config.yaml (not a run directory of train)")
    config = from_dict(read_yaml(run_dir / "config.yaml"))
    check_names(config)
    if checkpoint is not None:
        model_path = Path(checkpoint)
        if not model_path.is_file():
            raise ConfigError(f"--checkpoint {checkpoint!r}: no such file")
    else:
        model_path = run_dir / "model.zip"
        if not model_path.is_file():
            raise ConfigError(
                f"--run {str(run_dir)!r}: no model.zip (training unfinished?); pass "
                "--checkpoint RUN_DIR/checkpoints/step_N.zip"
            )
    return config, model_path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, evaluate, sweep lengths; return the report written to JSON."""
    import torch
    from sb3_contrib import RecurrentPPO

    from memagents.sb3 import MemoryPPO
    from memagents.train import (
        eval_env_count,
        evaluate,
        make_env,
        normalization_path,
        normalize_env,
        resolve_device,
    )

    if args.episodes < 1:
        raise ConfigError(f"--episodes {args.episodes}: must be an integer >= 1")
    lengths = parse_lengths(args.lengths) if args.lengths is not None else []
    run_dir = Path(args.run)
    config, model_path = load_run(run_dir, args.checkpoint)
    torch.set_num_threads(config.train.torch_threads)
    device = resolve_device(args.device)
    seed = config.train.seed + SEED_OFFSET if args.seed is None else args.seed

    # a run that normalised (env.normalize) is evaluated with its saved training statistics
    env = normalize_env(
        config,
        make_env(config, seed, n_envs=eval_env_count(config, args.episodes)),
        training=False,
        stats=normalization_path(model_path),
    )
    task = env.get_attr("unwrapped")[0]
    if lengths:
        length_knobs(task, 1)  # fail before loading when the task has no length knob
    algorithm = MemoryPPO if config.ppo.buffer == "sequence-start" else RecurrentPPO
    try:
        model = algorithm.load(model_path, env=env, device=device)
    except Exception as exc:  # a corrupt or foreign zip is bad input, not a crash
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot load model {str(model_path)!r}: {first_line}") from None

    # load(env=...) checks the spaces but also re-seeds the env with the *training* seed
    # (SB3's _setup_model -> set_random_seed): seed it again with the evaluation seed
    env.seed(seed)
    start = time.time()
    report: dict[str, Any] = {
        "run": str(run_dir),
        "model": str(model_path),
        "env": config.env.id,
        "core": config.core.name,
        "seed": seed,
        "num_timesteps": int(model.num_timesteps),
        **evaluate(model, env, args.episodes),
    }
    if lengths:
        trained = dict(getattr(task, "difficulty", {}))
        report["trained_difficulty"] = trained
        rows = []
        for length in lengths:
            knobs = length_knobs(task, length)
            try:
                env.env_method("set_difficulty", **knobs)
            except ValueError as exc:
                raise ConfigError(f"--lengths: length {length}: {exc}") from None
            env.seed(seed)  # evaluate() resets: its first episode is at the new length
            rows.append({"length": length, "knobs": knobs, **evaluate(model, env, args.episodes)})
        env.env_method("set_difficulty", **trained)
        report["lengths"] = rows
    if args.record or args.png_dir:
        report["recording"] = record(config, model, seed, args)
    report["seconds"] = round(time.time() - start, 2)
    env.close()
    return report


def record(config: Config, model: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One deterministic episode drawn frame by frame (``memagents.record``)."""
    import dataclasses

    from memagents.record import record_episode, save_frames
    from memagents.train import make_env

    if args.record and Path(args.record).suffix.lower() not in (".gif", ".mp4"):
        raise ConfigError(f"--record {args.record!r}: the file must end in .gif or .mp4")
    if args.fps < 1:
        raise ConfigError(f"--fps {args.fps}: must be an integer >= 1")
    if config.env.normalize.obs or config.env.normalize.reward:
        raise ConfigError("--record: runs with env.normalize (VecNormalize) are not recorded yet")
    kwargs = {**config.env.kwargs, "render_mode": "rgb_array"}
    render_config = dataclasses.replace(config, env=dataclasses.replace(config.env, kwargs=kwargs))
    venv = make_env(render_config, seed, n_envs=1)
    try:
        venv.seed(seed)
        frames, info = record_episode(model, venv)
    except ValueError as exc:
        raise ConfigError(f"--record: {exc}") from None
    finally:
        venv.close()
    try:
        save_frames(frames, args.record, args.png_dir, fps=args.fps)
    except ValueError as exc:
        raise ConfigError(f"--record: {exc}") from None
    episode = info.get("episode", {})
    return {
        "file": args.record,
        "png_dir": args.png_dir,
        "frames": len(frames),
        "episode_length": int(episode["l"]) if "l" in episode else None,
        "episode_return": float(episode["r"]) if "r" in episode else None,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['env']} {report['core']} ({report['model']}, {report['num_timesteps']} steps): "
        f"mean reward {report['mean_reward']:.3f} ± {report['std_reward']:.3f}, "
        f"success {report['success_rate']:.2f} over {report['episodes']} episodes"
    ]
    if "lengths" in report:
        lines.append(f"length generalisation (trained on {report['trained_difficulty']}):")
        lines.append("| length | knobs | mean reward | std | success rate |")
        lines.append("|---:|---|---:|---:|---:|")
        for row in report["lengths"]:
            knobs = ", ".join(f"{k}={v}" for k, v in row["knobs"].items())
            lines.append(
                f"| {row['length']} | {knobs} | {row['mean_reward']:.3f} | "
                f"{row['std_reward']:.3f} | {row['success_rate']:.2f} |"
            )
    return "\n".join(lines)


def output_path(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output)
    name = (
        "evaluate.json"
        if args.checkpoint is None
        else f"evaluate-{Path(args.checkpoint).stem}.json"
    )
    return Path(args.run) / name


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        report = run(args)
    except ConfigError as exc:
        print(f"memagents.evaluate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from memagents.train import atomic_write_text

    path = output_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2))
    print(format_report(report))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
