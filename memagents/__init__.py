"""memagents: memory-augmented recurrent policies for RL, and algorithmic memory tasks.

Importing the package registers the ``memagents/...`` Gymnasium environments of :mod:`envs`.
"""

import envs as _envs  # noqa: F401  (registers the memagents/ environment ids)

__version__ = "0.1.0"
