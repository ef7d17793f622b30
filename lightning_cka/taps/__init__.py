"""The bridge between a real model and the math: layer choice, hooks that reduce outputs on the spot, probe mode."""

from lightning_cka.taps.layers import find_layers
from lightning_cka.taps.probe_mode import probe_mode

__all__ = ["find_layers", "probe_mode"]
