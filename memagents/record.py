"""See the memory work: record one episode as frames of the environment beside the core's memory.

Each frame shows, for one step of a trained agent: the environment (MiniGrid's RGB render; for the
algorithmic tasks the observations seen so far, channels as rows, and the actions emitted so far),
then the core's debug tensors after the step: the memory heatmap (``N x W``), the read and write
weightings over ``N``, and for the DNC the usage vector and the link matrix (other cores show what
their ``return_debug`` gives, e.g. the LSTM's hidden state or the fast weights of head 0).

Used by ``python -m memagents.evaluate --record OUT.gif`` / ``--png-dir DIR`` and, as TensorBoard
images, by :class:`MemoryImageCallback` (``train.log_memory_every``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

#: debug tensors shown, in this order, when the core provides them
PANELS = ("memory", "read_weights", "write_weights", "usage", "link", "fast_weights", "h")


def _as_matrix(name: str, value: torch.Tensor) -> np.ndarray:
    """A debug tensor of one batch element as a 2-D array for a heatmap."""
    array = value.detach().float().cpu().numpy()
    if name == "link" and array.ndim == 3:  # [H, N, N]: the first write head's links
        array = array[0]
    while array.ndim > 2:  # e.g. fast weights [heads, d_v, d_phi]: head 0
        array = array[0]
    if array.ndim == 1:
        array = array[None, :]
    return array


def render_frame(
    env_image: np.ndarray | None,
    debug: dict[str, torch.Tensor],
    title: str,
    actions: np.ndarray | None = None,
) -> np.ndarray:
    """One frame as ``uint8 [H, W, 3]``: the environment image and the core's debug heatmaps.

    :param env_image: ``uint8 [h, w, 3]`` render of the environment, or None.
    :param debug: the core's debug tensors of one batch element after this step.
    :param title: the frame's title (step, reward).
    :param actions: ``[t, A]`` actions emitted so far (shown as a grid under the environment).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, _as_matrix(name, debug[name])) for name in PANELS if name in debug]
    extra = 1 + (actions is not None)
    fig, axes = plt.subplots(
        1, extra + len(panels), figsize=(3.0 * (extra + len(panels)), 3.2), squeeze=False
    )
    axes = axes[0]
    ax = axes[0]
    if env_image is not None:
        ax.imshow(env_image, interpolation="nearest")
    ax.set_title("environment")
    ax.axis("off")
    if actions is not None:
        grid = (
            np.atleast_2d(actions.reshape(len(actions), -1).T) if len(actions) else np.zeros((1, 1))
        )
        axes[1].imshow(grid, cmap="gray", vmin=0, vmax=max(1.0, float(grid.max())), aspect="auto")
        axes[1].set_title("actions so far")
        axes[1].set_xlabel("step")
    for ax, (name, matrix) in zip(axes[extra:], panels, strict=True):
        image = ax.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest")
        if matrix.shape[0] == 1:
            ax.set_yticks([])
        ax.set_title(name.replace("_", " "))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.canvas.draw()
    frame = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return frame


def record_episode(
    model, venv, deterministic: bool = True, max_steps: int = 1000, last_only: bool = False
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Play one episode with ``model`` (a RecurrentPPO with :class:`memagents.sb3.MemoryPolicy`)
    on ``venv`` (a one-environment VecEnv whose env renders ``rgb_array``), one frame per step.

    :param last_only: draw only the episode's last frame (matplotlib is the slow part).
    :return: the frames, ``uint8 [H, W, 3]`` each, one per environment step of the episode, and
        the environment's info dict of the episode's last step.
    """
    policy = model.policy
    if not hasattr(policy, "debug_step"):
        raise ValueError(f"recording needs a memagents MemoryPolicy; got {type(policy).__name__}")
    obs = venv.reset()
    state: Any = None
    start = torch.ones(1)
    frames: list[np.ndarray] = []
    actions_so_far: list[np.ndarray] = []
    total = 0.0
    for t in range(max_steps):
        env_image = venv.render()
        obs_tensor, _ = policy.obs_to_tensor(obs)
        actions, state, debug = policy.debug_step(obs_tensor, state, start, deterministic)
        action = actions.cpu().numpy()
        actions_so_far.append(np.asarray(action[0], dtype=np.float32).reshape(-1))
        obs, reward, done, infos = venv.step(action)
        total += float(reward[0])
        last = bool(done[0]) or t + 1 == max_steps
        if not last_only or last:
            debug_one = {k: v[0] for k, v in debug.items()}
            frames.append(
                render_frame(
                    env_image,
                    debug_one,
                    f"step {t}  reward {float(reward[0]):.2f}  return {total:.2f}",
                    np.stack(actions_so_far),
                )
            )
        start = torch.as_tensor(done, dtype=torch.float32)
        if bool(done[0]):
            break
    return frames, dict(infos[0])


def save_frames(
    frames: list[np.ndarray], out: str | Path | None, png_dir: str | Path | None, fps: int = 2
) -> None:
    """Write frames as an animated GIF (``out``) and/or numbered PNGs (``png_dir``)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(png_dir / f"frame_{i:04d}.png")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".gif":
            images[0].save(
                out, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0
            )
        elif out.suffix.lower() == ".mp4":
            try:
                import imageio.v3 as iio
            except ImportError:
                raise ValueError(
                    f"{str(out)!r}: .mp4 needs imageio with ffmpeg (pip install 'imageio[ffmpeg]'); "
                    "or record a .gif"
                ) from None
            iio.imwrite(out, np.stack(frames), fps=fps)
        else:
            raise ValueError(f"{str(out)!r}: the recording must end in .gif or .mp4")


def make_memory_image_callback(every: int, make_render_env):
    """A callback that, every ``every`` environment steps, plays one episode on a fresh
    rendering environment and logs its last frame (environment, memory heatmap, weightings) to
    TensorBoard as ``memory/episode``.

    :param every: environment steps between images (>= 1).
    :param make_render_env: ``() -> VecEnv`` with one environment rendering ``rgb_array``.
    """
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Image

    class MemoryImageCallback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next_at = every

        def _on_step(self) -> bool:
            if self.model.num_timesteps < self.next_at:
                return True
            self.next_at = (self.model.num_timesteps // every + 1) * every
            venv = make_render_env()
            try:
                frames, _ = record_episode(self.model, venv, last_only=True)
            finally:
                venv.close()
            self.logger.record(
                "memory/episode",
                Image(frames[-1], "HWC"),
                exclude=("stdout", "log", "json", "csv"),
            )
            return True

    return MemoryImageCallback()
