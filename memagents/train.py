"""``python -m memagents.train``: one run (env x core x seed) of RecurrentPPO with a memory core.

With no arguments it trains the default of ``configs/default.yaml``. Flags override the config;
``--set key=value`` reaches any dotted key. A run directory holds ``config.yaml`` (the resolved
config), SB3's ``progress.csv`` and TensorBoard events, ``checkpoints/`` (written atomically,
with the RNG and timestep state), ``evaluations.csv``, the final ``model.zip`` and ``eval.json``.
``--resume RUN_DIR`` continues a killed run from its last checkpoint to the original total.

Bad input (unknown keys, env ids or core names, out-of-range values) exits with code 2 and one
line naming the value and what is allowed; a NaN/Inf in a loss, gradient or parameter stops
training with exit code 3, naming the step and the parameter, and leaves the last good
checkpoint in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import yaml

from memagents.config import Config, ConfigError, apply_overrides, from_dict, read_yaml, to_dict

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m memagents.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument(
        "--env",
        help="environment id, e.g. memagents/Recall-v0, or module:EnvId to import module first "
        "(env.id)",
    )
    p.add_argument(
        "--gym-packages",
        metavar="MODULE[,MODULE...]",
        help="modules to import before making the env, for the ids they register, e.g. popgym "
        "(env.packages)",
    )
    p.add_argument("--core", help="core name, e.g. dnc (core.name)")
    p.add_argument("--seed", type=int, help="seed (train.seed)")
    p.add_argument("--total-timesteps", type=int, help="environment steps (train.total_timesteps)")
    p.add_argument("--n-envs", type=int, help="parallel environments (env.n_envs)")
    p.add_argument("--device", help="cpu, cuda or auto (train.device)")
    p.add_argument("--run-dir", help="run directory (default: runs/<env>-<core>-s<seed>-<time>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set core.kwargs.memory_size=32 (repeatable)",
    )
    p.add_argument("--checkpoint-freq", type=int, help="steps between checkpoints")
    p.add_argument(
        "--log-memory-every",
        type=int,
        help="steps between memory heatmaps logged to TensorBoard (train.log_memory_every)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    return p


# -- configuration -----------------------------------------------------------------------------
def resolve_config(args: argparse.Namespace) -> Config:
    """Config file <- flags <- ``--set`` overrides, validated, with env id and core checked."""
    from memagents.config import DEFAULT_CONFIG

    data = read_yaml(args.config or DEFAULT_CONFIG)
    core = data.get("core") if isinstance(data.get("core"), dict) else None
    if args.core is not None and core is not None and core.get("name") != args.core:
        # --core switches the core: keep the file's core kwargs the new core also takes
        import memagents.cores as cores

        if args.core in cores.available() and isinstance(core.get("kwargs"), dict):
            allowed = set(cores.core_kwargs(args.core))
            dropped = sorted(k for k in core["kwargs"] if k not in allowed)
            core["kwargs"] = {k: v for k, v in core["kwargs"].items() if k in allowed}
            if dropped:
                print(
                    f"memagents.train: note: --core {args.core} drops the config's "
                    f"core.kwargs {', '.join(dropped)} (not taken by {args.core})",
                    file=sys.stderr,
                )
    flags = []
    for flag, key in [
        ("env", "env.id"),
        ("core", "core.name"),
        ("seed", "train.seed"),
        ("total_timesteps", "train.total_timesteps"),
        ("n_envs", "env.n_envs"),
        ("device", "train.device"),
        ("checkpoint_freq", "train.checkpoint_freq"),
        ("log_memory_every", "train.log_memory_every"),
    ]:
        value = getattr(args, flag)
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")
    if getattr(args, "gym_packages", None) is not None:
        packages = [m.strip() for m in args.gym_packages.split(",") if m.strip()]
        flags.append(f"env.packages={json.dumps(packages)}")
    apply_overrides(data, flags + list(args.set))
    config = from_dict(data)
    check_names(config)
    return config


def check_names(config: Config) -> None:
    """Unknown env ids, core names and core kwargs are input errors, not tracebacks."""
    import difflib

    import gymnasium as gym

    import memagents.cores as cores

    if config.core.name not in cores.available():
        raise ConfigError(
            f"core.name: unknown core {config.core.name!r}; available: "
            f"{', '.join(cores.available())}"
        )
    allowed = cores.core_kwargs(config.core.name)
    unknown = sorted(set(config.core.kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"core.kwargs: core {config.core.name!r} does not take {unknown[0]!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    import_env_modules(config)
    module, _, name = config.env.id.rpartition(":")
    if module and name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=3)
        raise ConfigError(
            f"env.id: importing {module!r} registered no environment {name!r}"
            + (f"; close: {', '.join(close)}" if close else "")
        )
    prefix = name.split("-", 1)[0].split("/", 1)[0]
    if name not in gym.registry and prefix.isidentifier() and prefix not in sys.modules:
        # an installed package named by the id's prefix (popgym-..., after pip install popgym):
        # import it as --gym-packages would, and keep it in the run's config for evaluate/resume
        if _installed(prefix):
            _import(prefix, f"env.id {config.env.id!r}: importing {prefix!r} for it failed")
            if name in gym.registry:
                config.env.packages.append(prefix)
                print(
                    f"memagents.train: note: imported {prefix!r}, which registers "
                    f"{name!r} (env.packages: [{prefix}])",
                    file=sys.stderr,
                )
    if name not in gym.registry:
        ours = sorted(k for k in gym.registry if k.startswith("memagents/") and "-v" in k)
        hint = "module:EnvId or env.packages (--gym-packages) for the ids a package registers"
        raise ConfigError(
            f"env.id: unknown environment {config.env.id!r}; e.g. {', '.join(ours[:8])}, "
            f"a MiniGrid id, or {hint}"
        )
    if config.env.vec_env == "batched" and not config.env.id.startswith("memagents/"):
        raise ConfigError(
            f"env.vec_env: 'batched' needs a memagents/ environment; got env.id={config.env.id!r}"
        )
    check_policy_kind(config)
    if config.env.vec_env == "batched" and (
        config.env.normalize.obs or config.env.normalize.reward
    ):
        raise ConfigError("env.normalize: VecNormalize needs env.vec_env 'dummy'")
    if config.ppo.credit == "element" and (
        config.env.vec_env != "batched" or config.ppo.buffer != "sequence-start"
    ):
        raise ConfigError(
            "ppo.credit: 'element' needs env.vec_env 'batched' (the algorithmic tasks' batched "
            "env reports a reward per action element) and ppo.buffer 'sequence-start'; got "
            f"env.vec_env={config.env.vec_env!r}, ppo.buffer={config.ppo.buffer!r}"
        )
    if config.ppo.collector == "device" and (
        config.env.vec_env != "batched" or config.ppo.buffer != "sequence-start"
    ):
        raise ConfigError(
            "ppo.collector: 'device' needs env.vec_env 'batched' (an env that steps as tensors) "
            f"and ppo.buffer 'sequence-start'; got env.vec_env={config.env.vec_env!r}, "
            f"ppo.buffer={config.ppo.buffer!r}. Use 'auto' or 'sb3'"
        )
    if config.env.device not in ("auto", "cpu") and config.env.vec_env != "batched":
        raise ConfigError(
            f"env.device: {config.env.device!r} needs env.vec_env 'batched'; other envs step on "
            "the host (use 'auto' or 'cpu')"
        )
    check_env(config)
    check_observation_pipeline(config)
    if config.curriculum.knob:
        from memagents.sb3.curriculum import check_knob

        error = check_knob(config.env.id, config.env.kwargs, config.curriculum.knob)
        if error:
            raise ConfigError(f"curriculum.knob: {error}")


def import_env_modules(config: Config) -> None:
    """Import what registers the config's env id: the ``memagents/`` tasks, ``env.packages``, the
    module of a ``module:EnvId`` id (as ``gymnasium.make`` would) and MiniGrid for its ids. A
    module that cannot be imported is an input error naming it."""
    import memagents  # noqa: F401  (registers the memagents/ ids)
    from memagents.wrappers import is_minigrid_id

    for name in config.env.packages:
        _import(name, f"env.packages: cannot import {name!r}")
    module, _, name = config.env.id.rpartition(":")
    if module:
        _import(module, f"env.id {config.env.id!r}: cannot import module {module!r}")
    if is_minigrid_id(name):
        import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI ids)


def _import(module: str, error: str) -> None:
    """``importlib.import_module``; any failure is a ConfigError starting with ``error``."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as exc:  # an import runs arbitrary code: report any failure as one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{error} ({reason}); is its package installed?") from None


def _installed(module: str) -> bool:
    """Whether a top-level module can be imported (found without importing it: an id's prefix
    only suggests a module to import, it is not imported unasked)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_env(config: Config) -> None:
    """``env.kwargs`` must construct the env, ``env.actions`` name actions of its ``Discrete``
    action space, the action space must be one RecurrentPPO takes and the observation wrapper
    must take the observation space: all input errors, not tracebacks."""
    if config.env.vec_env == "batched" and config.env.actions:
        raise ConfigError("env.actions: the batched env takes no action subset; use vec_env dummy")
    check_wrapper_name(config)
    import gymnasium as gym
    from gymnasium import spaces

    from memagents.wrappers import WRAPPERS, ActionSubset, sb3_takes

    # the action spaces of SB3's distributions (make_proba_distribution)
    action_spaces = (spaces.Discrete, spaces.MultiDiscrete, spaces.Box, spaces.MultiBinary)

    try:
        env = gym.make(config.env.id, **single_env_kwargs(config))
    except (TypeError, ValueError, gym.error.Error) as exc:
        raise ConfigError(f"env.kwargs {config.env.kwargs!r}: {exc}") from None
    try:
        if config.env.actions:
            env = ActionSubset(env, list(config.env.actions))
        action_space = env.action_space
        if not isinstance(action_space, action_spaces) or (
            isinstance(action_space, (spaces.Discrete, spaces.MultiDiscrete))
            and np.any(action_space.start)
        ):
            raise ConfigError(
                f"env.id {config.env.id!r}: its action space {action_space} is not one "
                f"RecurrentPPO takes ({', '.join(c.__name__ for c in action_spaces)}; "
                "Discrete and MultiDiscrete starting at 0)"
            )
        name = env_wrapper(config, env.observation_space)
        if name == "none" and not sb3_takes(env.observation_space):
            raise ConfigError(
                f"env.wrapper: 'none' passes {env.observation_space} observations, which SB3 "
                f"cannot take; use env.wrapper flatten (or auto) for env.id={config.env.id!r}"
            )
        cls = WRAPPERS[name]
        if cls is not None:
            kwargs = {"mission": config.env.mission} if name == "minigrid" else {}
            cls(env, **kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        env.close()


def check_observation_pipeline(config: Config) -> None:
    """Wrapper and features extractor names (registry keys) and the extractor's kwargs."""
    import inspect

    from memagents.sb3.extractors import FEATURES_EXTRACTORS

    check_wrapper_name(config)
    wrapper = env_wrapper(config)
    if wrapper != "none" and config.env.vec_env == "batched":
        raise ConfigError("env.vec_env: 'batched' cannot apply env.wrapper; use 'dummy'")
    name = config.policy.features_extractor
    if name not in FEATURES_EXTRACTORS:
        raise ConfigError(
            f"policy.features_extractor: unknown extractor {name!r}; allowed: "
            f"{', '.join(FEATURES_EXTRACTORS)}"
        )
    if name == "minigrid" and wrapper != "minigrid":
        raise ConfigError(
            "policy.features_extractor: 'minigrid' reads the codes of env.wrapper 'minigrid'; "
            f"env.wrapper resolves to {wrapper!r} for env.id={config.env.id!r}"
        )
    cls = FEATURES_EXTRACTORS[features_extractor(config)]
    kwargs = config.policy.features_extractor_kwargs
    if kwargs and cls is None:
        raise ConfigError(
            "policy.features_extractor_kwargs: set policy.features_extractor to name the "
            f"extractor they are for; got {sorted(kwargs)} with 'auto' resolving to SB3's default"
        )
    if cls is not None:
        allowed = [
            p
            for p in inspect.signature(cls.__init__).parameters
            if p not in ("self", "observation_space")
        ]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(
                f"policy.features_extractor_kwargs: extractor {features_extractor(config)!r} does "
                f"not take {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}"
            )


def check_wrapper_name(config: Config) -> None:
    """``env.wrapper`` names a registered wrapper, and ``minigrid`` only for MiniGrid ids."""
    from memagents.wrappers import WRAPPERS, is_minigrid_id

    wrappers = ["auto", *WRAPPERS]
    if config.env.wrapper not in wrappers:
        raise ConfigError(
            f"env.wrapper: unknown wrapper {config.env.wrapper!r}; allowed: {', '.join(wrappers)}"
        )
    if config.env.wrapper == "minigrid" and not is_minigrid_id(config.env.id):
        raise ConfigError(
            f"env.wrapper: 'minigrid' needs a MiniGrid environment; got env.id={config.env.id!r}"
        )


def env_wrapper(config: Config, observation_space=None) -> str:
    """The observation wrapper a config resolves to: ``env.wrapper``, or for ``auto``
    ``memagents.wrappers.default_wrapper`` of the id and the env's observation space (an env is
    made to read it when ``observation_space`` is not given and the id does not decide)."""
    from memagents.wrappers import default_wrapper, is_minigrid_id

    if config.env.wrapper != "auto":
        return config.env.wrapper
    if observation_space is None and not is_minigrid_id(config.env.id):
        import gymnasium as gym

        import_env_modules(config)
        env = gym.make(config.env.id, **single_env_kwargs(config))
        observation_space = env.observation_space
        env.close()
    return default_wrapper(config.env.id, observation_space)


def features_extractor(config: Config) -> str:
    """The features extractor a config resolves to: ``auto`` is ``minigrid`` for MiniGrid-wrapped
    envs and stays ``auto`` (MemoryPolicy's default) otherwise."""
    name = config.policy.features_extractor
    if name == "auto" and env_wrapper(config) == "minigrid":
        return "minigrid"
    return name


def default_run_dir(config: Config) -> Path:
    env = config.env.id.replace("/", "_")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{env}-{config.core.name}-s{config.train.seed}-{stamp}"


# -- building blocks ---------------------------------------------------------------------------
def make_env(config: Config, seed: int, n_envs: int | None = None):
    """The vectorised environment of a config (SB3 ``VecEnv``)."""
    from stable_baselines3.common.env_util import make_vec_env

    n = n_envs or config.env.n_envs
    if config.env.vec_env == "batched":
        from memagents.sb3 import TorchVecEnv

        device = env_device(config)
        return TorchVecEnv.make(config.env.id, n, device=device, seed=seed, **config.env.kwargs)
    from memagents.wrappers import WRAPPERS, ActionSubset

    import_env_modules(config)
    name = env_wrapper(config)
    observation_wrapper = WRAPPERS[name]
    wrapper_kwargs = {"mission": config.env.mission} if name == "minigrid" else {}
    actions = list(config.env.actions)

    def wrapper(env):  # outside SB3's Monitor
        if actions:
            env = ActionSubset(env, actions)
        return env if observation_wrapper is None else observation_wrapper(env, **wrapper_kwargs)

    return make_vec_env(
        config.env.id,
        n_envs=n,
        seed=seed,
        env_kwargs=single_env_kwargs(config),
        wrapper_class=wrapper,
    )


def single_env_kwargs(config: Config) -> dict[str, Any]:
    """``gym.make`` keyword arguments of one (non-batched) env of a config: ``env.kwargs``, and
    ``render_mode=None`` for the algorithmic tasks (SB3's ``make_vec_env`` asks for
    ``"rgb_array"``; they render text). Other envs keep SB3's request: an env whose constructor
    takes no ``render_mode`` (POPGym's) is made again without it by ``make_vec_env``."""
    kwargs = dict(config.env.kwargs)
    if config.env.id.rpartition(":")[2].startswith("memagents/"):
        kwargs.setdefault("render_mode", None)
    return kwargs


def _activations() -> dict[str, Any]:
    from torch import nn

    return {"tanh": nn.Tanh, "relu": nn.ReLU}


#: ``policy.activation`` -> the ``nn.Module`` class of the heads' activation.
ACTIVATIONS: dict[str, Any] = _activations()


def policy_kwargs(config: Config) -> dict[str, Any]:
    """``policy_kwargs`` for ``RecurrentPPO(MemoryPolicy, ...)`` from the config."""
    from memagents.sb3.extractors import FEATURES_EXTRACTORS

    critic = config.policy.critic
    kwargs = {
        "core": config.core.name,
        "core_kwargs": dict(config.core.kwargs),
        "net_arch": list(config.policy.net_arch),
        "shared_lstm": critic in ("shared", "joint"),
        "train_shared_core": critic == "joint",
        "enable_critic_lstm": critic == "separate",
        "activation_fn": ACTIVATIONS[config.policy.activation],
        "ortho_init": config.policy.ortho_init,
    }
    extractor = FEATURES_EXTRACTORS[features_extractor(config)]
    if extractor is not None:
        kwargs["features_extractor_class"] = extractor
        kwargs["features_extractor_kwargs"] = dict(config.policy.features_extractor_kwargs)
    return kwargs


def ppo_kwargs(config: Config) -> dict[str, Any]:
    """RecurrentPPO's hyperparameters from ``config.ppo`` (shared with the training benchmark's
    stock row, so every system trains with the same ones)."""
    ppo = config.ppo
    return {
        "learning_rate": schedule(ppo.lr_schedule, ppo.learning_rate),
        "n_steps": ppo.n_steps,
        "batch_size": ppo.batch_size,
        "n_epochs": ppo.n_epochs,
        "gamma": ppo.gamma,
        "gae_lambda": ppo.gae_lambda,
        "clip_range": schedule(ppo.clip_range_schedule, ppo.clip_range),
        "ent_coef": ppo.ent_coef,
        "vf_coef": ppo.vf_coef,
        "max_grad_norm": ppo.max_grad_norm,
        "target_kl": ppo.target_kl or None,
    }


def schedule(kind: str, value: float):
    """``ppo.lr_schedule`` / ``ppo.clip_range_schedule``: ``constant`` is ``value``; ``linear`` is
    SB3's ``LinearSchedule`` from ``value`` at the start (``progress_remaining = 1``) to 0 at the
    end, RL Zoo's ``lin_<value>`` (``progress_remaining * value``)."""
    if kind == "constant":
        return value
    from stable_baselines3.common.utils import LinearSchedule

    return LinearSchedule(start=value, end=0.0, end_fraction=1.0)


def stock_policy_kwargs(config: Config) -> dict[str, Any]:
    """``policy_kwargs`` of sb3-contrib's ``MlpLstmPolicy`` (``policy.kind: stock``): the same
    heads, critic mode, activation, initialisation and extractor as :func:`policy_kwargs`, with
    ``core.kwargs`` ``hidden_size`` (64 unless given, our ``lstm`` core's default) and
    ``num_layers`` as ``lstm_hidden_size`` and ``n_lstm_layers``."""
    ours = policy_kwargs(config)
    kwargs = {
        "lstm_hidden_size": int(config.core.kwargs.get("hidden_size", 64)),
        "n_lstm_layers": int(config.core.kwargs.get("num_layers", 1)),
    }
    for key in ("net_arch", "shared_lstm", "enable_critic_lstm", "activation_fn", "ortho_init"):
        kwargs[key] = ours[key]
    for key in ("features_extractor_class", "features_extractor_kwargs"):
        if key in ours:
            kwargs[key] = ours[key]
    return kwargs


#: ``core.kwargs`` that ``policy.kind: stock`` maps onto ``MlpLstmPolicy``'s arguments.
STOCK_CORE_KWARGS = ("hidden_size", "num_layers")


def check_policy_kind(config: Config) -> None:
    """``policy.kind: stock`` runs sb3-contrib's own LSTM policy: only with ``core.name: lstm``,
    ``ppo.buffer: stock``, a critic mode it has and the core kwargs it maps."""
    if config.policy.kind != "stock":
        return
    if config.core.name != "lstm":
        raise ConfigError(f"policy.kind: 'stock' is an LSTM; got core.name={config.core.name!r}")
    if config.ppo.buffer != "stock":
        raise ConfigError(
            f"policy.kind: 'stock' trains with ppo.buffer 'stock'; got {config.ppo.buffer!r}"
        )
    if config.policy.critic == "joint":
        raise ConfigError("policy.kind: 'stock' has no policy.critic 'joint'")
    unknown = sorted(set(config.core.kwargs) - set(STOCK_CORE_KWARGS))
    if unknown:
        raise ConfigError(
            f"core.kwargs: policy.kind 'stock' does not take {unknown[0]!r}; "
            f"allowed: {', '.join(STOCK_CORE_KWARGS)}"
        )
    if config.env.vec_env == "batched":
        raise ConfigError("env.vec_env: 'batched' needs policy.kind 'memory'")


def algorithm_class(config: Config):
    """``MemoryPPO`` for ``ppo.buffer: sequence-start``, else sb3-contrib's ``RecurrentPPO``."""
    from sb3_contrib import RecurrentPPO

    from memagents.sb3 import MemoryPPO

    return MemoryPPO if config.ppo.buffer == "sequence-start" else RecurrentPPO


#: ``ppo.pack_segments`` -> MemoryPPO's ``pack_segments``.
PACK_SEGMENTS = {"auto": None, "always": True, "never": False}


def make_model(config: Config, env, device: str, tensorboard_log: str | None = None):
    from memagents.sb3 import MemoryPolicy, StockLstmPolicy

    algorithm = algorithm_class(config)
    extra = {}
    if config.ppo.buffer == "sequence-start":
        extra["pack_segments"] = PACK_SEGMENTS[config.ppo.pack_segments]
        extra["credit"] = config.ppo.credit
        extra["collector"] = config.ppo.collector
    stock = config.policy.kind == "stock"
    return algorithm(
        StockLstmPolicy if stock else MemoryPolicy,
        env,
        **ppo_kwargs(config),
        **extra,
        policy_kwargs=stock_policy_kwargs(config) if stock else policy_kwargs(config),
        seed=config.train.seed,
        device=device,
        tensorboard_log=tensorboard_log,
        verbose=0,
    )


def env_device(config: Config) -> str:
    """``env.device`` resolved: ``auto`` is the training device (``train.device`` resolved)."""
    if config.env.device == "auto":
        return resolve_device(config.train.device)
    return resolve_device(config.env.device, key="env.device")


def resolve_device(name: str, key: str = "train.device") -> str:
    """A device setting resolved: ``auto`` is CUDA when there is a GPU, else the CPU; a CUDA
    device without a GPU is a ``ConfigError`` naming ``key``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} requested but CUDA is not available; use cpu")
    return name


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


#: most episodes an evaluation steps at once on a batched env (``eval_env_count``)
EVAL_BATCH = 256


def eval_env_count(config: Config, episodes: int) -> int:
    """Envs of an evaluation env: with ``env.vec_env: batched`` all ``episodes`` at once (up to
    :data:`EVAL_BATCH`; one policy call per step for all of them, SB3's ``evaluate_policy``
    spreading the episodes evenly over the envs so that short episodes are not favoured),
    else 1."""
    return min(episodes, EVAL_BATCH) if config.env.vec_env == "batched" else 1


def evaluate(model, env, episodes: int) -> dict[str, float]:
    """Deterministic episodes with the recurrent state carried: mean/std reward, success rate
    (NaN if the env reports no ``is_success``) and mean episode length in steps. A batched env
    with our policy plays them all as one batch of tensors on the device
    (``memagents.sb3.device.evaluate_batched``: the same episodes as SB3's ``evaluate_policy``)."""
    from stable_baselines3.common.evaluation import evaluate_policy

    from memagents.sb3.device import batched_env, evaluate_batched

    batched = batched_env(env)
    if batched is not None and hasattr(model.policy, "initial_state"):
        played = evaluate_batched(model.policy, batched, episodes)
        return {
            "mean_reward": float(np.mean(played["rewards"])),
            "std_reward": float(np.std(played["rewards"])),
            "success_rate": float(np.mean(played["successes"])),
            "mean_length": float(np.mean(played["lengths"])),
            "episodes": len(played["rewards"]),
        }

    successes: list[float] = []

    def on_step(locals_: dict[str, Any], _globals: dict[str, Any]) -> None:
        if locals_["done"]:
            info = locals_["info"]
            if "is_success" in info:
                successes.append(float(info["is_success"]))

    rewards, lengths = evaluate_policy(
        model,
        env,
        n_eval_episodes=episodes,
        deterministic=True,
        return_episode_rewards=True,
        callback=on_step,
        warn=False,
    )
    return {
        "mean_reward": float(np.mean(rewards)),
        "std_reward": float(np.std(rewards)),
        "success_rate": float(np.mean(successes)) if successes else float("nan"),
        "mean_length": float(np.mean(lengths)),
        "episodes": len(rewards),
    }


# -- observation and reward normalisation (env.normalize) ----------------------------------------
def normalization_path(model_path: Path) -> Path:
    """Where the ``VecNormalize`` statistics of a model file live: ``<model>.vecnormalize.pkl``
    beside ``model.zip`` or ``checkpoints/step_<n>.zip``."""
    return Path(model_path).with_suffix(".vecnormalize.pkl")


def normalize_env(config: Config, venv, training: bool = True, stats: Path | None = None):
    """``venv`` wrapped in SB3's ``VecNormalize`` as ``env.normalize`` asks (unchanged when it
    asks for nothing).

    :param training: the rollout env (statistics update; rewards scaled if
        ``env.normalize.reward``), else an evaluation env (statistics frozen, the env's rewards).
    :param stats: statistics saved by :func:`save_normalization` to start from (resume, evaluate).
    """
    norm = config.env.normalize
    if not (norm.obs or norm.reward):
        return venv
    from stable_baselines3.common.vec_env import VecNormalize

    if stats is not None:
        if not Path(stats).is_file():
            raise ConfigError(
                f"{str(stats)!r} is missing: the run normalises (env.normalize) and needs the "
                "statistics saved beside its model"
            )
        env = VecNormalize.load(str(stats), venv)
    else:
        env = VecNormalize(venv, norm_obs=norm.obs, norm_reward=norm.reward, gamma=config.ppo.gamma)
    env.training = training
    env.norm_obs = norm.obs
    env.norm_reward = norm.reward and training
    return env


def save_normalization(model, model_path: Path) -> Path | None:
    """Save the training env's ``VecNormalize`` statistics beside ``model_path`` (atomically);
    ``None`` when the run does not normalise."""
    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is None:
        return None
    path = normalization_path(model_path)
    tmp = path.with_name(f".{path.name}.tmp")
    vec_normalize.save(str(tmp))
    os.replace(tmp, path)
    return path


def sync_normalization(model, eval_env) -> None:
    """Give an evaluation env the training env's current ``VecNormalize`` statistics."""
    from stable_baselines3.common.vec_env import VecNormalize, sync_envs_normalization

    if isinstance(eval_env, VecNormalize):
        sync_envs_normalization(model.get_env(), eval_env)


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(model, run_dir: Path) -> Path:
    """Write ``checkpoints/step_<n>.zip`` and its RNG/timestep state, then point ``latest.json``
    at them; each file is written under a temporary name and renamed, so a kill at any moment
    leaves the previous checkpoint intact."""
    import torch

    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    steps = int(model.num_timesteps)
    zip_path = ckpt_dir / f"step_{steps}.zip"
    tmp = ckpt_dir / f".step_{steps}.tmp.zip"
    model.save(tmp)
    os.replace(tmp, zip_path)
    stats = save_normalization(model, zip_path)
    rng_path = ckpt_dir / f"step_{steps}.rng.pt"
    tmp_rng = ckpt_dir / f".step_{steps}.rng.tmp"
    torch.save(rng_state(), tmp_rng)
    os.replace(tmp_rng, rng_path)
    latest = {"num_timesteps": steps, "model": zip_path.name, "rng": rng_path.name}
    if stats is not None:
        latest["vecnormalize"] = stats.name
    atomic_write_text(ckpt_dir / "latest.json", json.dumps(latest))
    return zip_path


def rng_state() -> dict[str, Any]:
    """The global RNG states a run resumes (torch, CUDA when present, NumPy's legacy global RNG
    that SB3 seeds, Python's ``random``), as plain tensors and numbers only, so that a checkpoint
    loads with ``torch.load(..., weights_only=True)``, which unpickles no Python objects."""
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (SB3 seeds it)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(gauss),
        "python_version": int(version),
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss_next": gauss_next,  # None or a float
    }
    if kind != "MT19937":
        raise RuntimeError(f"NumPy's global RNG is {kind!r}; checkpoints store MT19937 only")
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    internal = tuple(int(v) for v in state["python_internal"].tolist())
    random.setstate((state["python_version"], internal, state["python_gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "checkpoints" / "latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


# -- callbacks ---------------------------------------------------------------------------------
def make_callbacks(config: Config, run_dir: Path, eval_env):
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    from memagents import allocator

    class TrainingDiverged(RuntimeError):
        pass

    class RunCallback(BaseCallback):
        """Periodic checkpoints and evaluations; stops on non-finite values."""

        def __init__(self) -> None:
            super().__init__()
            self.next_ckpt = 0
            self.next_eval = 0
            self.hooks: list[Any] = []

        def _on_training_start(self) -> None:
            t = self.model.num_timesteps
            ck, ev = config.train.checkpoint_freq, config.train.eval_freq
            self.next_ckpt = (t // ck + 1) * ck if ck else float("inf")
            self.next_eval = (t // ev + 1) * ev if ev else float("inf")
            for name, param in self.model.policy.named_parameters():
                self.hooks.append(param.register_hook(self._grad_check(name)))

        def _grad_check(self, name: str):
            def hook(grad: torch.Tensor) -> None:
                if not torch.isfinite(grad).all():
                    raise TrainingDiverged(
                        f"non-finite gradient in {name} at step {self.model.num_timesteps}"
                    )

            return hook

        def _on_training_end(self) -> None:
            for h in self.hooks:
                h.remove()
            self.hooks.clear()

        def _on_rollout_end(self) -> None:
            allocator.release()  # the collection's freed tensors (memagents/allocator.py)

        def _on_rollout_start(self) -> None:
            allocator.release()  # the update's freed tensors
            # after each update: parameters and losses must be finite
            for name, param in self.model.policy.named_parameters():
                if not torch.isfinite(param).all():
                    raise TrainingDiverged(
                        f"non-finite parameter {name} at step {self.model.num_timesteps}"
                    )
            for key, value in self.model.logger.name_to_value.items():
                if key.startswith("train/") and not np.isfinite(value):
                    raise TrainingDiverged(
                        f"non-finite {key} = {value} at step {self.model.num_timesteps}"
                    )

        def _on_step(self) -> bool:
            t = self.model.num_timesteps
            if t >= self.next_ckpt:
                save_checkpoint(self.model, run_dir)
                self.next_ckpt += config.train.checkpoint_freq
            if t >= self.next_eval:
                sync_normalization(self.model, eval_env)
                result = evaluate(self.model, eval_env, config.train.eval_episodes)
                for key in ("mean_reward", "success_rate"):
                    self.logger.record(f"eval/{key}", result[key])
                line = (
                    f"{t},{result['mean_reward']},{result['std_reward']},{result['success_rate']}"
                )
                path = run_dir / "evaluations.csv"
                new = not path.exists()
                with path.open("a") as f:
                    if new:
                        f.write("timesteps,mean_reward,std_reward,success_rate\n")
                    f.write(line + "\n")
                self.next_eval += config.train.eval_freq
            return True

    return RunCallback(), TrainingDiverged


# -- the run -----------------------------------------------------------------------------------
def run(config: Config, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train (or continue) one run; returns the final evaluation."""
    from memagents import allocator

    allocator.configure()  # before torch runs a convolution (memagents/allocator.py)
    import torch
    from stable_baselines3.common.logger import CSVOutputFormat, Logger, TensorBoardOutputFormat

    torch.set_num_threads(config.train.torch_threads)
    device = resolve_device(config.train.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = config.train.seed
    eval_env = normalize_env(
        config,
        make_env(config, seed + 10_000, n_envs=eval_env_count(config, config.train.eval_episodes)),
        training=False,
    )

    latest = latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        ckpt = run_dir / "checkpoints"
        stats = latest.get("vecnormalize")
        if stats is None and (config.env.normalize.obs or config.env.normalize.reward):
            raise ConfigError(f"--resume: {ckpt} holds no VecNormalize statistics (env.normalize)")
        env = normalize_env(config, make_env(config, seed), stats=stats and ckpt / stats)
        model = algorithm_class(config).load(ckpt / latest["model"], env=env, device=device)
        # load(env=...) re-seeds the env with the training seed, which would replay the episodes
        # the run began with; a resumed segment draws new ones, reproducibly
        env.seed(seed + int(latest["num_timesteps"]))
        set_rng_state(torch.load(ckpt / latest["rng"], weights_only=True))
        segment = len(list(run_dir.glob("progress*.csv")))
        csv_name = f"progress-resumed-{segment}.csv" if segment else "progress.csv"
    else:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        env = normalize_env(config, make_env(config, seed))
        model = make_model(config, env, device)
        csv_name = "progress.csv"
    # a resumed run logs to a new CSV segment; SB3's CSV writer would truncate progress.csv
    formats = [CSVOutputFormat(str(run_dir / csv_name)), TensorBoardOutputFormat(str(run_dir))]
    model.set_logger(Logger(str(run_dir), formats))

    remaining = config.train.total_timesteps - int(model.num_timesteps)
    callback, diverged = make_callbacks(config, run_dir, eval_env)
    if config.curriculum.knob:
        from stable_baselines3.common.callbacks import CallbackList

        from memagents.sb3.curriculum import CurriculumCallback

        curriculum = CurriculumCallback.from_config(
            config.curriculum, sync_envs=[eval_env], state_path=run_dir / "curriculum.json"
        )
        callback = CallbackList([curriculum, callback])
    if config.train.log_memory_every:
        from stable_baselines3.common.callbacks import CallbackList

        from memagents.record import make_memory_image_callback

        def render_env():
            kwargs = {**config.env.kwargs, "render_mode": "rgb_array"}
            return make_env(
                dataclasses.replace(config, env=dataclasses.replace(config.env, kwargs=kwargs)),
                seed + 20_000,
                n_envs=1,
            )

        images = make_memory_image_callback(config.train.log_memory_every, render_env)
        callback = CallbackList([callback, images])
    if remaining > 0:
        progress = config.train.progress_bar and sys.stdout.isatty()
        try:
            model.learn(
                total_timesteps=remaining,
                reset_num_timesteps=False,
                callback=callback,
                progress_bar=progress,
            )
        except diverged as exc:
            raise TrainingStopped(str(exc)) from None
        if config.train.checkpoint_freq:
            # the periodic checkpoint at the last step was taken before the last update: point
            # ``latest`` at the final model, so that --resume continues (or re-evaluates) it
            save_checkpoint(model, run_dir)
    model.save(run_dir / "model.zip")
    save_normalization(model, run_dir / "model.zip")
    sync_normalization(model, eval_env)
    result = evaluate(model, eval_env, config.train.eval_episodes)
    result["num_timesteps"] = int(model.num_timesteps)
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    env.close()
    eval_env.close()
    return result


class TrainingStopped(RuntimeError):
    """Training found a non-finite value and stopped; the last good checkpoint is kept."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").is_file():
                raise ConfigError(f"--resume {args.resume!r}: no config.yaml in that directory")
            config = from_dict(read_yaml(run_dir / "config.yaml"))
            check_names(config)
        else:
            config = resolve_config(args)
            run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
        start = time.time()
        result = run(config, run_dir, resume=bool(args.resume))
    except ConfigError as exc:
        print(f"memagents.train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as exc:
        print(
            f"memagents.train: stopped: {exc}; the last good checkpoint is kept in "
            f"{run_dir / 'checkpoints'}",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    print(
        f"{config.env.id} {config.core.name} seed {config.train.seed}: "
        f"mean reward {result['mean_reward']:.3f} ± {result['std_reward']:.3f}, "
        f"success {result['success_rate']:.2f} over {result['episodes']} episodes "
        f"after {result['num_timesteps']} steps ({time.time() - start:.0f} s) -> {run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
