"""Every model family the package is tried on (timm, torchvision, Hugging Face transformers where it is installed),
built without weights at small sizes (used by tests/test_families_zoo.py and docs/make_models_doc.py, so that
docs/models.md says what the test found).

Each family gives its constructor, its input size, and the analyses that run on it when every analysis is asked for
(``default``, ``localization``, ``linear_probe``) next to a small ResNet reference; the others are left out with their
reason, which the test reads from the probe file and the page prints.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

ALL = ("cka", "attention", "heads", "residual", "localization", "linear_probe", "rank")
CNN = ("cka", "residual", "localization", "linear_probe", "rank")
BASE = ("cka", "linear_probe", "rank")  # what runs on any model with layers and labels


@dataclass(frozen=True)
class Family:
    """One model family: where it comes from, how it is built, at what image size, and which analyses run on it."""

    name: str
    library: str
    build: Callable[[], nn.Module]
    size: int
    runs: tuple[str, ...]
    note: str = ""


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=4, **kwargs)


def _torchvision(factory: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, factory)(num_classes=4, **kwargs)

    return build


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=4
    )


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt(
        block_setting=[CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)], num_classes=4
    )


def _hf(model: str, config: str, **kwargs: object) -> Callable[[], nn.Module]:
    """A Hugging Face transformers model from a small random config (no weights, no download)."""

    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(num_labels=4, **kwargs))

    return build


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HF_VIT = {
    "image_size": 32,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
# Hugging Face families, tried where transformers is installed (the dev extra installs it, so CI tries them).
HF_FAMILIES = [
    Family("ViT", "Hugging Face", _hf("ViTForImageClassification", "ViTConfig", **HF_VIT), 32, ALL),
    Family(
        "DeiT, distilled", "Hugging Face", _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **HF_VIT), 32, ALL
    ),
    Family(
        "Dinov2 with registers",
        "Hugging Face",
        _hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", num_register_tokens=4, **HF_VIT),
        32,
        ALL,
    ),
    Family(
        "Swin",
        "Hugging Face",
        _hf(
            "SwinForImageClassification",
            "SwinConfig",
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 2],
            window_size=4,
        ),
        32,
        ALL,
    ),
    Family(
        "ConvNext",
        "Hugging Face",
        _hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[16, 32], depths=[1, 2], num_stages=2),
        64,
        CNN,
    ),
    Family(
        "ResNet",
        "Hugging Face",
        _hf(
            "ResNetForImageClassification",
            "ResNetConfig",
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 2],
            layer_type="basic",
        ),
        64,
        CNN,
    ),
]


class PlainConvNet(nn.Module):
    """A model with no container: its layers are its leaf modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


def _sequential() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


VIT = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
FAMILIES = [
    Family("ViT (test_vit)", "timm", _timm("test_vit", img_size=32, patch_size=4), 32, ALL),
    Family("DeiT, distilled", "timm", _timm("deit_tiny_distilled_patch16_224", **VIT), 32, ALL),
    Family("ViT with registers", "timm", _timm("vit_small_patch14_reg4_dinov2", **VIT), 32, ALL),
    Family(
        "ViT, average pool", "timm", _timm("vit_tiny_patch16_224", **VIT, global_pool="avg", class_token=False), 32, ALL
    ),
    Family(
        "Swin",
        "timm",
        _timm(
            "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4)
        ),
        32,
        CNN,
    ),
    Family("hybrid ViT (ResNet stem)", "timm", _timm("vit_tiny_r_s16_p8_224", img_size=64, depth=2), 64, ALL),
    Family("PiT", "timm", _timm("pit_ti_224", img_size=64, depth=[1, 1, 1]), 64, ALL),
    Family("CaiT", "timm", _timm("cait_xxs24_224", **VIT, depth_token_only=1), 32, ("cka", "localization", *BASE[1:])),
    Family(
        "XCiT",
        "timm",
        _timm("xcit_nano_12_p16_224", img_size=64, patch_size=8, depth=2, embed_dim=32, num_heads=2),
        64,
        ("cka", "localization", *BASE[1:]),
    ),
    Family("EVA-02", "timm", _timm("eva02_tiny_patch14_224", **VIT), 32, ("cka", "localization", *BASE[1:])),
    Family("BEiT", "timm", _timm("beit_base_patch16_224", **VIT), 32, ("cka", "localization", *BASE[1:])),
    Family("LeViT", "timm", _timm("levit_128s", img_size=64), 64, BASE),
    Family("ConvNeXt", "timm", _timm("convnext_atto", depths=(1, 1, 2, 1), dims=(16, 32, 48, 64)), 64, CNN),
    Family(
        "EfficientNet (test_efficientnet)", "timm", _timm("test_efficientnet"), 64, ("cka", "localization", *BASE[1:])
    ),
    Family("EfficientNet-B0", "timm", _timm("efficientnet_b0"), 64, CNN),
    Family("MobileNetV3", "timm", _timm("mobilenetv3_small_050"), 64, CNN),
    Family("RegNet", "timm", _timm("regnetx_002"), 64, ("cka", "localization", *BASE[1:])),
    Family("ResNet (test_resnet)", "timm", _timm("test_resnet"), 64, CNN),
    Family("MaxViT", "timm", _timm("maxvit_rmlp_pico_rw_256", img_size=64), 64, ("cka", "localization", *BASE[1:])),
    Family("CoAtNet", "timm", _timm("coatnet_nano_rw_224", img_size=64), 64, ("cka", "localization", *BASE[1:])),
    Family("FastViT", "timm", _timm("fastvit_t8"), 64, ("cka", "localization", *BASE[1:])),
    Family(
        "VisionTransformer",
        "torchvision",
        _torchvision(
            "VisionTransformer", image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        ),
        32,
        ALL,
    ),
    Family("ResNet-18", "torchvision", _torchvision("resnet18"), 64, CNN),
    Family("Swin", "torchvision", _tv_swin, 32, ALL),
    Family("EfficientNet-B0", "torchvision", _torchvision("efficientnet_b0"), 64, CNN),
    Family("ConvNeXt", "torchvision", _tv_convnext, 64, CNN),
    *(HF_FAMILIES if HAS_TRANSFORMERS else []),
    Family("a plain nn.Module", "torch", PlainConvNet, 32, BASE),
    Family("an nn.Sequential", "torch", _sequential, 32, BASE),
]


ASKED = ("default", "localization", "linear_probe")


def fit(family: Family, root: Any) -> tuple:
    """Train ``family`` one step with the monitor and every analysis asked for; ``(trainer, lit, warning texts)``."""
    import warnings

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_cka import CKAMonitor

    class Lit(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            return getattr(out, "logits", out)  # Hugging Face models return a ModelOutput

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, labels = batch
            return nn.functional.cross_entropy(self(images), labels)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    pl.seed_everything(0)
    images = torch.randn(32, 3, family.size, family.size, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(images, torch.arange(32) % 4), batch_size=8)
    monitor = CKAMonitor(
        every_n_train_steps=1,
        probe_size=16,
        batch_size=8,
        log_images=False,
        reference=timm.create_model("test_resnet", num_classes=4),
        analyses=list(ASKED),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        precision="64-true",  # float64 Grams: checks against float64 hooks are then exact to rounding
    )
    lit = Lit(family.build())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(lit, data, data)
    return trainer, lit, [str(w.message) for w in record]


def models_table(outcomes: dict[str, tuple[list[str], dict[str, str]]]) -> str:
    """The Markdown table of docs/models.md from each family's analyses that ran and those left out with the reason."""
    rows = ["| library | family | input | runs | left out, and why |", "| --- | --- | --- | --- | --- |"]
    for family in FAMILIES:
        ran, left_out = outcomes[f"{family.library}-{family.name}"]
        why = "; ".join(f"`{name}`: {_short(reason)}" for name, reason in sorted(left_out.items()))
        runs = ", ".join(f"`{name}`" for name in ran)
        rows.append(f"| {family.library} | {family.name} | {family.size} px | {runs} | {why or '-'} |")
    return "\n".join(rows)


def _short(reason: str) -> str:
    from lightning_cka.taps.attention_site import READABLE

    # The page's introduction lists whose attention is read; the table leaves the list out of each row.
    text = reason.replace(f" ({READABLE})", "").replace("|", "/").split(". Choose")[0].split("; it knows the blocks")[0]
    return text if len(text) <= 160 else text[:157] + "..."
