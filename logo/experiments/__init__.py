"""Experiments on the embedded default, above ``train/`` and ``eval/``: the demo and the signal study."""
