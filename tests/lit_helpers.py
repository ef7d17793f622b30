"""A small LightningModule and data for driving a real Trainer on CPU in tests."""

from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

IMAGE_SIZE = 32


def make_model(name="test_vit", **kwargs):
    if name.startswith("test_vit"):
        kwargs = {"img_size": IMAGE_SIZE, "patch_size": 8, **kwargs}
    return timm.create_model(name, num_classes=4, **kwargs)


def images_and_labels(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) + labels.view(-1, 1, 1, 1).float()
    return images, labels


class DictDataset(Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixels": self.images[i], "label": self.labels[i]}


def loaders(batch_size=16, n_train=64, n_val=32, dict_batches=False, shuffle=True):
    train, val = images_and_labels(n_train, 0), images_and_labels(n_val, 1)
    wrap = DictDataset if dict_batches else TensorDataset
    return (
        DataLoader(wrap(*train), batch_size=batch_size, shuffle=shuffle),
        DataLoader(wrap(*val), batch_size=batch_size),
    )


def lightning_module_class(base):
    class LitClassifier(base):
        def __init__(self, name="test_vit", dict_batches=False, lr=1e-3, **model_kwargs):
            super().__init__()
            self.lr = lr
            self.model = make_model(name, **model_kwargs)
            self.loss = nn.CrossEntropyLoss()
            self.dict_batches = dict_batches
            self.losses = []

        def forward(self, x):
            return self.model(x)

        def _split(self, batch):
            return (batch["pixels"], batch["label"]) if self.dict_batches else batch

        def training_step(self, batch, batch_idx):
            x, y = self._split(batch)
            loss = self.loss(self(x), y)
            self.losses.append(loss.detach().clone())
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = self._split(batch)
            self.log("val_loss", self.loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

    return LitClassifier


def array_steps(log_dir, name=None):
    """The steps of the probe files a monitor (named ``name``, or unnamed) wrote under ``log_dir``."""
    folder = Path(log_dir) / "cka" / (name or "")
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.npz") if p.is_file())
