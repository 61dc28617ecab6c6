"""Typed run configuration: YAML files under ``configs/`` are data, validated by these dataclasses.

A config is read top to bottom like CleanRL's ``Args``: one dataclass per section, a one-line
docstring under every field. :func:`load_config` merges a YAML file over the defaults, applies
``--set key=value`` overrides (dotted keys, YAML-typed values), and validates everything: an
unknown key, a wrong type or an out-of-range value raises :class:`ConfigError` with one line that
names the key, the value and what is allowed. Classes are named by registry keys (core names,
environment ids), never by Python expressions.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A bad configuration value; the message is one line fit for a CLI."""


@dataclass
class NormalizeConfig:
    obs: bool = False
    """Normalise observations by running mean and variance (SB3's ``VecNormalize``, clipped to
    ±10); evaluation uses the training statistics, saved beside every model and checkpoint as
    ``<model>.vecnormalize.pkl``."""
    reward: bool = False
    """Scale training rewards by the running std of the ``ppo.gamma``-discounted return
    (``VecNormalize``); evaluations report the env's own rewards."""


@dataclass
class EnvConfig:
    id: str = "memagents/Recall-v0"
    """Gymnasium id (``memagents/...`` tasks, ``MiniGrid-...``, any registered id), or
    ``module:EnvId`` to import ``module`` first (its import registers ``EnvId``)."""
    packages: list[str] = field(default_factory=list)
    """Python modules imported before the env is made, for the ids they register
    (``[popgym]``); ``--gym-packages``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``gymnasium.make`` (difficulty knobs)."""
    n_envs: int = 8
    """Parallel environments in the rollout."""
    vec_env: str = "dummy"
    """``dummy`` (SB3 DummyVecEnv of single envs) or ``batched`` (``envs.make_vec``, memagents/ ids)."""
    actions: list[int] = field(default_factory=list)
    """Keep only these actions of a ``Discrete`` action space, renumbered ``0..k-1`` in this order
    (``[0, 1, 2]``: MiniGrid's turn left, turn right, forward); empty: all actions."""
    wrapper: str = "auto"
    """Observation wrapper (``memagents.wrappers.WRAPPERS``): ``minigrid`` (grid codes and direction
    as one integer Box), ``flatten`` (Tuple/Dict/Discrete/MultiDiscrete/MultiBinary/Box as one
    flat float Box, discrete values one-hot), ``none``, or ``auto`` (``minigrid`` for
    ``MiniGrid-*`` and ``BabyAI-*`` ids, ``flatten`` where SB3 cannot take the observation space
    as it is, e.g. ``Tuple``; else ``none``)."""
    device: str = "auto"
    """Where the batched env's episodes live (``vec_env: batched``): ``auto`` (the training
    device, ``train.device``), ``cpu``, ``cuda`` or ``cuda:N``. Other envs step on the host;
    for them only ``auto`` and ``cpu`` are allowed."""
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    """Running normalisation of observations and rewards (RL Zoo's ``normalize: true`` is
    ``{obs: true, reward: true}``); off by default."""
    mission: str = "auto"
    """MiniGrid's mission string under ``env.wrapper: minigrid``, which does not encode it:
    ``auto`` drops it where it is constant (Memory, DoorKey, ...) and refuses the envs whose
    mission varies (BabyAI, Fetch, ...); ``drop`` drops it anyway."""


@dataclass
class CoreConfig:
    name: str = "lstm"
    """Registry name of the memory core (``memagents.cores.available()``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Core hyperparameters (``hidden_size``, ``memory_size``, ``word_size``, ...)."""


@dataclass
class PolicyConfig:
    kind: str = "memory"
    """``memory``: :class:`memagents.sb3.MemoryPolicy` with ``core.name``; ``stock``: sb3-contrib's
    own ``MlpLstmPolicy`` (:class:`memagents.sb3.StockLstmPolicy`), the baseline the bridge is
    measured against: needs ``core.name: lstm`` (``core.kwargs`` ``hidden_size`` and ``num_layers``
    become ``lstm_hidden_size`` and ``n_lstm_layers``) and ``ppo.buffer: stock``."""
    critic: str = "shared"
    """``shared``: one core, the value head reads it detached (sb3-contrib's ``shared_lstm``: only
    the policy loss trains the core); ``joint``: one core trained by both the policy and the value
    loss (CleanRL's PPO-LSTM); ``separate``: a second core for the critic; ``feedforward``: a
    critic without memory."""
    net_arch: list[int] = field(default_factory=lambda: [64])
    """Hidden layer widths of the policy and value heads after the core."""
    activation: str = "tanh"
    """Activation of the MLP heads: ``tanh`` (SB3's default) or ``relu``."""
    ortho_init: bool = True
    """Orthogonal initialisation of the features extractor, heads and output layers (SB3's
    default; the recurrent core keeps its own initialisation)."""
    features_extractor: str = "auto"
    """Features extractor (``memagents.sb3.extractors.FEATURES_EXTRACTORS``): ``minigrid`` (code
    embeddings + small conv), ``flatten``, or ``auto`` (``minigrid`` when the env is wrapped with
    ``minigrid``, else SB3's flatten/combined default)."""
    features_extractor_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the features extractor (``minigrid``: ``features_dim``,
    ``embed_dim``, ``channels``)."""


@dataclass
class PPOConfig:
    n_steps: int = 128
    """Rollout steps per environment per update."""
    batch_size: int = 128
    """Minibatch size in steps."""
    n_epochs: int = 4
    """Optimisation epochs per rollout."""
    learning_rate: float = 3e-4
    """Adam learning rate (the initial one under ``lr_schedule: linear``)."""
    lr_schedule: str = "constant"
    """``constant``, or ``linear``: ``learning_rate`` times the fraction of training remaining
    (RL Zoo's ``lin_<value>``), 0 at the end."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO clipping (the initial one under ``clip_range_schedule: linear``)."""
    clip_range_schedule: str = "constant"
    """``constant`` or ``linear`` (as ``lr_schedule``)."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Gradient-norm clipping (on by default; memory cores need it)."""
    target_kl: float = 0.0
    """Stop an update's epochs at the first minibatch whose approximate KL divergence from the
    rollout's policy exceeds ``1.5 * target_kl`` (SB3's ``target_kl``); 0: never stop early."""
    buffer: str = "sequence-start"
    """Rollout buffer: ``sequence-start`` (MemoryPPO: the state stored only where a training
    sequence starts; minibatches of whole episode segments, packed for the memory cores) or
    ``stock`` (sb3-contrib's RecurrentPPO: the state stored at every step, copied to host memory
    each step; gigabytes for large memories, and slower to train: see ``docs/BENCHMARKS.md``)."""
    pack_segments: str = "auto"
    """With ``buffer: sequence-start``: run several episode segments one after another in one
    training sequence (the same loss and gradients from fewer padded steps). ``auto``: for the
    cores whose mid-sequence resets cost nothing extra (all but ``lstm`` and ``gru``);
    ``always``; ``never``. Ignored with ``buffer: stock``."""
    credit: str = "step"
    """``step``: one advantage and one probability ratio per step (PPO as published).
    ``element``: one per action element, each element credited with its own reward (the
    ``MultiBinary`` answers of Copy-like tasks: bit ``i`` with whether bit ``i`` was right, not
    with the whole answer's score); needs ``env.vec_env: batched`` and ``buffer:
    sequence-start``. Unbiased where an action element changes only its own reward, as in the
    algorithmic tasks (``docs/TUNING.md``)."""
    collector: str = "auto"
    """How rollouts are collected with ``buffer: sequence-start``: ``device`` keeps them as
    tensors from the batched env through the buffer into the update (``memagents.sb3.device``:
    no numpy, no per-env Python per step); ``sb3`` is sb3-contrib's loop (numpy between env,
    policy and buffer); ``auto``: ``device`` for ``env.vec_env: batched``, else ``sb3``. Both
    give the same training for the same seed."""


@dataclass
class TrainConfig:
    total_timesteps: int = 50_000
    """Environment steps to train for (summed over envs)."""
    seed: int = 0
    """Seed of the environments, torch and numpy."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    torch_threads: int = 1
    """torch threads on CPU (1: small recurrent workloads ran erratically with 2 on 2 cores)."""
    eval_freq: int = 5_000
    """Evaluate every this many environment steps (0: only at the end)."""
    eval_episodes: int = 50
    """Deterministic episodes per evaluation."""
    checkpoint_freq: int = 10_000
    """Checkpoint every this many environment steps (0: only the final model)."""
    log_memory_every: int = 0
    """Every this many steps, log one recorded episode's memory heatmaps to TensorBoard (0: off)."""
    progress_bar: bool = True
    """Show a progress bar when stdout is a terminal."""


@dataclass
class CurriculumConfig:
    knob: str = ""
    """Difficulty knob the curriculum raises (``max_length`` of Copy, ``max_delay`` of Recall,
    ``max_items`` of AssociativeRecall, ...: a key of the task's ``difficulty``); empty: off."""
    increment: int = 1
    """``curriculum_increment``: added to the knob at each promotion."""
    freq: int = 10_000
    """``curriculum_freq``: environment steps between checks of the success rate."""
    threshold: float = 0.9
    """Success rate of the training episodes at the current level needed to raise it."""
    max_value: int = 0
    """Never raise the knob beyond this (0: no limit)."""
    min_episodes: int = 20
    """Training episodes finished at the current level before a check can raise it."""


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment."""
    core: CoreConfig = field(default_factory=CoreConfig)
    """The memory core."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Heads and critic mode."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """RecurrentPPO hyperparameters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Budget, seed, device, evaluation and checkpoints."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Difficulty that grows with success (off unless ``curriculum.knob`` is set)."""


#: a dotted Python module name (``popgym``, ``ale_py``, ``pkg.envs``)
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

#: (dotted key) -> (predicate, description of what is allowed)
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "env.n_envs": (lambda v: v >= 1, "an integer >= 1"),
    "env.vec_env": (lambda v: v in ("dummy", "batched"), "'dummy' or 'batched'"),
    "env.packages": (
        lambda v: all(_MODULE_NAME.fullmatch(m) for m in v),
        "a list of Python module names, e.g. [popgym]",
    ),
    "env.mission": (lambda v: v in ("auto", "drop"), "'auto' or 'drop'"),
    "env.actions": (
        lambda v: all(a >= 0 for a in v) and len(set(v)) == len(v),
        "a list of distinct action ids >= 0",
    ),
    "policy.critic": (
        lambda v: v in ("shared", "joint", "separate", "feedforward"),
        "'shared', 'joint', 'separate' or 'feedforward'",
    ),
    "policy.net_arch": (lambda v: all(w >= 1 for w in v), "a list of integers >= 1"),
    "policy.kind": (lambda v: v in ("memory", "stock"), "'memory' or 'stock'"),
    "policy.activation": (lambda v: v in ("tanh", "relu"), "'tanh' or 'relu'"),
    "ppo.lr_schedule": (lambda v: v in ("constant", "linear"), "'constant' or 'linear'"),
    "ppo.clip_range_schedule": (lambda v: v in ("constant", "linear"), "'constant' or 'linear'"),
    "ppo.n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.n_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.learning_rate": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "ppo.gamma": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "ppo.gae_lambda": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "ppo.clip_range": (lambda v: v > 0, "a number > 0"),
    "ppo.ent_coef": (lambda v: v >= 0, "a number >= 0"),
    "ppo.vf_coef": (lambda v: v >= 0, "a number >= 0"),
    "ppo.max_grad_norm": (lambda v: v > 0, "a number > 0"),
    "ppo.target_kl": (lambda v: v >= 0, "a number >= 0 (0: off)"),
    "ppo.buffer": (lambda v: v in ("stock", "sequence-start"), "'stock' or 'sequence-start'"),
    "ppo.credit": (lambda v: v in ("step", "element"), "'step' or 'element'"),
    "ppo.collector": (lambda v: v in ("auto", "device", "sb3"), "'auto', 'device' or 'sb3'"),
    "env.device": (
        lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
        "'auto', 'cpu', 'cuda' or 'cuda:N'",
    ),
    "ppo.pack_segments": (
        lambda v: v in ("auto", "always", "never"),
        "'auto', 'always' or 'never'",
    ),
    "train.total_timesteps": (lambda v: v >= 1, "an integer >= 1"),
    "train.seed": (lambda v: v >= 0, "an integer >= 0"),
    "train.device": (
        lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
        "'auto', 'cpu', 'cuda' or 'cuda:N'",
    ),
    "train.torch_threads": (lambda v: v >= 1, "an integer >= 1"),
    "train.eval_freq": (lambda v: v >= 0, "an integer >= 0"),
    "train.eval_episodes": (lambda v: v >= 1, "an integer >= 1"),
    "train.checkpoint_freq": (lambda v: v >= 0, "an integer >= 0"),
    "train.log_memory_every": (lambda v: v >= 0, "an integer >= 0"),
    "curriculum.increment": (lambda v: v >= 1, "an integer >= 1"),
    "curriculum.freq": (lambda v: v >= 1, "an integer >= 1"),
    "curriculum.threshold": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "curriculum.max_value": (lambda v: v >= 0, "an integer >= 0"),
    "curriculum.min_episodes": (lambda v: v >= 1, "an integer >= 1"),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    ok: bool
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, list)
        if ok:
            (inner,) = typing.get_args(tp)
            value = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    elif origin is dict:
        ok = isinstance(value, dict)
    else:  # pragma: no cover - all fields are covered above
        ok = True
    if not ok:
        hint = ""
        if tp is str and isinstance(value, bool):  # YAML 1.1: on/off/yes/no are booleans
            hint = " (YAML reads on, off, yes and no as true or false: quote the word)"
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}{hint}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r}; allowed under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key + ".")
        else:
            value = _coerce(key, data[name], tp)
            check = _RANGES.get(key)
            if check is not None and not check[0](value):
                raise ConfigError(f"{key}: {value!r} is out of range; allowed: {check[1]}")
            kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested mapping into a :class:`Config` (missing keys take their defaults)."""
    return _build(Config, data, "")


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data (what ``config.yaml`` in a run directory holds)."""
    return dataclasses.asdict(config)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. ppo.n_steps=64")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: cannot parse value {raw!r} ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping: ``["ppo.n_steps=64", "core.kwargs.memory_size=32"]``."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file as data (``yaml.safe_load``: no Python objects)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (``configs/default.yaml`` when ``path`` is None) <- overrides."""
    data = read_yaml(DEFAULT_CONFIG if path is None else path)
    apply_overrides(data, list(overrides or []))
    return from_dict(data)
