"""Train a timm model on 32 px images with CKAMonitor attached, and watch its representations form in TensorBoard.

    python examples/train.py                   # a small ViT on scikit-learn's digits (offline), about 2 min on 2 cores
    python examples/train.py --model resnet18_cifar --reference none --cka-every 0     # a ResNet to compare with:
    python examples/train.py --reference runs/resnet18_cifar-digits/version_0/checkpoints/last.ckpt

Every flag is described in docs/examples.md.
"""

import argparse
import ast
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from classifier import PRESETS, ImageClassifier, parse_no_skip, timm_spec
from image_data import DATASETS, cifar10_splits, digits_splits, imagefolder_splits, subsample
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from lightning_cka import CKAMonitor, Reference
from lightning_cka.taps.grams import REDUCTIONS

DEFAULT_MODEL, DEFAULT_STEPS = "vit_mini_patch4", 300


def parse_lr_scale(items: Sequence[str]) -> dict[str, float]:
    """``PATTERN=FACTOR`` strings as a dict, in their order; a factor is a positive number."""
    scale = {}
    for item in items:
        pattern, sep, factor = item.rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            value = -1.0
        if not sep or not pattern or not value > 0:
            raise ValueError(f"--lr-scale takes PATTERN=FACTOR pairs such as 'patch_embed.*=0.1', got {item!r}.")
        scale[pattern] = value
    return scale


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict; values are Python literals (``6``, ``0.1``, ``True``) or else strings."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs takes KEY=VALUE pairs such as depth=6, got {item!r}.")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a float >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or positive, got {text}")
    return value


def no_skip_blocks(text: str) -> list[str]:
    """An argparse type: ``--no-skip`` as ``BLOCK:BRANCH`` strings (:func:`classifier.parse_no_skip`)."""
    try:
        return parse_no_skip(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def fraction(text: str) -> float:
    """An argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (documented in docs/examples.md)."""
    parser = argparse.ArgumentParser(
        description="Train a timm model on 32 px images with lightning-cka's CKAMonitor attached.",
        epilog="Every flag is described in docs/examples.md.",
    )
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", default=DEFAULT_MODEL, help=f"a preset ({', '.join(PRESETS)}) or any timm model name")
    data.add_argument(
        "--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE", help="more timm.create_model kwargs"
    )
    data.add_argument(
        "--global-pool",
        choices=("token", "avg"),
        help="ViTs: classify from the CLS token or the average of the patch tokens (Raghu et al. 2021 compare both)",
    )
    data.add_argument(
        "--no-skip",
        type=no_skip_blocks,
        metavar="BLOCKS",
        help="ViTs: remove the skip connection of these blocks' branches: 3 (attention and MLP of block 3), 3:attn, "
        "2:mlp,4 ... (blocks count from 0; x = attn(norm1(x)) instead of x = x + attn(norm1(x)))",
    )
    data.add_argument(
        "--pos-embed",
        choices=("learn", "sincos"),
        default="learn",
        help="ViTs: the learned position embedding, or MAE's fixed 2D sine-cosine one (default: learn)",
    )
    data.add_argument("--dataset", choices=DATASETS, default="digits", help="training data (default: digits)")
    data.add_argument("--data-dir", type=Path, help="dataset folder, for cifar10 and imagefolder")
    size = data.add_mutually_exclusive_group()
    size.add_argument("--train-fraction", type=fraction, help="train on this fraction of the training images")
    size.add_argument("--train-size", type=positive_int, help="train on this many training images")

    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=positive_int, help=f"default: {DEFAULT_STEPS}, or none with --max-epochs")
    train.add_argument("--max-epochs", type=positive_int, help="stop after this many epochs")
    train.add_argument("--batch-size", type=positive_int, default=64, help="batch of every split (default: 64)")
    train.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    train.add_argument(
        "--warmup-fraction", type=float, default=0.1, help="warmup share of steps (default: %(default)s)"
    )
    train.add_argument(
        "--lr-scale",
        nargs="+",
        default=[],
        metavar="PATTERN=FACTOR",
        help="train the parameters whose names match the glob PATTERN with FACTOR times --lr, e.g. "
        "'patch_embed.*=0.1' pos_embed=10 (the first matching pattern counts)",
    )
    train.add_argument(
        "--cutmix",
        type=non_negative_float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="ALPHA",
        help="CutMix training batches (timm's Mixup) with this alpha; the flag alone: 1.0 (default: off)",
    )
    train.add_argument(
        "--mixup",
        type=non_negative_float,
        nargs="?",
        const=0.8,
        default=0.0,
        metavar="ALPHA",
        help="MixUp training batches with this alpha; the flag alone: 0.8. With --cutmix too, each batch gets one of "
        "the two at random (default: off)",
    )
    train.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        metavar="EPS",
        help="label smoothing of the training targets; validation and test use hard labels (default: 0)",
    )
    train.add_argument(
        "--val-every", type=positive_int, default=50, help="validate every N steps (default: %(default)s)"
    )
    train.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (default: %(default)s)")
    train.add_argument("--devices", default="auto", help="a number, a list such as 0,1, or auto (default: %(default)s)")
    train.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed (default: %(default)s)")
    train.add_argument("--num-workers", type=non_negative_int, help="loader workers (default: 0 for digits, else 8)")
    train.add_argument(
        "--threads", type=positive_int, help="torch threads of this process (default: torch's, or OMP_NUM_THREADS)"
    )
    train.add_argument("--seed", type=int, default=0, help="seeds weights, batch order and subsample (default: 0)")
    train.add_argument("--out", type=Path, default=Path("runs"), help="root of the logs (default: %(default)s)")
    train.add_argument("--name", help="run name (default: MODEL-DATASET, with -nSIZE or -fracFRACTION)")
    train.add_argument("--summary-json", type=Path, help="also write the final summary to this JSON file")

    cka = parser.add_argument_group("CKA monitor")
    cka.add_argument(
        "--cka-every", type=non_negative_int, default=25, help="probe every N steps, 0: no monitor (default: 25)"
    )
    cka.add_argument(
        "--probe-size", type=positive_int, default=256, help="validation images in the probe (default: 256)"
    )
    cka.add_argument(
        "--cka-batch-size",
        type=positive_int,
        default=64,
        help="minibatch of the CKA estimator; the standard errors need 4 or more minibatches (default: 64)",
    )
    cka.add_argument("--layers", action="append", help="layer names or patterns, repeatable or comma-separated")
    cka.add_argument(
        "--linear-probe", action="store_true", help="also fit ridge probes of the class at every layer (CKAMonitor)"
    )
    cka.add_argument(
        "--localization", action="store_true", help="also measure spatial localization of the last layer (costly)"
    )
    cka.add_argument(
        "--no-images",
        action="store_true",
        help="log no figures (no images, nothing for the CKA tab; the arrays and scalars keep every number)",
    )
    cka.add_argument(
        "--reduction", choices=REDUCTIONS, default="mean", help="what a layer output becomes (default: mean)"
    )
    cka.add_argument(
        "--reference",
        default="resnet18_cifar",
        help="timm name, preset, checkpoint of a run, or none (default: resnet18_cifar)",
    )
    cka.add_argument("--reference-weights", help="state dict or checkpoint for a named reference")
    cka.add_argument(
        "--reference-reduction", choices=REDUCTIONS, help="reduction of the reference (default: --reduction)"
    )
    return parser


def run_name(args: argparse.Namespace) -> str:
    """``MODEL-DATASET`` with ``-nSIZE`` or ``-fracFRACTION`` for a subsampled training set."""
    name = f"{args.model.replace('/', '_')}-{args.dataset}"
    if args.train_size is not None:
        name += f"-n{args.train_size}"
    elif args.train_fraction is not None and args.train_fraction < 1:
        name += f"-frac{args.train_fraction:g}"
    return name


def make_monitor(args: argparse.Namespace, num_classes: int) -> CKAMonitor | None:
    """The CKAMonitor the flags ask for, or None for ``--cka-every 0``."""
    if args.cka_every == 0:
        return None
    reference, reference_kwargs = args.reference, None
    if reference.lower() == "none":
        reference = None
    elif not Path(reference).is_file():
        reference, reference_kwargs = timm_spec(reference, num_classes)
    layers = [name for entry in args.layers for name in entry.split(",") if name] if args.layers else "auto"
    analyses = ["default", *(["linear_probe"] if args.linear_probe else []), *(["localization"] * args.localization)]
    if reference is not None:
        reference = Reference(
            reference, weights=args.reference_weights, kwargs=reference_kwargs, reduction=args.reference_reduction
        )
    return CKAMonitor(
        every_n_train_steps=args.cka_every,
        analyses=analyses,
        probe_size=args.probe_size,
        batch_size=args.cka_batch_size,
        layers=layers,
        reduction=args.reduction,
        reference=reference,
        log_images=not args.no_images,
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations argparse cannot check, naming the fix."""
    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} needs --data-dir DIR.")
    if args.model not in PRESETS and not timm.is_model(args.model):
        parser.error(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a timm model name.")
    reference = args.reference
    known = reference.lower() == "none" or reference in PRESETS or timm.is_model(reference)
    if not known and not Path(reference).is_file():
        parser.error(
            f"--reference {reference!r} is neither an existing checkpoint file, a preset nor a timm model name; "
            "give none to train without a reference."
        )
    if args.reference_weights and not Path(args.reference_weights).is_file():
        parser.error(f"--reference-weights {args.reference_weights!r}: no such file.")
    if args.cka_batch_size < 4 or args.probe_size < 4:
        parser.error("--probe-size and --cka-batch-size must be at least 4 (the unbiased CKA estimator needs 4).")
    if not 0 <= args.warmup_fraction < 1:
        parser.error(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}.")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}.")
    try:
        args.model_kwargs = parse_model_kwargs(args.model_kwargs)
        args.lr_scale = parse_lr_scale(args.lr_scale)
    except ValueError as err:
        parser.error(str(err))
    if args.no_skip or args.lr_scale or args.pos_embed != "learn":
        try:  # on the meta device: checks --no-skip's blocks and --lr-scale's names without allocating weights
            with torch.device("meta"):
                name, kwargs = model_spec(args, 10)
                model = timm.create_model(name, **kwargs)
                names = [name for name, _ in model.named_parameters()]
        except ValueError as err:
            parser.error(f"--no-skip {','.join(args.no_skip)}: {err}")
        if args.pos_embed == "sincos" and getattr(model, "pos_embed", None) is None:
            parser.error(f"--pos-embed sincos applies to ViTs with a position embedding; {args.model} has none.")
        for pattern in args.lr_scale:
            if not any(fnmatchcase(name, pattern) for name in names):
                parser.error(
                    f"--lr-scale {pattern}: matches no parameter of the model; its names are like "
                    f"{', '.join(names[:4])}, ..."
                )


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset, Dataset, int]:
    """Training (subsampled as the flags ask), validation and test splits, and the number of classes."""
    if args.dataset == "digits":
        train_set, val_set, test_set, num_classes = digits_splits()
    elif args.dataset == "cifar10":
        train_set, val_set, test_set, num_classes = cifar10_splits(args.data_dir)
    else:
        train_set, val_set, test_set, num_classes = imagefolder_splits(args.data_dir)
    return subsample(train_set, args.train_size, args.train_fraction, args.seed), val_set, test_set, num_classes


def make_trainer(args: argparse.Namespace, monitor: CKAMonitor | None) -> pl.Trainer:
    """A Trainer logging to TensorBoard under ``--out/<name>``, saving ``last.ckpt`` and validating by steps."""
    return pl.Trainer(
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        precision=args.precision,
        max_steps=args.max_steps or (-1 if args.max_epochs else DEFAULT_STEPS),
        max_epochs=args.max_epochs,
        logger=TensorBoardLogger(args.out, name=args.name or run_name(args), default_hp_metric=False),
        callbacks=[
            ModelCheckpoint(save_last=True, save_top_k=0),  # only last.ckpt, written when training ends
            LearningRateMonitor(logging_interval="step"),
            *([monitor] if monitor else []),
        ],
        check_val_every_n_epoch=None,  # validate by steps: a small training set has very short epochs
        val_check_interval=args.val_every,
        log_every_n_steps=10,
        enable_model_summary=False,
    )


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The timm kwargs the flags add to the preset's: ``--model-kwargs``, and ``--global-pool`` for ViTs."""
    extra = dict(args.model_kwargs)
    if args.global_pool is not None:  # the paper's CLS-token ViT against its global-average-pooling ViT
        extra |= {"global_pool": args.global_pool, "class_token": args.global_pool == "token"}
    return extra


def model_spec(args: argparse.Namespace, num_classes: int) -> tuple[str, dict[str, Any]]:
    """The timm name and kwargs of the model to train; with ``--no-skip``, the ``vit_no_skip`` wrapper of them.

    The checkpoint saves both, so ``Reference(checkpoint)`` rebuilds the same architecture in any process that
    imported ``classifier`` (which registers ``vit_no_skip`` with timm).
    """
    name, kwargs = timm_spec(args.model, num_classes, model_kwargs(args))
    if args.no_skip:
        name, kwargs = "vit_no_skip", {"base": name, "no_skip": list(args.no_skip), **kwargs}
    return name, kwargs


def plan(args: argparse.Namespace, trainer: pl.Trainer, monitor: CKAMonitor | None, train_size: int) -> str:
    """One line saying what this run will do, printed before anything slow starts."""
    steps = args.max_steps or (f"{args.max_epochs} epochs" if args.max_epochs else DEFAULT_STEPS)
    parts = [f"plan: {args.model} on {args.dataset} ({train_size} training images), {steps} steps"]
    if args.no_skip:
        parts.append(f"no skip connection at {', '.join(args.no_skip)}")
    mixing = [f"{name} {alpha:g}" for name, alpha in (("CutMix", args.cutmix), ("MixUp", args.mixup)) if alpha > 0]
    if mixing or args.label_smoothing:
        parts.append(" and ".join(mixing + [f"label smoothing {args.label_smoothing:g}"] * (args.label_smoothing > 0)))
    if monitor is None:
        parts.append("no CKA monitor")
    else:
        probes = f"~{1 + int(steps) // args.cka_every}" if isinstance(steps, int) else "several"
        reference = "no reference"
        if monitor.reference is not None:
            reference = f"reference {monitor.reference.describe()[0]}"
        parts.append(f"a probe of {args.probe_size} images every {args.cka_every} steps ({probes} probes), {reference}")
    parts.append(f"logs in {trainer.logger.log_dir}")
    return "; ".join(parts)


@contextmanager
def quiet_lightning_tips() -> Any:
    """Hide Lightning's advertisement for its cloud logger (printed by every Trainer)."""
    # Lightning logs through whichever of these its namespaces was imported last (lightning_cka imports
    # lightning.pytorch when it is installed), so the filter goes on all of them.
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
    loggers = [logging.getLogger(f"{name}.utilities.rank_zero") for name in names]

    def not_an_advert(record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()

    for logger in loggers:
        logger.addFilter(not_an_advert)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(not_an_advert)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, test, print a summary and return it.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The summary: ``log_dir``, ``steps``, ``fit_seconds`` (``trainer.fit`` alone), ``test_accuracy``, ...
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)
    try:
        train_set, val_set, test_set, num_classes = load_data(args)
    except (ImportError, RuntimeError, ValueError) as err:
        parser.error(str(err))
    workers = args.num_workers
    if workers is None:  # digits are tensors in memory: worker processes would only add start-up time
        workers = 0 if args.dataset == "digits" else min(8, os.cpu_count() or 1)

    def loader(dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(args.seed)
        return DataLoader(
            dataset, args.batch_size, shuffle, num_workers=workers, persistent_workers=workers > 0, generator=generator
        )

    timm_name, timm_kwargs = model_spec(args, num_classes)
    module = ImageClassifier(
        timm_name,
        timm_kwargs,
        args.lr,
        args.weight_decay,
        args.warmup_fraction,
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        label_smoothing=args.label_smoothing,
        lr_scale=args.lr_scale or None,
        pos_embed=args.pos_embed,
    )
    monitor = make_monitor(args, num_classes)
    with warnings.catch_warnings(), quiet_lightning_tips():  # Lightning prints its tip when the Trainer is made
        trainer = make_trainer(args, monitor)
        if trainer.is_global_zero:
            print(plan(args, trainer, monitor, len(train_set)), flush=True)
        # In-memory digits need no loader workers, and Lightning logs every 10 global steps however short the epochs
        # of a small training set are; its suggestions otherwise would be noise, as are upstream deprecation notices
        # printed into the progress bar on every run.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*", FutureWarning)
        start = time.perf_counter()
        trainer.fit(module, loader(train_set, True), loader(val_set, False))
        fit_seconds = time.perf_counter() - start
        test_metrics = trainer.test(module, loader(test_set, False), verbose=False)[0]

    summary = {
        "run": trainer.logger.name,
        "log_dir": str(trainer.logger.log_dir),
        "checkpoint": str(Path(trainer.logger.log_dir) / "checkpoints" / "last.ckpt"),
        "model": args.model,
        "timm_name": timm_name,
        "timm_kwargs": timm_kwargs,
        "dataset": args.dataset,
        "train_size": len(train_set),
        "steps": trainer.global_step,
        "fit_seconds": round(fit_seconds, 2),
        "steps_per_second": round(trainer.global_step / fit_seconds, 3),
        "test_accuracy": round(float(test_metrics["test/accuracy"]), 4),
        "cka_every": args.cka_every,
        "cutmix": args.cutmix,
        "mixup": args.mixup,
        "label_smoothing": args.label_smoothing,
    }
    if trainer.is_global_zero:
        print(
            f"{summary['log_dir']}: {summary['steps']} steps on {summary['train_size']} images in "
            f"{summary['fit_seconds']:.1f} s ({summary['steps_per_second']:.2f} steps/s), "
            f"test accuracy {summary['test_accuracy']:.3f}"
        )
        # The log root, not the version folder: TensorBoard then names the run "<name>/version_N", not ".".
        print(
            f"tensorboard --logdir {args.out}    # then open the CKA tab; run {summary['run']}/version_"
            f"{trainer.logger.version}"
        )
        if args.summary_json:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
