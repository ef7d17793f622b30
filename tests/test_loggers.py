"""What each logger receives from one fit with every logger at once, read back from their own local stores.

TensorBoard (the monitor's event file), W&B (offline: the run's ``.wandb`` file, read record by record), MLflow (a local
file store: metric histories and ``images/`` artifacts) and CSV (``metrics.csv``): the same scalars under the same
names at the same steps everywhere, and the same images (decoded pixels equal) in TensorBoard, W&B and MLflow.
"""

import csv
import glob
import json
import math
import os
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import lightning_module_class, loaders
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_cka import CKAMonitor
from lightning_cka.callbacks.writer import mlflow_key

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

LitClassifier = lightning_module_class(pl.LightningModule)


# ---------------------------------------------------------------------------------------------------- W&B reader


def wandb_records(path):
    """The protobuf records of a ``.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a tail still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += 7 + length
        if kind == 2:
            pending = chunk
            continue
        if kind == 3:
            pending += chunk
            continue
        payload, pending = (pending + chunk, b"") if kind == 4 else (chunk, b"")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def wandb_rows(path):
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            place = row
            for key in keys[:-1]:
                place = place.setdefault(key, {})
            place[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def wandb_finished(path):
    return any(record.WhichOneof("record_type") == "exit" for record in wandb_records(path))


# ---------------------------------------------------------------------------------------------------------- the fit


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("loggers")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps the file store behind this switch
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

        tensorboard = TensorBoardLogger(root, name="tb", version=0)
        wandb_logger = WandbLogger(project="lightning-cka-test", save_dir=str(root), offline=True)
        mlflow_logger = MLFlowLogger(experiment_name="lightning-cka-test", tracking_uri=f"file:{root}/mlruns")
        csv_logger = CSVLogger(root, name="csv", version=0)
        pl.seed_everything(0)
        train, val = loaders(batch_size=16, n_train=32, n_val=16)
        monitor = CKAMonitor(every_n_train_steps=1, probe_size=16, batch_size=8)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=2,
            logger=[tensorboard, wandb_logger, mlflow_logger, csv_logger],
            callbacks=[monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=1,
        )
        trainer.fit(LitClassifier(), train, val)
        run_dir = Path(wandb_logger.experiment.dir).parent
        wandb.finish()
        files = glob.glob(str(run_dir / "run-*.wandb"))
        deadline = time.time() + 30
        while time.time() < deadline and not (files and wandb_finished(files[0])):  # the service writes on its own
            time.sleep(0.2)
            files = glob.glob(str(run_dir / "run-*.wandb"))
        csv_logger.save()
        yield {
            "tensorboard": Path(tensorboard.log_dir),
            "wandb": (Path(files[0]), run_dir),
            "mlflow": (mlflow_logger.experiment, mlflow_logger.run_id),
            "csv": Path(csv_logger.log_dir) / "metrics.csv",
        }
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


LIGHTNING = ("epoch", "val_loss")  # what Lightning and the LightningModule log themselves


def decode(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def tensorboard(logged):
    """``({tag: {step: value}}, {tag: {step: pixels}})`` of the monitor's event files."""
    acc = EventAccumulator(str(logged["tensorboard"]), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    own = [tag for tag in acc.Tags()["scalars"] if tag not in LIGHTNING]  # the monitor's, not the LightningModule's
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in own}
    images = {tag: {e.step: decode(e.encoded_image_string) for e in acc.Images(tag)} for tag in acc.Tags()["images"]}
    return scalars, images


def same(a: float, b: float) -> bool:
    """Equal as float32 (TensorBoard stores float32), NaN equal to NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


def test_tensorboard_has_scalars_and_images_of_every_probe(logged, tensorboard):
    scalars, images = tensorboard
    assert {"cka/intra", "attention/mean_distance"} <= set(images)
    assert len(scalars) > 10 and all("/" in tag for tag in scalars)
    probes = {int(p.stem.split("_")[1]) for p in (logged["tensorboard"] / "cka").glob("step_*.npz")}
    assert probes == {0, 1, 2}
    assert all(set(steps) == probes for tag, steps in images.items() if tag != "cka/intra_change")
    assert all(set(steps) == probes for tag, steps in scalars.items() if not tag.startswith("cka_vs_previous"))


def test_wandb_gets_the_same_scalars_and_images(logged, tensorboard):
    scalars, images = tensorboard
    path, run_dir = logged["wandb"]
    rows = wandb_rows(path)
    logged_scalars: dict[str, dict[int, float]] = {}
    logged_images: dict[str, dict[int, np.ndarray]] = {}
    for row in rows:
        step = row.get("trainer/global_step")
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "images/separated":
                (name,) = value["filenames"]
                pixels = np.asarray(Image.open(run_dir / "files" / name).convert("RGB"))
                logged_images.setdefault(key, {})[step] = pixels
            elif isinstance(value, int | float) and not key.startswith("_"):
                logged_scalars.setdefault(key, {})[step] = float(value)
    for tag, steps in scalars.items():
        for step, value in steps.items():
            assert same(logged_scalars[tag][step], value), (tag, step, logged_scalars[tag][step], value)
    assert set(logged_images) == set(images)
    for tag, steps in images.items():
        for step, pixels in steps.items():
            np.testing.assert_array_equal(logged_images[tag][step], pixels)


# images/<key, "/" as "~">+step+<step>+timestamp+<ms>+<uuid>[+compressed].<ext>
MLFLOW_IMAGE = re.compile(
    r"^(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+(?P<small>\+compressed)?\.\w+$"
)


def test_mlflow_gets_the_same_scalars_and_images(logged, tensorboard, tmp_path):
    scalars, images = tensorboard
    client, run_id = logged["mlflow"]
    folders = {tag.rsplit("/", i)[0] for tag in scalars for i in range(1, tag.count("/") + 1)}
    for tag, steps in scalars.items():
        assert mlflow_key(tag) == tag  # every tag of the built-in analyses keeps its characters
        # A name that is also the folder of others (attention/local_fraction) gets /all: the file store needs it.
        name = f"{tag}/all" if tag in folders else tag
        history = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        assert history, name
        for step, value in steps.items():
            assert same(history[step], value), (tag, step, history[step], value)
    found: dict[str, dict[int, np.ndarray]] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        match = MLFLOW_IMAGE.match(os.path.basename(artifact.path))
        if match and not match["small"]:
            local = client.download_artifacts(run_id, artifact.path, dst_path=str(tmp_path))
            key = match["key"].replace("~", "/")  # MLflow writes "/" in keys as "~" in file names
            found.setdefault(key, {})[int(match["step"])] = np.asarray(Image.open(local).convert("RGB"))
    assert set(found) == set(images)
    for tag, steps in images.items():
        for step, pixels in steps.items():
            np.testing.assert_array_equal(found[tag][step], pixels)


def test_csv_gets_the_same_scalars(logged, tensorboard):
    scalars, _ = tensorboard
    with open(logged["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    for tag, steps in scalars.items():
        written = {int(row["step"]): float(row[tag]) for row in rows if row.get(tag) not in (None, "")}
        for step, value in steps.items():
            assert same(written[step], value), (tag, step)


def test_mlflow_names_map_refused_characters_and_keep_the_rest():
    assert mlflow_key("attention/mean_distance/layers.0.blocks.1") == "attention/mean_distance/layers.0.blocks.1"
    assert mlflow_key("cka/reference_diag/model.0") == "cka/reference_diag/model.0"
    assert mlflow_key("early probe:x/residual (ratio)//a/") == "early probe_x/residual _ratio_/a"
    assert mlflow_key("a/../b/./c") == "a/_/b/_/c"
    assert mlflow_key("ü" * 300) == "_" * 250
