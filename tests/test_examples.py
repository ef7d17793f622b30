import importlib
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import TensorDataset

from lightning_cka.reference import load_reference

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
train = importlib.import_module("train")
image_data = importlib.import_module("image_data")
classifier = importlib.import_module("classifier")

# A tiny ViT (4 x 4 patches of 8 px), 4 steps, a probe at steps 0, 2 and 4: a few seconds per run on CPU.
TINY = ["--model", "test_vit", "--model-kwargs", "patch_size=8", "--batch-size", "16", "--max-steps", "4"]
TINY += ["--val-every", "2", "--cka-every", "2", "--probe-size", "16", "--cka-batch-size", "8"]
# resnet18_cifar with narrow stages, so that the timm kwargs must travel through the checkpoint too.
NARROW_RESNET = ["--model", "resnet18_cifar", "--model-kwargs", "channels=(8,16,16,16)"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine thread handoffs make runs 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, *extra):
    return train.main([*TINY, "--train-size", "64", "--reference", "test_resnet", "--out", str(tmp_path), *extra])


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    summary = run(out, "--summary-json", str(out / "summary.json"))
    return summary, out


def test_run_logs_every_documented_tag_and_array(default_run):
    summary, _ = default_run
    log_dir = Path(summary["log_dir"])
    assert sorted(p.name for p in (log_dir / "cka").glob("step_*.npz")) == [f"step_000000{s}.npz" for s in (0, 2, 4)]
    acc = events(log_dir)
    images = {"cka/intra", "cka/reference", "cka/intra_change", "attention/mean_distance"}
    assert images <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("cka/intra")] == [0, 2, 4]
    scalars = set(acc.Tags()["scalars"])
    blocks = [f"blocks.{i}" for i in range(6)]
    expected = {"cka/probe_seconds", "cka/adjacent_mean", "cka/offdiag_mean", "test/accuracy", "val/accuracy"}
    expected |= {f"cka_vs_previous/{b}" for b in blocks} | {f"cka_reference/best_value/{b}" for b in blocks}
    expected |= {f"attention/{kind}/{b}.attn" for kind in ("mean_distance", "local_fraction") for b in blocks}
    assert expected <= scalars, expected - scalars
    with np.load(log_dir / "cka" / "step_0000004.npz") as arrays:
        assert arrays["intra"].shape == (6, 6) and arrays["reference"].shape[0] == 6


def test_summary_json_and_checkpoint(default_run):
    _, out = default_run
    saved = json.loads((out / "summary.json").read_text())
    assert saved["run"] == "test_vit-digits-n64" and Path(saved["log_dir"]).is_dir()
    assert saved["steps"] == 4 and saved["cka_every"] == 2 and saved["train_size"] == 64
    assert saved["fit_seconds"] > 0 and 0 <= saved["test_accuracy"] <= 1
    assert saved["log_dir"] == str(out / "test_vit-digits-n64" / "version_0")
    assert saved["timm_kwargs"] == {"img_size": 32, "num_classes": 10, "patch_size": 8}
    assert Path(saved["checkpoint"]).is_file()


def test_cka_every_zero_adds_no_monitor(tmp_path, monkeypatch):
    def no_monitor(*args, **kwargs):
        raise AssertionError("CKAMonitor was created")

    monkeypatch.setattr(train, "CKAMonitor", no_monitor)
    summary = run(tmp_path, "--cka-every", "0")
    assert summary["cka_every"] == 0 and summary["steps"] == 4
    assert not (Path(summary["log_dir"]) / "cka").exists()
    assert not any(tag.startswith(("cka", "attention")) for tag in events(summary["log_dir"]).Tags()["scalars"])


def test_checkpoint_of_one_run_is_the_reference_of_another(tmp_path):
    resnet = train.main([*TINY, *NARROW_RESNET, "--train-size", "64", "--cka-every", "0", "--out", str(tmp_path)])
    rebuilt = load_reference(resnet["checkpoint"])
    assert rebuilt.conv1.stride == (1, 1) and isinstance(rebuilt.maxpool, torch.nn.Identity)
    saved = torch.load(resnet["checkpoint"], weights_only=True)["state_dict"]
    assert torch.equal(rebuilt.layer4[1].conv2.weight, saved["model.layer4.1.conv2.weight"])

    vit = run(tmp_path, "--reference", resnet["checkpoint"], "--no-images")
    with np.load(Path(vit["log_dir"]) / "cka" / "step_0000004.npz") as arrays:
        assert list(arrays["reference_layers"]) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        assert arrays["reference"].shape == (6, 8) and np.isfinite(arrays["reference"]).all()


@pytest.mark.parametrize(("model", "first_layer"), [("test_resnet", "layer1.0"), ("test_efficientnet", "blocks.0.0")])
def test_cnns_train_with_the_monitor(tmp_path, model, first_layer):
    args = ["--model", model, "--batch-size", "16", "--max-steps", "2", "--val-every", "2", "--cka-every", "2"]
    args += ["--probe-size", "16", "--cka-batch-size", "8", "--train-size", "32", "--reference", "none"]
    summary = train.main([*args, "--out", str(tmp_path)])
    with np.load(Path(summary["log_dir"]) / "cka" / "step_0000002.npz") as arrays:
        layers = list(arrays["layers"])
        assert layers[0] == first_layer and len(layers) > 1 and arrays["intra"].shape == (len(layers), len(layers))
        assert "mean_attention_distance" not in arrays.files  # no attention modules, no attention picture
    images = set(events(summary["log_dir"]).Tags()["images"])
    assert {"cka/intra", "cka/intra_change"} <= images and "attention/mean_distance" not in images


def test_resnet18_cifar_keeps_full_resolution_in_layer1():
    model = timm.create_model("resnet18_cifar", num_classes=10)
    features = model.forward_intermediates(torch.randn(2, 3, 32, 32), intermediates_only=True)
    assert [f.shape[-1] for f in features] == [32, 32, 16, 8, 4]  # stem, layer1..4
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet18_cifar", pretrained=True)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit_tiny_patch4", ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 7})),
        ("resnet18_cifar", ("resnet18_cifar", {"num_classes": 7})),
        ("efficientnet_b0", ("efficientnet_b0", {"num_classes": 7})),  # takes any size: no img_size
        ("deit_tiny_patch16_224", ("deit_tiny_patch16_224", {"img_size": 32, "num_classes": 7})),
    ],
)
def test_presets_and_timm_names(name, expected):
    assert classifier.timm_spec(name, 7) == expected


@pytest.mark.parametrize(
    ("flags", "reference", "reference_kwargs"),
    [
        ([], "resnet18_cifar", {"num_classes": 10}),
        (
            ["--reference", "vit_tiny_patch4"],
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 4, "num_classes": 10},
        ),
        (["--reference", "none", "--no-images"], None, None),
    ],
)
def test_monitor_flags(flags, reference, reference_kwargs):
    args = train.build_parser().parse_args(["--layers", "blocks.0,blocks.1", "--layers", "blocks.5", *flags])
    monitor = train.make_monitor(args, num_classes=10)
    assert monitor.layers == ["blocks.0", "blocks.1", "blocks.5"]
    if reference is None:
        assert monitor.reference is None
    else:
        assert (monitor.reference.model, monitor.reference.kwargs) == (reference, reference_kwargs)
    assert (monitor.every_n_train_steps, monitor.sampler.size, monitor.batch_size) == (25, 256, 64)  # 4 minibatches
    assert monitor.log_images is ("--no-images" not in flags)


def test_train_size_and_fraction_subsample_by_seed():
    data = TensorDataset(torch.arange(200))
    size = image_data.subsample(data, 30, None, seed=0)
    assert len(size) == 30 and size.indices == sorted(set(size.indices))
    assert size.indices == image_data.subsample(data, 30, None, seed=0).indices
    assert size.indices != image_data.subsample(data, 30, None, seed=1).indices
    assert len(image_data.subsample(data, None, 0.25, seed=0)) == 50
    assert len(image_data.subsample(data, None, 0.001, seed=0)) == 1
    assert image_data.subsample(data, None, None, seed=0) is data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-fraction", "1.5"], "--train-fraction: must be in (0, 1], got 1.5"),
        (["--train-size", "0"], "--train-size: must be a positive integer"),
        (["--train-size", "10", "--train-fraction", "0.5"], "not allowed with argument"),
        (["--train-size", "5000"], "--train-size 5000 exceeds the 1197 training images"),
        (["--model", "no_such_net"], "--model 'no_such_net' is neither a preset"),
        (["--reference", "missing.ckpt"], "--reference 'missing.ckpt' is neither an existing checkpoint file"),
        (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir DIR"),
        (
            ["--dataset", "imagefolder", "--data-dir", str(EXAMPLES)],
            "needs train/<class>/ and val/<class>/ or test/<class>/",
        ),
        (["--model-kwargs", "depth"], "KEY=VALUE pairs such as depth=6, got 'depth'"),
        (["--cka-batch-size", "2"], "must be at least 4"),
        (["--cka-every", "-1"], "--cka-every: must be 0 or a positive integer"),
    ],
)
def test_bad_arguments_name_the_problem(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err


def test_lightning_s_cloud_logger_tip_is_not_printed(tmp_path):
    # Lightning's loggers stop propagating to the root when it was imported before any handler existed (as in a
    # pytest-xdist worker), so the messages are caught at its package loggers, where they arrive either way.
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    parents = [logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning")]
    for parent in parents:
        parent.addHandler(handler)
    try:
        train.main([*TINY, "--max-steps", "1", "--cka-every", "0", "--train-size", "16", "--out", str(tmp_path)])
    finally:
        for parent in parents:
            parent.removeHandler(handler)
    assert any("GPU available" in m for m in messages), messages  # Lightning's own messages reach the capture
    assert not any("litlogger" in m for m in messages)


def test_small_vs_large_trains_seeds_of_both_and_compares_the_groups(tmp_path, capsys):
    small_vs_large = importlib.import_module("small_vs_large")
    args = ["--small", "0.05", "--large", "0.1", "--seeds", "2", "--out", str(tmp_path), *TINY, "--max-steps", "2"]
    figure = small_vs_large.main([*args, "--no-images"])  # drawing would take most of these tiny runs' time
    assert figure == tmp_path / "comparison.png" and figure.stat().st_size > 0
    for name in ("small-seed0", "small-seed1", "large-seed0", "large-seed1"):
        assert list((tmp_path / name / "version_0" / "cka").glob("step_*.npz"))
    tags = events(tmp_path / "large-seed1" / "version_0").Tags()
    assert not tags["images"] and not tags["tensors"] and "cka/offdiag_mean" in tags["scalars"]
    printed = capsys.readouterr().out
    assert "run 1/4: small (0.05 of the training set), seed 0" in printed and "run 4/4: large" in printed
    assert "plan: test_vit on digits (60 training images), 2 steps" in printed
    assert "± sd over runs" in printed and f"comparison: {figure}" in printed
    labels = re.findall(r"^((?:small|large), \d+ images): test accuracy", printed, re.MULTILINE)
    report = (tmp_path / "report.md").read_text()  # the report of both groups, labelled as the runs were printed
    assert len(labels) == 2 and all(label in report for label in labels)
    with pytest.raises(SystemExit):
        small_vs_large.main(["--train-size", "10"])
    assert "--train-size: set by this script" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a second comparison into the same folder would mix with the first
        small_vs_large.main(args)
    assert f"{tmp_path} already holds small-seed0, small-seed1, large-seed0" in capsys.readouterr().err


def test_analyze_on_the_demo_checkpoint_reproduces_the_monitor(default_run, tmp_path, capsys):
    from lightning_cka import CKAResult
    from lightning_cka.cli import main as lightning_cka

    summary, _ = default_run
    assert lightning_cka(["analyze", "--model", summary["checkpoint"], "--out", str(tmp_path / "again")]) == 0
    printed = capsys.readouterr().out
    assert "using the monitor's settings" in printed and "reduction mean" in printed
    assert "the run's 16 probe images" in printed
    logged = CKAResult.load(Path(summary["log_dir"]) / "cka" / "step_0000004.npz")
    again = CKAResult.load(tmp_path / "again" / "cka" / "analysis.npz")
    assert again.probe_hash == logged.probe_hash and again.layers == logged.layers
    for key in ("intra", "intra_se", "mean_attention_distance"):
        np.testing.assert_allclose(again.get(key), logged.get(key), rtol=1e-6, atol=1e-9, err_msg=key)
    assert (
        lightning_cka(
            ["analyze", "--model", summary["checkpoint"], "--reduction", "flatten", "--out", str(tmp_path / "other")]
        )
        == 0
    )
    assert "differs from the run: reduction flatten (the run's: mean)" in capsys.readouterr().out


@pytest.mark.parametrize(("pool", "prefix"), [("avg", 0), ("token", 1)])
def test_global_pool_flag_builds_the_cls_or_the_gap_vit(pool, prefix):
    parser = train.build_parser()
    args = parser.parse_args(["--model", "vit_tiny_patch4", "--global-pool", pool])
    train.check_args(parser, args)
    _, kwargs = classifier.timm_spec(args.model, 10, train.model_kwargs(args))
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    assert model.global_pool == pool and model.num_prefix_tokens == prefix


def test_no_skip_parses_blocks_and_branches():
    assert classifier.parse_no_skip("3") == ["3:attn", "3:mlp"]
    assert classifier.parse_no_skip("2:mlp,4") == ["2:mlp", "4:attn", "4:mlp"]
    assert classifier.parse_no_skip("10:attn, 3:attn,3") == ["3:attn", "3:mlp", "10:attn"]
    for bad in ("3:skip", "x", "", "-1"):
        with pytest.raises(ValueError, match="expected BLOCK, BLOCK:attn or BLOCK:mlp"):
            classifier.parse_no_skip(bad)


def test_no_skip_block_computes_its_branches_without_the_skip():
    torch.manual_seed(0)
    model = timm.create_model("vit_no_skip", base="test_vit", no_skip=["0:attn", "1:attn", "1:mlp"], img_size=32)
    plain, attn_only, both = model.blocks[2], model.blocks[0], model.blocks[1]
    assert type(plain) is timm.models.vision_transformer.Block
    assert isinstance(attn_only, classifier.NoSkipBlock) and (attn_only.skip_attn, attn_only.skip_mlp) == (False, True)
    assert (both.skip_attn, both.skip_mlp) == (False, False)
    x = torch.randn(2, 5, model.embed_dim)
    y = attn_only.attn(attn_only.norm1(x))
    torch.testing.assert_close(attn_only(x), y + attn_only.mlp(attn_only.norm2(y)))
    y = both.attn(both.norm1(x))
    torch.testing.assert_close(both(x), both.mlp(both.norm2(y)))
    # same parameters as the plain ViT: a plain checkpoint's state dict fits
    assert model.state_dict().keys() == timm.create_model("test_vit", img_size=32).state_dict().keys()
    with pytest.raises(ValueError, match="there is no block 9"):
        timm.create_model("vit_no_skip", base="test_vit", no_skip=["9:mlp"])
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        timm.create_model("vit_no_skip", base="test_resnet", no_skip=["0:mlp"])


def test_no_skip_run_is_rebuilt_from_its_checkpoint_and_named_by_the_residual_analysis(tmp_path, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with pytest.warns(UserWarning, match="NoSkipBlock overrides its forward"):
        summary = run(tmp_path, "--no-skip", "1:attn,2", "--reference", "none", "--no-images", "--threads", "3")
    assert threads == [3]
    assert summary["timm_name"] == "vit_no_skip"
    assert summary["timm_kwargs"]["base"] == "test_vit"
    assert summary["timm_kwargs"]["no_skip"] == ["1:attn", "2:attn", "2:mlp"]
    rebuilt = load_reference(summary["checkpoint"])
    flags = [(getattr(b, "skip_attn", None), getattr(b, "skip_mlp", None)) for b in rebuilt.blocks[:3]]
    assert flags == [(None, None), (False, True), (False, False)]
    with np.load(Path(summary["log_dir"]) / "cka" / "step_0000004.npz") as arrays:
        assert list(arrays["residual_blocks"]) == ["blocks.0", "blocks.3", "blocks.4", "blocks.5"]
        assert np.isfinite(arrays["intra"]).all()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--no-skip", "3:skip"], "argument --no-skip: expected BLOCK, BLOCK:attn or BLOCK:mlp"),
        (["--no-skip", "6"], "--no-skip 6:attn,6:mlp: there is no block 6: vit_tiny_patch16_224 has blocks 0 to 5"),
        (["--model", "resnet18_cifar", "--no-skip", "1"], "vit_no_skip needs a timm VisionTransformer"),
        (["--cutmix", "-1"], "argument --cutmix: must be 0 or positive, got -1"),
        (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    ],
)
def test_bad_new_flags_name_the_problem(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--cutmix"], (0.0, 1.0, 0.0)),
        (["--mixup"], (0.8, 0.0, 0.0)),
        (["--cutmix", "0.5", "--mixup", "0.2", "--label-smoothing", "0.1"], (0.2, 0.5, 0.1)),
        ([], (0.0, 0.0, 0.0)),
    ],
)
def test_mixing_flags_have_the_usual_strengths(flags, expected):
    args = train.build_parser().parse_args(flags)
    assert (args.mixup, args.cutmix, args.label_smoothing) == expected


def test_mix_makes_soft_targets_and_leaves_the_odd_image_out():
    torch.manual_seed(0)
    module = classifier.ImageClassifier("test_vit", {"img_size": 32, "num_classes": 10}, cutmix_alpha=1.0)
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4])
    module.mixup.mix_prob = 1.0
    mixed, targets = module.mix(images.clone(), labels)
    assert targets.shape == (5, 10) and torch.allclose(targets.sum(1), torch.ones(5))
    torch.testing.assert_close(mixed[4], images[4])  # the odd one out, unmixed, with its hard label
    assert targets[4].tolist() == [1.0 if i == 4 else 0.0 for i in range(10)]
    pairs = [(0, 3), (1, 2)]  # timm pairs image i with image n - 1 - i of the even part
    for i, j in pairs:
        assert set(targets[i].nonzero().flatten().tolist()) <= {labels[i].item(), labels[j].item()}
    smooth = classifier.ImageClassifier("test_vit", {"img_size": 32, "num_classes": 10}, label_smoothing=0.1)
    assert smooth.mixup is None and module.hparams.cutmix_alpha == 1.0


def test_cutmix_and_mixup_train_and_validate_on_hard_labels(tmp_path, monkeypatch):
    seen = []
    real = classifier.ImageClassifier.mix

    def counted(self, images, labels):
        seen.append(len(images))
        return real(self, images, labels)

    monkeypatch.setattr(classifier.ImageClassifier, "mix", counted)
    # 31 images in batches of 16: every second training batch has 15, an odd batch
    flags = [*TINY, "--train-size", "31", "--cka-every", "0", "--out", str(tmp_path)]
    summary = train.main([*flags, "--cutmix", "--mixup", "--label-smoothing", "0.1"])
    assert (summary["cutmix"], summary["mixup"], summary["label_smoothing"]) == (1.0, 0.8, 0.1)
    assert seen == [16, 15, 16, 15]  # training batches only: validation and test take the hard labels
    hparams = torch.load(summary["checkpoint"], weights_only=True)["hyper_parameters"]
    assert (hparams["cutmix_alpha"], hparams["mixup_alpha"], hparams["label_smoothing"]) == (1.0, 0.8, 0.1)
    assert 0 <= summary["test_accuracy"] <= 1


def test_efficientnet_cifar_presets_keep_a_2x2_last_stage_and_rebuild(tmp_path):
    assert classifier.timm_spec("tinynet_e_cifar", 10) == (
        "efficientnet_cifar",
        {"base": "tinynet_e", "num_classes": 10},
    )
    with torch.device("meta"):
        plain = timm.create_model("efficientnet_b0", num_classes=10)
        cifar = timm.create_model("efficientnet_cifar", base="efficientnet_b0", num_classes=10)
    assert plain.conv_stem.stride == (2, 2) and cifar.conv_stem.stride == (1, 1)
    args = ["--model", "tinynet_e_cifar", "--batch-size", "16", "--max-steps", "2", "--val-every", "2"]
    args += ["--cka-every", "2", "--probe-size", "16", "--cka-batch-size", "8", "--train-size", "32"]
    summary = train.main([*args, "--reference", "none", "--no-images", "--out", str(tmp_path)])
    rebuilt = load_reference(summary["checkpoint"])
    assert rebuilt.conv_stem.stride == (1, 1)
    assert rebuilt.forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (2, 2)
    with np.load(Path(summary["log_dir"]) / "cka" / "step_0000002.npz") as arrays:
        assert arrays["layers"][0] == "blocks.0.0" and np.isfinite(arrays["intra"]).all()
    with pytest.raises(ValueError, match="needs a timm EfficientNet with a 3 x 3 conv_stem"):
        timm.create_model("efficientnet_cifar", base="test_resnet")


@pytest.mark.parametrize(("pool", "prefix"), [("avg", 0), ("token", 1)])
def test_global_pool_runs_with_and_without_the_class_token(tmp_path, pool, prefix):
    summary = run(tmp_path, "--global-pool", pool, "--reference", "none", "--no-images")
    assert summary["timm_kwargs"]["class_token"] is (pool == "token")
    rebuilt = load_reference(summary["checkpoint"])
    assert rebuilt.global_pool == pool and rebuilt.num_prefix_tokens == prefix
    with np.load(Path(summary["log_dir"]) / "cka" / "step_0000004.npz") as arrays:
        assert set(arrays["residual_prefix_tokens"].ravel().tolist()) == {prefix}
        assert bool(np.isnan(arrays["residual_ratio_cls"]).all()) is (pool == "avg")  # the CLS token's skip ratios
        assert np.isfinite(arrays["mean_attention_distance"]).all()


def test_ablate_trains_both_sides_compares_and_refuses_to_overwrite(tmp_path, capsys):
    ablate = importlib.import_module("ablate")
    common = [*TINY, "--max-steps", "2", "--train-size", "32", "--reference", "none", "--no-images"]
    args = ["--a", "--cutmix", "--b", "", "--labels", "CutMix", "plain", "--out", str(tmp_path / "ab"), *common]
    figure = ablate.main(args)
    assert figure == tmp_path / "ab" / "comparison.png" and figure.stat().st_size > 0
    for name in ("CutMix", "plain"):
        assert list((tmp_path / "ab" / name / "version_0" / "cka").glob("step_*.npz"))
    manifest = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert [side["flags"] for side in manifest["sides"]] == [["--cutmix"], []]
    assert manifest["sides"][0]["runs"][0]["cutmix"] == 1.0 and manifest["sides"][1]["runs"][0]["cutmix"] == 0.0
    printed = capsys.readouterr().out
    assert "run 1/2: CutMix (--cutmix), seed 0" in printed and "run 2/2: plain (no extra flags), seed 0" in printed
    assert "CutMix: test accuracy" in printed and f"comparison: {figure}" in printed
    assert (tmp_path / "ab" / "report.html").stat().st_size > 0 and "report: " in printed
    assert manifest["report"][:2] == ["lightning-cka", "report"] and "--vs" in manifest["report"]
    with pytest.raises(SystemExit):
        ablate.main(args)
    assert "already holds CutMix, plain, comparison.png, report.html, ablation.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--a", "--seed 3", "--b", ""], "--seed in --a: set by this script"),
        (["--a", "--cutmix", "--b", "--cutmix"], "--a and --b give the same flags"),
        (["--a", "--cutmix", "--b", "", "--name", "x"], "--name in the common flags: set by this script"),
        (["--a", "--no-skip 9", "--b", ""], "there is no block 9"),
        (["--a", "'--cutmix", "--b", ""], "No closing quotation"),
    ],
)
def test_ablate_refuses_bad_flags_before_training(args, message, capsys):
    ablate = importlib.import_module("ablate")
    with pytest.raises(SystemExit):
        ablate.main(args)
    assert message in capsys.readouterr().err


def test_ablate_names_and_default_folder():
    ablate = importlib.import_module("ablate")
    assert ablate.slug("no skip, block 3") == "no_skip_block_3" and ablate.slug("--cutmix 1.0") == "cutmix_1.0"
    assert ablate.split_side_values(["--a", "--cutmix", "--b", "", "--seeds", "2"]) == [
        "--a=--cutmix",
        "--b=",
        "--seeds",
        "2",
    ]
    args, rest = ablate.build_parser().parse_known_args(
        ablate.split_side_values(["--a", "--cutmix", "--b", "--mixup 0.2"])
    )
    assert (args.a, args.b, rest) == ("--cutmix", "--mixup 0.2", [])


def test_lr_scale_splits_timm_s_weight_decay_groups_by_factor():
    model = timm.create_model("test_vit", img_size=32)
    groups = classifier.param_groups(model, 1e-3, 0.05, {"patch_embed.*": 0.1, "pos_embed": 10.0})
    by_name = {id(p): name for name, p in model.named_parameters()}
    found = {(round(g["lr"], 9), g["weight_decay"]): sorted(by_name[id(p)] for p in g["params"]) for g in groups}
    assert found[(1e-2, 0.0)] == ["pos_embed"]  # no weight decay on the position embedding, as timm
    assert found[(1e-4, 0.05)] == ["patch_embed.proj.weight"]
    assert found[(1e-4, 0.0)] == ["patch_embed.proj.bias"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert train.parse_lr_scale(["patch_embed.*=0.1", "pos_embed=10"]) == {"patch_embed.*": 0.1, "pos_embed": 10.0}


def test_lr_scale_reaches_the_optimizer(tmp_path, monkeypatch):
    made = []
    real = classifier.create_optimizer_v2

    def recorded(params, *args, **kwargs):
        made.append(real(params, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(classifier, "create_optimizer_v2", recorded)
    flags = [*TINY, "--train-size", "16", "--max-steps", "1", "--cka-every", "0", "--out", str(tmp_path)]
    summary = train.main([*flags, "--lr", "0.01", "--lr-scale", "pos_embed=3"])
    hparams = torch.load(summary["checkpoint"], weights_only=True)["hyper_parameters"]
    assert hparams["lr_scale"] == {"pos_embed": 3.0}
    (optimizer,) = made
    assert sorted(round(group["initial_lr"], 9) for group in optimizer.param_groups) == [0.01, 0.01, 0.03]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--lr-scale", "pos_x=3"],
            "--lr-scale pos_x: matches no parameter of the model; its names are like cls_token",
        ),
        (["--lr-scale", "pos_embed"], "--lr-scale takes PATTERN=FACTOR pairs such as 'patch_embed.*=0.1'"),
        (["--lr-scale", "pos_embed=-1"], "got 'pos_embed=-1'"),
    ],
)
def test_bad_lr_scale_names_the_problem(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err


def test_sincos_pos_embed_is_fixed_and_survives_the_checkpoint(tmp_path):
    table = classifier.sincos_2d((8, 8), 96)
    assert table.shape == (64, 96) and torch.allclose(table.norm(dim=1), torch.full((64,), 48**0.5))
    near, far = (torch.nn.functional.cosine_similarity(table[0], table[i], dim=0) for i in (1, 63))
    assert near > far  # neighbours have the most similar vectors
    flags = [*TINY, "--train-size", "16", "--max-steps", "2", "--cka-every", "0", "--out", str(tmp_path)]
    summary = train.main([*flags, "--pos-embed", "sincos"])
    rebuilt = load_reference(summary["checkpoint"])  # the embedding is in the weights: any process rebuilds it
    assert torch.count_nonzero(rebuilt.pos_embed[0, 0]) == 0  # the CLS slot
    torch.testing.assert_close(rebuilt.pos_embed[0, 1:], classifier.sincos_2d(rebuilt.patch_embed.grid_size, 64))
    module = classifier.ImageClassifier("test_vit", {"img_size": 32, "patch_size": 8}, pos_embed="sincos")
    assert not module.model.pos_embed.requires_grad
    with pytest.raises(SystemExit):
        train.main(["--model", "resnet18_cifar", "--pos-embed", "sincos"])
