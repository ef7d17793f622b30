"""What the attention tests share: a tap that keeps every probability map it is handed, and one probed forward."""

import torch

from lightning_cka.taps.attention import AttentionTap, attention_sites
from lightning_cka.taps.base import TapSet
from lightning_cka.taps.layers import named_modules


class Collect(AttentionTap):
    """Keeps every chunk of probabilities the tap hands over."""

    def __init__(self, sites):
        super().__init__(sites)
        self.maps = {}

    def consume(self, layer, probs, distances):
        self.maps.setdefault(layer, []).append(probs.clone())

    def collect(self):
        return None


def tapped(model, x):
    """``(tap, maps, output)``: one forward with the attention tap on; ``maps`` of the sites it measured, in order."""
    modules = named_modules(model)
    tap = Collect(attention_sites(modules))
    with TapSet(model, modules, [tap]):
        out = model(x)
    return tap, [torch.cat(tap.maps[i]) for i in range(len(tap.sites)) if i in tap.maps], out


def randomize_position_bias(model):
    """Swin's relative position bias tables start at (or near) zero: fill them so that they matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(0.0, 1.0)
    return model
