"""The bridge between a real model and the math: layer choice, Gram-recording hooks, attention taps."""

from lightning_cka.taps.layers import find_layers
from lightning_cka.taps.probe_mode import probe_mode
from lightning_cka.taps.recorder import Recorder

__all__ = ["Recorder", "find_layers", "probe_mode"]
