"""memagents: memory-augmented recurrent policies for RL, and algorithmic memory tasks."""

__version__ = "0.1.0"
