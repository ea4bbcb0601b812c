"""main.py end to end on a tiny model and the session's synthetic dataset: the files a run writes, resuming,
atomic checkpoints, refusing bad input before training, the CPU fallback, and fine-tuning."""

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import engine
import main as main_py
import util.misc as utils
import hubconf
from helpers import file_digest, load_checkpoint_safely, run_main, tensorboard_scalars, tiny_flags
from models import build_model
from datasets.loaders import build_loaders
from util.amp import automatic_choice_is_reduced
from util.checkpoint import architecture_differences, restore_rng_states, rng_state
from util.visualize import read_log

# Dropout on, so that a resumed run also needs the model's own draws from torch's generator to continue.
RESUME_FLAGS = ("--dropout", "0.1", "--lr_drop", "3")


@pytest.fixture(scope="module")
def straight_run(synthetic_root, tmp_path_factory):
    """Output folder of 4 epochs in one go (LR drop after the 3rd)."""
    out = tmp_path_factory.mktemp("straight")
    run_main(tiny_flags(synthetic_root, out, "--epochs", "4", *RESUME_FLAGS))
    return out


@pytest.fixture(scope="module")
def resumed_run(synthetic_root, tmp_path_factory):
    """Output folder of 2 epochs, then a second command resuming from its checkpoint.pth up to epoch 4; also
    a copy of the checkpoint after epoch 2."""
    out = tmp_path_factory.mktemp("resumed")
    run_main(tiny_flags(synthetic_root, out, "--epochs", "2", *RESUME_FLAGS))
    shutil.copy(out / "checkpoint.pth", out / "after_epoch_2.pth")
    shutil.copy(out / "log.txt", out / "after_epoch_2.log")
    run_main(tiny_flags(synthetic_root, out, "--epochs", "4", *RESUME_FLAGS, "--resume", str(out / "checkpoint.pth")))
    return out


@pytest.fixture
def previous_run(resumed_run, tmp_path):
    """A fresh output folder holding the checkpoint and log of a finished epoch (epoch index 1)."""
    shutil.copy(resumed_run / "after_epoch_2.pth", tmp_path / "checkpoint.pth")
    shutil.copy(resumed_run / "after_epoch_2.log", tmp_path / "log.txt")
    return tmp_path


def assert_same_logs(log_a, log_b, tol=1e-6):
    assert len(log_a) == len(log_b)
    for a, b in zip(log_a, log_b):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], list):
                assert a[k] == pytest.approx(b[k], abs=tol), k
            else:
                assert a[k] == pytest.approx(b[k], abs=tol, rel=tol), (a["epoch"], k)


# ---------------------------------------------------------------------------------------------- output files


def test_a_run_writes_the_originals_files(straight_run):
    checkpoint = load_checkpoint_safely(straight_run / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= checkpoint.keys()
    assert checkpoint["epoch"] == 3
    args = checkpoint["args"]
    assert isinstance(args, argparse.Namespace) and args.epochs == 4 and args.num_classes == 6
    assert checkpoint["lr_scheduler"]["last_epoch"] == 4
    # lr 1e-3 (the synthetic detection default), dropped x0.1 after the third epoch.
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == pytest.approx([1e-4, 1e-4])
    model, _, _ = build_model(args)
    model.load_state_dict(checkpoint["model"], strict=True)

    log = read_log(straight_run / "log.txt")
    assert [row["epoch"] for row in log] == [0, 1, 2, 3]
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for row in log:
        assert row["n_parameters"] == n_parameters
        for key in (
            "train_loss",
            "train_loss_ce",
            "train_loss_bbox",
            "train_loss_giou",
            "train_lr",
            "train_class_error",
            "test_loss",
            "test_loss_ce",
            "test_loss_bbox",
            "test_loss_giou",
            "test_class_error",
            "train_loss_bbox_0",
            "test_cardinality_error_unscaled",
        ):
            assert isinstance(row[key], float), key
        assert len(row["test_coco_eval_bbox"]) == 12
        assert all(-1 <= v <= 1 for v in row["test_coco_eval_bbox"])
        # The logged total is the weighted sum of its terms (weights 1, 5, 2 for ce, bbox, giou).
        terms = [k for k in row if k.startswith("train_loss_") and not k.endswith("_unscaled")]
        assert len(terms) == 6
        assert row["train_loss"] == pytest.approx(sum(row[k] for k in terms), rel=1e-5)
    assert [row["train_lr"] for row in log] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])

    # A copy before the LR drop (after epoch index 2, as lr_drop is 3), and no other; and the best epoch's.
    assert sorted(p.name for p in straight_run.glob("checkpoint*.pth")) == [
        "checkpoint.pth",
        "checkpoint0002.pth",
        "checkpoint_best.pth",
    ]
    assert load_checkpoint_safely(straight_run / "checkpoint0002.pth")["epoch"] == 2
    assert not list(straight_run.glob("**/*.tmp*")), "temporary files left behind"

    coco_eval = torch.load(straight_run / "eval" / "latest.pth", weights_only=False)
    assert coco_eval["precision"].shape == (10, 101, 5, 4, 3)  # IoU thresholds, recall, classes, areas, maxDets
    assert sorted(p.name for p in (straight_run / "eval").iterdir()) == ["000.pth", "latest.pth", "per_class.json"]

    for name in ("predictions.png", "curves.png", "per_class.png"):
        data = (straight_run / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name


def test_eval_of_a_checkpoint_reproduces_the_logged_evaluation(straight_run, synthetic_root, tmp_path):
    checkpoint = straight_run / "checkpoint.pth"
    stats, _ = run_main(tiny_flags(synthetic_root, tmp_path, "--eval", "--resume", str(checkpoint)))
    last = read_log(straight_run / "log.txt")[-1]
    assert stats["coco_eval_bbox"] == pytest.approx(last["test_coco_eval_bbox"], abs=1e-12)
    assert stats["loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    coco_eval = torch.load(tmp_path / "eval.pth", weights_only=False)
    assert coco_eval["precision"].shape == (10, 101, 5, 4, 3)
    assert not (tmp_path / "log.txt").exists() and not (tmp_path / "checkpoint.pth").exists()


# ---------------------------------------------------------------------------------------------- TensorBoard

COCO_STATS = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)
# 16 training images in batches of 4: 4 steps an epoch, of which the first and the last are printed.
STEPS_PER_EPOCH = 4


def test_tensorboard_holds_each_logged_step_and_each_epochs_stats(straight_run):
    scalars = tensorboard_scalars(straight_run / "tensorboard")
    log = read_log(straight_run / "log.txt")
    printed = [e * STEPS_PER_EPOCH + i for e in range(4) for i in (0, STEPS_PER_EPOCH - 1)]
    for tag in (
        "train/loss",
        "train/loss_ce",
        "train/loss_bbox",
        "train/loss_giou_unscaled",
        "train/class_error",
        "train/lr",
    ):
        assert [step for step, _ in scalars[tag]] == printed, tag
    assert all(0 < value < 100 for _, value in scalars["train/loss"])
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([1e-3] * 6 + [1e-4] * 2)
    # Each epoch's evaluation at its last training step, with the values of log.txt.
    ends = [(e + 1) * STEPS_PER_EPOCH - 1 for e in range(4)]
    for k, name in enumerate(COCO_STATS):
        steps, values = zip(*scalars[f"test/bbox/{name}"])
        assert list(steps) == ends, name
        assert list(values) == pytest.approx([row["test_coco_eval_bbox"][k] for row in log], rel=1e-6, abs=1e-7)
    for key in ("loss", "loss_ce", "class_error", "cardinality_error_unscaled"):
        steps, values = zip(*scalars[f"test/{key}"])
        assert list(steps) == ends and list(values) == pytest.approx([row[f"test_{key}"] for row in log], rel=1e-6)


def test_a_resumed_run_appends_to_tensorboard_without_writing_a_step_twice(straight_run, resumed_run):
    straight = tensorboard_scalars(straight_run / "tensorboard")
    resumed = tensorboard_scalars(resumed_run / "tensorboard")
    assert len(list((resumed_run / "tensorboard").iterdir())) == 2  # one event file per command
    assert resumed.keys() == straight.keys()
    for tag in straight:
        steps, values = zip(*resumed[tag])
        assert list(steps) == sorted(set(steps)) == [step for step, _ in straight[tag]], tag
        assert list(values) == pytest.approx([value for _, value in straight[tag]], rel=1e-5, abs=1e-7), tag


def test_no_tensorboard_writes_no_event_file(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(main_py, "train_one_epoch", lambda *args, **kwargs: {"loss": 1.0})
    run_main(tiny_flags(synthetic_root, tmp_path, "--epochs", "1", "--no_tensorboard", "--no_plots"))
    assert (tmp_path / "log.txt").exists() and not (tmp_path / "tensorboard").exists()


# ---------------------------------------------------------------------------------------------- best checkpoint


def scripted_box_ap(monkeypatch, values):
    """Skip training and make each evaluation report the next of `values` as its box AP (the rest as measured),
    so that the best epoch is known in advance."""
    monkeypatch.setattr(main_py, "train_one_epoch", lambda *args, **kwargs: {"loss": 1.0})
    remaining = list(values)

    def evaluate(*args, **kwargs):
        stats, coco_evaluator = engine.evaluate(*args, **kwargs)
        stats["coco_eval_bbox"] = [remaining.pop(0)] + stats["coco_eval_bbox"][1:]
        return stats, coco_evaluator

    monkeypatch.setattr(main_py, "evaluate", evaluate)


def test_checkpoint_best_holds_the_epoch_of_the_highest_ap_also_after_a_resume(synthetic_root, tmp_path, monkeypatch):
    flags = tiny_flags(synthetic_root, tmp_path, "--no_plots", "--no_tensorboard", "--auto_resume")
    scripted_box_ap(monkeypatch, [0.1, 0.3])
    _, printed = run_main([*flags, "--epochs", "2"])
    assert (
        f"Epoch 1: test_coco_eval_bbox[0] 0.3000, the best so far: saved {tmp_path / 'checkpoint_best.pth'}" in printed
    )
    # Epochs 2 and 3 are worse than epoch 1: a resumed run that forgot the best would take epoch 2.
    scripted_box_ap(monkeypatch, [0.2, 0.25])
    _, printed = run_main([*flags, "--epochs", "4"])
    assert "the best so far" not in printed and "Best epoch: 1 (test_coco_eval_bbox[0] 0.3000)" in printed
    log = read_log(tmp_path / "log.txt")
    aps = [row["test_coco_eval_bbox"][0] for row in log]
    assert aps == [0.1, 0.3, 0.2, 0.25]
    best = load_checkpoint_safely(tmp_path / "checkpoint_best.pth")
    assert best["epoch"] == aps.index(max(aps)) == 1
    assert best["best"] == {"metric": "test_coco_eval_bbox[0]", "value": 0.3, "epoch": 1}
    assert load_checkpoint_safely(tmp_path / "checkpoint.pth")["best"] == best["best"]
    assert {"model", "optimizer", "lr_scheduler", "args"} <= best.keys()


def test_a_best_epoch_saved_in_checkpoint_pth_only_is_written_when_resumed(synthetic_root, tmp_path, monkeypatch):
    # As a run killed between checkpoint.pth and checkpoint_best.pth of its best epoch leaves it.
    flags = tiny_flags(synthetic_root, tmp_path, "--no_plots", "--no_tensorboard", "--auto_resume")
    scripted_box_ap(monkeypatch, [0.1, 0.3])
    run_main([*flags, "--epochs", "2"])
    (tmp_path / "checkpoint_best.pth").unlink()
    scripted_box_ap(monkeypatch, [0.2])
    run_main([*flags, "--epochs", "3"])
    assert load_checkpoint_safely(tmp_path / "checkpoint_best.pth")["best"]["epoch"] == 1


def test_best_metric_picks_another_stat_lower_being_better_for_losses(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(main_py, "train_one_epoch", lambda *args, **kwargs: {"loss": 1.0})
    losses = iter([2.0, 1.5, 1.7])

    def evaluate(*args, **kwargs):
        stats, coco_evaluator = engine.evaluate(*args, **kwargs)
        return {**stats, "loss": next(losses, 1.0)}, coco_evaluator

    monkeypatch.setattr(main_py, "evaluate", evaluate)
    run_main(
        tiny_flags(
            synthetic_root, tmp_path, "--no_plots", "--no_tensorboard", "--epochs", "3", "--best_metric", "test_loss"
        )
    )
    assert load_checkpoint_safely(tmp_path / "checkpoint_best.pth")["best"] == {
        "metric": "test_loss",
        "value": 1.5,
        "epoch": 1,
    }
    with pytest.raises(SystemExit, match=r"--best_metric test_nothing: log.txt has no key 'test_nothing'"):
        run_main(
            tiny_flags(
                synthetic_root, tmp_path / "other", "--no_plots", "--epochs", "1", "--best_metric", "test_nothing"
            )
        )
    with pytest.raises(SystemExit, match=r"--best_metric 'AP\(0\)': expected 'auto' or a stat of log.txt"):
        run_main(tiny_flags(synthetic_root, tmp_path / "other", "--best_metric", "AP(0)"))


def test_checkpoint_best_loads_with_resume_eval_the_hub_and_the_tools(
    straight_run, synthetic_root, tmp_path, monkeypatch
):
    from tools.detector import load_detector

    path = straight_run / "checkpoint_best.pth"
    best = load_checkpoint_safely(path)
    log = read_log(straight_run / "log.txt")
    aps = [row["test_coco_eval_bbox"][0] for row in log]
    assert best["epoch"] == aps.index(max(aps)) and best["best"]["value"] == max(aps)

    # --eval reproduces that epoch's logged evaluation, and writes the per-class results.
    stats, printed = run_main(tiny_flags(synthetic_root, tmp_path, "--eval", "--resume", str(path)))
    row = log[best["epoch"]]
    assert stats["coco_eval_bbox"] == pytest.approx(row["test_coco_eval_bbox"], abs=1e-12)
    assert stats["loss"] == pytest.approx(row["test_loss"], rel=1e-6)
    per_class = json.loads((tmp_path / "eval" / "per_class.json").read_text())
    assert per_class["epoch"] == best["epoch"]
    assert [r["name"] for r in per_class["bbox"]] == ["circle", "square", "triangle", "star", "cross"]
    assert (tmp_path / "per_class.png").read_bytes().startswith(b"\x89PNG")
    assert printed.splitlines()[-1].startswith("cross ")  # the table, last

    # --resume continues training from the epoch after the best one, with its weights.
    seen = {}

    def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, *args, **kwargs):
        seen.setdefault("epoch", epoch)
        seen.setdefault("state", {k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": 1.0}

    monkeypatch.setattr(main_py, "train_one_epoch", train_one_epoch)
    run_main(
        tiny_flags(
            synthetic_root,
            tmp_path / "resumed",
            "--epochs",
            str(best["epoch"] + 2),
            "--resume",
            str(path),
            "--no_plots",
        )
    )
    assert seen["epoch"] == best["epoch"] + 1
    assert all(torch.equal(seen["state"][k], v) for k, v in best["model"].items())

    # torch.hub's pretrained= path and the tools' --resume.
    model, _, _ = build_model(best["args"])
    hubconf._load_pretrained(model, "detr_resnet50", str(path))
    detector = load_detector(resume=str(path))
    for k, v in best["model"].items():
        assert torch.equal(model.state_dict()[k], v) and torch.equal(detector.model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- --eval_batching

# (width, height) of the images: four sizes after the resize below (shorter side 48, longer side at most 96).
MIXED_SIZES = [(96, 64), (64, 96), (80, 64), (96, 64), (64, 64), (64, 96), (80, 64), (96, 64)]


@pytest.fixture(scope="module")
def mixed_size_coco(tmp_path_factory):
    """A COCO-layout val set of noise images of mixed sizes, each with one large box (which a random DETR's
    central boxes sometimes hit: AP above 0 that moves with the model's features), read back with a small
    deterministic val resize."""
    from PIL import Image

    from datasets import transforms as T
    from datasets.coco import IMAGENET_MEAN, IMAGENET_STD, CocoDetection

    root = tmp_path_factory.mktemp("mixed_sizes")
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (w, h) in enumerate(MIXED_SIZES, 1):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "val2017" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
        bw, bh = rng.uniform(0.4, 0.8) * w, rng.uniform(0.4, 0.8) * h
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": int(rng.integers(1, 3)),
                "bbox": [x, y, bw, bh],
                "area": bw * bh,
                "iscrowd": 0,
            }
        )
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            }
        )
    )
    transforms = T.Compose([T.RandomResize([48], max_size=96), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return CocoDetection(root / "val2017", ann_file, transforms, return_masks=False)


def test_the_loaders_pin_their_batches_on_a_gpu(synthetic_root, monkeypatch):
    args = main_py.parse_args(tiny_flags(synthetic_root))
    args.distributed = False
    train, val = (datasets.build_dataset(image_set, args) for image_set in ("train", "val"))
    assert not any(loader.pin_memory for loader in build_loaders(train, val, args)[::2])  # on the CPU

    # A CUDA device, as the loaders see it. Where this torch has none, pinning is recorded instead of done (it needs
    # the CUDA driver) and the batch holds the stand-in's outputs.
    args.device = "cuda"
    pinned = []
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        if hasattr(torch, "accelerator"):  # what DataLoader asks
            monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
            monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))

        def pin_memory(self, *args, **kwargs):
            pinned.append(self.clone())
            return pinned[-1]

        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **k: any(self is p for p in pinned))
    train_loader, _, val_loader = build_loaders(train, val, args)
    for loader in (train_loader, val_loader):
        assert loader.pin_memory
        samples, targets = next(iter(loader))
        assert samples.tensors.is_pinned() and samples.mask.is_pinned()
        assert all(value.is_pinned() for target in targets for value in target.values())
        assert samples.tensors.shape[0] == args.batch_size  # the batch itself


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(), ("--dilation",)], ids=["R50", "DC5"])
def test_eval_batching_size_gives_the_ap_of_batch_size_1_at_any_batch_size(layout, mixed_size_coco):
    from helpers import tiny_args

    args = tiny_args("--backbone", "resnet50", "--num_queries", "10", "--num_workers", "0", *layout)
    args.num_classes, args.distributed = 3, False
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    ground_truth = datasets.get_coco_api_from_dataset(mixed_size_coco)

    def box_ap(eval_batching, batch_size):
        args.eval_batching, args.batch_size = eval_batching, batch_size
        _, _, loader = build_loaders(None, mixed_size_coco, args)
        if eval_batching == "size":  # no batch holds two sizes, so nothing is padded
            assert all(len({tuple(mixed_size_coco[i][0].shape) for i in batch}) == 1 for batch in loader.batch_sampler)
        stats, _ = engine.evaluate(model, criterion, postprocessors, loader, ground_truth, torch.device("cpu"), "")
        return stats["coco_eval_bbox"]

    alone = box_ap("padded", 1)  # batches of one image: nothing to pad either way
    assert alone[1] > 0  # AP50: the boxes found move with the features, so padding shows
    for batch_size in (2, 8):
        assert box_ap("size", batch_size) == pytest.approx(alone, abs=1e-4), batch_size
    padded = [box_ap("padded", batch_size) for batch_size in (2, 8)]
    assert any(max(abs(a - b) for a, b in zip(ap, alone)) > 1e-3 for ap in padded), padded


# (width, height) of the val images of `mixed_aspect_synthetic`: the 48x48 synthetic images, stretched.
STRETCHED = [(72, 48), (48, 72), (48, 48), (72, 48), (60, 48), (48, 72)]


@pytest.fixture(scope="module")
def mixed_aspect_synthetic(tmp_path_factory):
    """A synthetic dataset (COCO layout, instances and panoptic) whose val images are stretched to STRETCHED, their
    annotations with them: data that every --dataset_file of datasets.DATASETS reads, in mixed aspect ratios."""
    from PIL import Image

    from datasets import synthetic

    root = synthetic.generate(tmp_path_factory.mktemp("mixed_aspect") / "data", num_train=2, num_val=6, image_size=48)

    def stretch(values, sx, sy):  # x, y, x, y, ...
        return [v * (sy if i % 2 else sx) for i, v in enumerate(values)]

    for kind in ("instances", "panoptic"):
        ann_file = root / "annotations" / f"{kind}_val2017.json"
        data = json.loads(ann_file.read_text())
        scales = {}
        for record, (width, height) in zip(data["images"], STRETCHED):
            scales[record["id"]] = (width / record["width"], height / record["height"])
            record["width"], record["height"] = width, height
            if kind == "instances":  # each image once
                stem = record["file_name"][: -len(".jpg")]
                for path, resample in ((root / "val2017" / f"{stem}.jpg", Image.BILINEAR),
                                       (root / "panoptic_val2017" / f"{stem}.png", Image.NEAREST)):  # fmt: skip
                    Image.open(path).resize((width, height), resample).save(path)
        if kind == "instances":
            objects = [(ann, scales[ann["image_id"]]) for ann in data["annotations"]]
        else:
            objects = [(seg, scales[ann["image_id"]]) for ann in data["annotations"] for seg in ann["segments_info"]]
        for obj, (sx, sy) in objects:
            obj["bbox"], obj["area"] = stretch(obj["bbox"], sx, sy), obj["area"] * sx * sy
            if "segmentation" in obj:
                obj["segmentation"] = [stretch(polygon, sx, sy) for polygon in obj["segmentation"]]
        if kind == "instances":  # and one large central box per image, which a random DETR's boxes sometimes hit
            for k, record in enumerate(data["images"]):
                w, h = record["width"], record["height"]
                x0, y0, x1, y1 = 0.2 * w, 0.25 * h, 0.85 * w, 0.8 * h
                data["annotations"].append(
                    {"id": 1000 + k, "image_id": record["id"], "category_id": 1 + k % 5, "iscrowd": 0,
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
                )  # fmt: skip
        ann_file.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("dataset_file", datasets.DATASET_FILES)
def test_eval_batching_size_gives_the_stats_of_batch_size_1_on_every_dataset(
    dataset_file, mixed_aspect_synthetic, tmp_path
):
    root = str(mixed_aspect_synthetic)
    flags = tiny_flags(mixed_aspect_synthetic, tmp_path, "--coco_path", root, "--coco_panoptic_path", root)
    flags[flags.index("--dataset_file") + 1] = dataset_file
    # A quarter-width ResNet: COCO's val transform scales these images up to a shorter side of 800. 100 queries: some
    # of a random model's boxes hit the large central ones.
    model_flags = ["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_width", "0.25"]
    model_flags += ["--num_queries", "100", "--num_classes", "9"]
    args = main_py.parse_args(flags + model_flags + ["--eval", "--eval_batching", "size"])
    args.distributed = False
    _, dataset_val, base_ds, args = main_py.build_datasets(args, torch.device("cpu"))
    sizes = datasets.transformed_image_sizes(dataset_val)
    assert len(set(sizes)) == 4  # mixed aspect ratios, after the dataset's own val transform
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    stats = {}
    for batch_size in (1, 4):
        args.batch_size = batch_size
        _, _, loader = build_loaders(None, dataset_val, args)
        batches = list(loader.batch_sampler)
        assert all(len({sizes[i] for i in batch}) == 1 for batch in batches)
        assert max(len(batch) for batch in batches) == (2 if batch_size == 4 else 1)  # same-size images batched
        result, _ = engine.evaluate(model, criterion, postprocessors, loader, base_ds, torch.device("cpu"), "")
        stats[batch_size] = result["coco_eval_bbox"]
    assert len(stats[1]) == 12 and stats[1][1] > 0  # AP50: the boxes found move with the features, padding would show
    assert stats[4] == pytest.approx(stats[1], rel=1e-3, abs=1e-6)


def test_eval_batching_size_needs_a_fixed_val_size(synthetic_root, tmp_path, monkeypatch):
    from datasets import transforms as T

    # The training transforms pick a scale at random: no size can be known in advance.
    monkeypatch.setattr(
        datasets.synthetic,
        "make_synthetic_transforms",
        lambda image_set, image_size: T.Compose([T.RandomResize([48, 64]), T.ToTensor()]),
    )
    with pytest.raises(
        SystemExit,
        match=r"--eval_batching size: cannot tell the val images' sizes \(RandomResize "
        r"with 2 sizes picks one at random",
    ):
        run_main(tiny_flags(synthetic_root, tmp_path, "--eval", "--eval_batching", "size"))


# ---------------------------------------------------------------------------------------------- resuming


def test_resuming_continues_exactly_as_an_uninterrupted_run(straight_run, resumed_run):
    straight, resumed = read_log(straight_run / "log.txt"), read_log(resumed_run / "log.txt")
    assert [row["epoch"] for row in resumed] == [0, 1, 2, 3]
    assert_same_logs(straight, resumed)
    a = load_checkpoint_safely(straight_run / "checkpoint.pth")
    b = load_checkpoint_safely(resumed_run / "checkpoint.pth")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(state_a["exp_avg_sq"], state_b["exp_avg_sq"], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_resuming_with_a_data_loader_worker_continues_exactly(synthetic_root, tmp_path):
    # With workers, the augmentations are drawn in another process, seeded from torch's generator here.
    flags = ("--num_workers", "1", "--no_plots", *RESUME_FLAGS)
    run_main(tiny_flags(synthetic_root, tmp_path / "straight", "--epochs", "3", *flags))
    run_main(tiny_flags(synthetic_root, tmp_path / "resumed", "--epochs", "1", *flags))
    run_main(
        tiny_flags(
            synthetic_root,
            tmp_path / "resumed",
            "--epochs",
            "3",
            *flags,
            "--resume",
            str(tmp_path / "resumed" / "checkpoint.pth"),
        )
    )
    assert_same_logs(read_log(tmp_path / "straight" / "log.txt"), read_log(tmp_path / "resumed" / "log.txt"))
    a = load_checkpoint_safely(tmp_path / "straight" / "checkpoint.pth")["model"]
    b = load_checkpoint_safely(tmp_path / "resumed" / "checkpoint.pth")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def same_rng_state(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["torch"], b["torch"])
        and a["python"] == b["python"]
        and torch.equal(a["numpy"][1], b["numpy"][1])
        and a["numpy"][2:] == b["numpy"][2:]
    )


@pytest.mark.slow
def test_each_epoch_starts_where_the_previous_evaluation_left_the_generators(synthetic_root, tmp_path, monkeypatch):
    """The original's sequence of random draws: epoch k starts from the generators as epoch k-1's evaluation
    left them (nothing restored in between), and the pictures, which the original does not draw, draw nothing
    from them: with and without --no_plots the states, the logs and the weights are the same."""
    real_train, real_evaluate = main_py.train_one_epoch, main_py.evaluate
    runs = {}
    for plots in (True, False):
        states = []

        def train(*args, states=states, **kwargs):
            states.append(("train starts", rng_state()))
            result = real_train(*args, **kwargs)
            states.append(("train ends", rng_state()))
            return result

        def evaluate(*args, states=states, **kwargs):
            result = real_evaluate(*args, **kwargs)
            states.append(("evaluation ends", rng_state()))
            return result

        monkeypatch.setattr(main_py, "train_one_epoch", train)
        monkeypatch.setattr(main_py, "evaluate", evaluate)
        out = tmp_path / f"plots_{plots}"
        run_main(tiny_flags(synthetic_root, out, "--epochs", "3", *(() if plots else ("--no_plots",))))
        assert [name for name, _ in states] == ["train starts", "train ends", "evaluation ends"] * 3
        assert (out / "predictions.png").exists() == plots
        runs[plots] = out, states

    for plots, (out, states) in runs.items():
        for epoch in (1, 2):
            previous_train_end, previous_eval_end = states[3 * epoch - 2][1], states[3 * epoch - 1][1]
            start = states[3 * epoch][1]
            # Evaluation draws (the val loader's base seed), so this is not trivially true.
            assert not same_rng_state(previous_train_end, previous_eval_end)
            assert same_rng_state(start, previous_eval_end), (plots, epoch)
        # The checkpoint holds where the next epoch would start: after the last evaluation.
        saved = load_checkpoint_safely(out / "checkpoint.pth")["rng"]
        assert same_rng_state(saved[0], states[-1][1])
    for (_, a), (_, b) in zip(runs[True][1], runs[False][1]):
        assert same_rng_state(a, b)
    assert (runs[True][0] / "log.txt").read_text() == (runs[False][0] / "log.txt").read_text()
    a = load_checkpoint_safely(runs[True][0] / "checkpoint.pth")["model"]
    b = load_checkpoint_safely(runs[False][0] / "checkpoint.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_hold_the_random_state_of_every_process(resumed_run):
    rng = load_checkpoint_safely(resumed_run / "checkpoint.pth")["rng"]
    assert isinstance(rng, list) and len(rng) == 1
    assert {"torch", "python", "numpy"} <= rng[0].keys()


def test_checkpoints_of_another_process_count_resume_with_fresh_generators(capsys, monkeypatch):
    state = rng_state()
    import util.checkpoint

    monkeypatch.setattr(util.checkpoint, "set_rng_state", lambda s: pytest.fail("restored another process's state"))
    restore_rng_states([state, state])
    assert "random states of 2 process(es) but this run has 1" in capsys.readouterr().out


def test_single_dict_rng_of_older_checkpoints_is_restored():
    import random

    state = rng_state()
    expected = (torch.rand(3), random.random())
    restore_rng_states(state)
    assert (torch.rand(3), random.random()) == (pytest.approx(expected[0]), expected[1])


# ---------------------------------------------------------------------------------------------- saving safely


def crash_while_writing(monkeypatch, name_starts="checkpoint"):
    """Make torch.save write the start of a file whose name starts with `name_starts`, and then fail, as a
    full disk or a killed job would; other files are saved as usual."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if not Path(f).name.startswith(name_starts):
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 only the first bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_a_crash_while_saving_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.save_on_master({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    before = file_digest(path)
    crash_while_writing(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        utils.save_on_master({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)
    assert file_digest(path) == before
    assert load_checkpoint_safely(path)["epoch"] == 0
    assert list(tmp_path.iterdir()) == [path], "the partial temporary file was left behind"


def test_a_full_disk_while_training_saves_a_checkpoint_stops_and_keeps_the_previous_one(
    previous_run, synthetic_root, monkeypatch
):
    checkpoint = previous_run / "checkpoint.pth"
    before = file_digest(checkpoint)
    crash_while_writing(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        run_main(tiny_flags(synthetic_root, previous_run, "--epochs", "3", *RESUME_FLAGS, "--resume", str(checkpoint)))
    message = str(stopped.value.code)  # a message, not 0: the process exits with status 1
    assert f"could not write checkpoint {checkpoint}" in message and "No space left on device" in message
    assert f"the previous {checkpoint} is intact" in message and "--auto_resume" in message
    assert file_digest(checkpoint) == before
    assert load_checkpoint_safely(checkpoint)["epoch"] == 1
    assert not list(previous_run.glob("**/*.tmp*"))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def coco_copy(synthetic_root, tmp_path):
    """A copy of the session's dataset (it has the COCO layout) that a test may damage."""
    root = tmp_path / "coco"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("panoptic*"))
    return root


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if main.py gets as far as training."""

    def train_one_epoch(*args, **kwargs):
        pytest.fail("training started despite bad input")

    monkeypatch.setattr(main_py, "train_one_epoch", train_one_epoch)


@pytest.fixture
def output_with_history(tmp_path):
    """An output folder holding earlier results, which no failing command may change; returns (folder, check)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"an earlier checkpoint")
    (out / "log.txt").write_text('{"epoch": 0}\n')

    def unchanged():
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "log.txt"]
        assert (out / "checkpoint.pth").read_bytes() == b"an earlier checkpoint"
        assert (out / "log.txt").read_text() == '{"epoch": 0}\n'

    return out, unchanged


def coco_flags(root, output_dir, *extra):
    return [
        "--dataset_file",
        "coco",
        "--coco_path",
        str(root),
        "--device",
        "cpu",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_missing_dataset_folder_names_the_flag_and_the_layout(
    tmp_path, no_training, output_with_history, monkeypatch
):
    out, unchanged = output_with_history
    monkeypatch.setattr(main_py, "build_model", lambda args: pytest.fail("model built before the data was checked"))
    with pytest.raises(FileNotFoundError) as error:
        main_py.main(main_py.parse_args(coco_flags(tmp_path / "nowhere", out)))
    message = str(error.value)
    assert "--coco_path" in message and str(tmp_path / "nowhere") in message
    assert "train2017/" in message and "annotations/instances_{train,val}2017.json" in message
    unchanged()


@pytest.mark.parametrize(
    "damage, error, expected",
    [
        (
            lambda root: (root / "annotations" / "instances_train2017.json").write_text('{"images": [{"id": 1,'),
            ValueError,
            ["instances_train2017.json", "not valid JSON"],
        ),
        (
            lambda root: edit_json(root / "annotations" / "instances_val2017.json", lambda d: d.pop("annotations")),
            ValueError,
            ["instances_val2017.json", "'annotations'"],
        ),
        (
            lambda root: edit_json(
                root / "annotations" / "instances_train2017.json",
                lambda d: (
                    d["annotations"][0].update(category_id=9),
                    d["categories"].append({"id": 9, "name": "nine"}),
                ),
            ),
            ValueError,
            ["category id 9", "instances_train2017.json", "--num_classes 6", "--num_classes 10"],
        ),
        (
            lambda root: edit_json(
                root / "annotations" / "instances_train2017.json",
                lambda d: d["annotations"][2].update(category_id=0, id=777),
            ),
            ValueError,
            ["instances_train2017.json", "annotations[2] (id 777) has category_id 0", "'categories'"],
        ),
        (
            lambda root: (root / "train2017" / "000000000005.jpg").unlink(),
            FileNotFoundError,
            ["instances_train2017.json", "missing", "train2017/000000000005.jpg"],
        ),
    ],
    ids=["malformed_json", "missing_key", "category_id_too_large", "category_not_in_categories", "missing_image"],
)
def test_bad_annotations_fail_before_the_model_is_built(
    coco_copy, damage, error, expected, no_training, output_with_history, monkeypatch
):
    out, unchanged = output_with_history
    damage(coco_copy)
    monkeypatch.setattr(main_py, "build_model", lambda args: pytest.fail("model built before the data was checked"))
    with pytest.raises(error) as raised:
        main_py.main(main_py.parse_args(coco_flags(coco_copy, out, "--num_classes", "6")))
    for text in expected:
        assert text in str(raised.value)
    unchanged()


def test_an_image_that_cannot_be_decoded_is_named(coco_copy, previous_run, synthetic_root, monkeypatch):
    broken = coco_copy / "train2017" / "000000000003.jpg"
    broken.write_bytes(b"this is not a JPEG file")
    monkeypatch.setattr(main_py, "build_model", lambda args: pytest.fail("model built before the images were checked"))
    before, log_before = file_digest(previous_run / "checkpoint.pth"), (previous_run / "log.txt").read_text()
    with pytest.raises(OSError) as raised:
        run_main(
            tiny_flags(
                synthetic_root,
                previous_run,
                "--coco_path",
                str(coco_copy),
                "--epochs",
                "3",
                *RESUME_FLAGS,
                "--resume",
                str(previous_run / "checkpoint.pth"),
            )
        )
    assert "cannot decode image" in str(raised.value) and str(broken) in str(raised.value)
    assert file_digest(previous_run / "checkpoint.pth") == before
    assert (previous_run / "log.txt").read_text() == log_before


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--frozen_weights", "box_model.pth"], ["--frozen_weights", "--masks"]),
        (["--resume", "no/such/checkpoint.pth"], ["--resume", "no/such/checkpoint.pth", "no such file"]),
        (["--masks", "--frozen_weights", "no/such/box_model.pth"], ["--frozen_weights", "no/such/box_model.pth"]),
    ],
)
def test_bad_flags_stop_at_once(flags, expected, synthetic_root, no_training, output_with_history, monkeypatch):
    out, unchanged = output_with_history
    monkeypatch.setattr(main_py, "build_dataset", lambda *a, **k: pytest.fail("went on past the flag check"))
    with pytest.raises(SystemExit) as raised:
        main_py.main(main_py.parse_args(tiny_flags(synthetic_root, out, *flags)))
    for text in expected:
        assert text in str(raised.value.code)
    unchanged()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--dec_layers", "3"], ["missing keys", "transformer.decoder.layers.2.linear1.weight"]),
        (["--num_queries", "9"], ["shape mismatches", "query_embed.weight: checkpoint [8, 32] vs model [9, 32]"]),
        (["--num_classes", "8"], ["class_embed.weight: checkpoint [7, 32] vs model [9, 32]", "--finetune"]),
    ],
    ids=["more_decoder_layers", "more_queries", "more_classes"],
)
def test_resuming_a_checkpoint_of_another_architecture_lists_the_keys(
    flags, expected, resumed_run, synthetic_root, no_training, tmp_path
):
    checkpoint = resumed_run / "after_epoch_2.pth"
    before = file_digest(checkpoint)
    with pytest.raises(ValueError) as raised:
        main_py.main(main_py.parse_args(tiny_flags(synthetic_root, tmp_path, *flags, "--resume", str(checkpoint))))
    message = str(raised.value)
    assert f"--resume {checkpoint}" in message
    for text in expected:
        assert text in message
    assert file_digest(checkpoint) == before


def test_a_non_finite_loss_stops_training_with_status_1(previous_run, synthetic_root, monkeypatch, capsys):
    from models.detr import SetCriterion

    loss_labels = SetCriterion.loss_labels

    def nan_loss_labels(self, *args, **kwargs):
        losses = loss_labels(self, *args, **kwargs)
        losses["loss_ce"] = losses["loss_ce"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "loss_labels", nan_loss_labels)
    checkpoint_before = file_digest(previous_run / "checkpoint.pth")
    log_before = (previous_run / "log.txt").read_text()
    with pytest.raises(SystemExit) as raised:
        run_main(
            tiny_flags(
                synthetic_root,
                previous_run,
                "--epochs",
                "4",
                *RESUME_FLAGS,
                "--resume",
                str(previous_run / "checkpoint.pth"),
            )
        )
    assert raised.value.code == 1
    printed = capsys.readouterr().out
    assert "Loss is nan, stopping training" in printed
    assert "'loss_ce': nan" in printed and "'loss_bbox': " in printed and "'loss_giou': " in printed
    assert file_digest(previous_run / "checkpoint.pth") == checkpoint_before
    assert (previous_run / "log.txt").read_text() == log_before


@pytest.mark.parametrize("flags, local_rank", [([], None), (["--local-rank=1"], 1), (["--local_rank", "1"], 1)])
def test_the_local_rank_of_torch_distributed_launch_is_accepted(flags, local_rank, synthetic_root):
    """python -m torch.distributed.launch without --use_env passes --local-rank=N (before torch 2.0 --local_rank)."""
    assert main_py.parse_args(tiny_flags(synthetic_root, "", *flags)).local_rank == local_rank


# ---------------------------------------------------------------------------------------------- device, classes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_main_leaves_the_flags_as_parsed_and_its_checkpoints_record_what_it_decided(synthetic_root, tmp_path):
    flags = tiny_flags(synthetic_root, tmp_path, "--epochs", "1", "--time_budget", "30", "--auto_resume", "--no_plots")
    args = main_py.parse_args(flags)
    parsed = dict(vars(args))
    with contextlib.redirect_stdout(io.StringIO()):
        main_py.main(args)
    assert vars(args) == parsed
    recorded = vars(load_checkpoint_safely(tmp_path / "checkpoint.pth")["args"])
    decided = {
        k: v for k, v in recorded.items() if parsed.get(k, "absent") != v and k not in ("distributed", "rank", "gpu")
    }
    assert decided == {"num_classes": 6, "best_metric": "test_coco_eval_bbox[0]"}  # the data's classes; box AP


def test_device_cuda_without_cuda_runs_on_the_cpu(straight_run, synthetic_root, tmp_path):
    stats, printed = run_main(
        tiny_flags(
            synthetic_root,
            tmp_path,
            "--eval",
            "--device",
            "cuda",
            "--resume",
            str(straight_run / "checkpoint.pth"),
            "--console",
            "original",
        )
    )
    assert "--device cuda: no CUDA device is available here, using the CPU instead" in printed
    assert stats["coco_eval_bbox"] == pytest.approx(read_log(straight_run / "log.txt")[-1]["test_coco_eval_bbox"])


def test_num_classes_defaults_to_the_largest_category_id_plus_one(synthetic_root, coco_copy):
    args = main_py.parse_args(tiny_flags(synthetic_root))
    assert args.num_classes is None
    assert datasets.num_classes(args) == 6  # categories 1..5
    edit_json(
        coco_copy / "annotations" / "instances_train2017.json",
        lambda d: d["categories"].append({"id": 11, "name": "hexagon", "supercategory": "shape"}),
    )
    assert datasets.num_classes(main_py.parse_args(tiny_flags(coco_copy, "", "--coco_path", str(coco_copy)))) == 12
    assert main_py.parse_args(tiny_flags(synthetic_root, "", "--num_classes", "20")).num_classes == 20


def test_finetune_reinitializes_only_the_class_head(resumed_run, synthetic_root, tmp_path, monkeypatch):
    evaluated = []
    real_evaluate = main_py.evaluate

    def evaluate(model, *args, **kwargs):
        evaluated.append(model)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(main_py, "evaluate", evaluate)
    checkpoint = resumed_run / "after_epoch_2.pth"
    flags = tiny_flags(synthetic_root, tmp_path, "--num_classes", "9")
    _, printed = run_main(flags + ["--eval", "--finetune", str(checkpoint)])
    assert (
        f"Loaded --finetune {checkpoint}; re-initialized because their shapes differ: "
        "class_embed.weight: checkpoint [7, 32] vs model [10, 32]; class_embed.bias: checkpoint [7] vs model [10]"
        in printed
    )
    (model,) = evaluated
    loaded, state = load_checkpoint_safely(checkpoint)["model"], model.state_dict()
    assert state.keys() == loaded.keys()
    for k in state:
        if not k.startswith("class_embed."):
            assert torch.equal(state[k], loaded[k]), k
    # The new head is the one a fresh model of this seed starts with.
    torch.manual_seed(42)
    fresh, _, _ = build_model(main_py.parse_args(flags + ["--num_classes", "9"]))
    assert torch.equal(state["class_embed.weight"], fresh.state_dict()["class_embed.weight"])
    assert state["class_embed.bias"].shape == (10,)


def test_flags_given_win_over_the_synthetic_defaults_even_abbreviated():
    args = main_py.parse_args(["--dataset_file", "synthetic", "--epoch", "5", "--lr_backbone=0", "--no_aux_loss"])
    assert (args.epochs, args.lr_backbone, args.aux_loss) == (5, 0.0, False)
    assert args.lr == datasets.recipe("synthetic")["lr"] == 1e-3 and args.backbone == "resnet18"
    assert args.two_stage and args.feature_stride == 8 and args.synthetic_train_size == 3200
    panoptic = main_py.parse_args(["--dataset_file", "synthetic_panoptic"])
    assert panoptic.two_stage and panoptic.learned_queries == 5 and panoptic.dec_layers == 2 and panoptic.lr == 1e-3
    assert panoptic.synthetic_train_size == 3200 and panoptic.output_dir == "outputs/panoptic/boxes"
    assert panoptic.mask_attention_gain == 1.0 and panoptic.panoptic_threshold == 0.85
    # The mask stage adds its own; the box stage's architecture flags stay, so its checkpoint fits.
    masks = main_py.parse_args(["--dataset_file", "synthetic_panoptic", "--masks", "--lr", "1e-4"])
    assert (masks.mask_attention_gain, masks.panoptic_threshold, masks.epochs, masks.lr) == (100.0, 0.5, 2, 1e-4)
    assert masks.learned_queries == 5 and masks.output_dir == "outputs/panoptic/masks"
    assert architecture_differences(panoptic, masks) == ["--masks: checkpoint False, this run True"]
    # The original's queries on request: no learned-query split then.
    original = main_py.parse_args(["--dataset_file", "synthetic_panoptic", "--no_two_stage"])
    assert not original.two_stage and original.learned_queries == 0
    assert main_py.parse_args([]).epochs == 300  # COCO keeps the original's defaults


def test_the_recipe_of_the_dataset_is_printed_and_written_to_the_output_folder(straight_run, synthetic_root, capsys):
    args = main_py.parse_args(tiny_flags(synthetic_root, straight_run, "--epochs", "4", *RESUME_FLAGS))
    recipe = datasets.recipe("synthetic", reduced_precision=automatic_choice_is_reduced("cpu"))
    written = json.loads((straight_run / "recipe.json").read_text())
    assert (written["dataset_file"], written["defined_in"]) == ("synthetic", "datasets/synthetic.py")
    assert list(written["flags"]) == list(recipe)  # the recipe's flags only, with this run's values
    assert written["flags"] == {name: getattr(args, name) for name in recipe}
    assert written["flags"]["backbone"] == recipe["backbone"] == "resnet18" and written["flags"]["epochs"] == 4
    replaced = written["recipe_values_replaced_by_flags_given"]
    assert replaced == {name: value for name, value in recipe.items() if getattr(args, name) != value}
    assert replaced["hidden_dim"] == 128 and "backbone" not in replaced
    assert datasets.show_recipe(args, "cpu") == written
    printed = capsys.readouterr().out
    assert printed.startswith("Recipe of --dataset_file synthetic (datasets/synthetic.py; flags given win): ")
    assert " backbone=resnet18 " in printed and " hidden_dim=32 (recipe 128) " in printed
    assert f" epochs=4 (recipe {recipe['epochs']}) " in printed
    assert datasets.show_recipe(main_py.parse_args(["--device", "cpu"]), "cpu") is None  # COCO: the original's defaults
    assert capsys.readouterr().out == ""


def test_help_strings_are_one_or_two_lines():
    # The reasons behind a flag are in docs/flags.md; --help says what it does.
    long = {a.dest: len(a.help) for a in main_py.get_args_parser()._actions if a.help and len(a.help) > 200}
    assert long == {}


def test_help_shows_the_defaults_of_the_dataset_named(capsys):
    with pytest.raises(SystemExit):
        main_py.parse_args(["--dataset_file", "synthetic", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--backbone BACKBONE Name of the convolutional backbone to use (default: resnet18)" in shown
    assert "--dataset_file synthetic sets these defaults" in shown and "--lr 0.001" in shown
    with pytest.raises(SystemExit):
        main_py.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: resnet50)" in shown and "add --help after it to see them" in shown


def test_the_exact_path_is_the_default_and_fast_is_one_flag_away():
    # A run with the original's flags must draw and round as the original does, step after step: the fast path
    # is within rounding of it per step, but Adam magnifies rounding over a run.
    assert main_py.parse_args([]).fast is False
    assert main_py.parse_args(["--dataset_file", "coco_panoptic"]).fast is False
    assert main_py.parse_args(["--fast"]).fast is True
    # The embedded demos have no original run to match: they take the fast path, and --exact undoes it.
    assert main_py.parse_args(["--dataset_file", "synthetic"]).fast is True
    assert main_py.parse_args(["--dataset_file", "synthetic_panoptic", "--masks"]).fast is True
    assert main_py.parse_args(["--dataset_file", "synthetic", "--exact"]).fast is False
    assert main_py.parse_args(["--dataset_file", "synthetic", "--fast", "--exact"]).fast is False


# ---------------------------------------------------------------------------------------------- --time_budget


def test_linear_and_cosine_schedules_decay_to_the_end_and_resume_where_they_were():
    def rates(kind, epochs, resume_after=None):
        parameter = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.AdamW([{"params": [parameter]}, {"params": [torch.zeros(1)], "lr": 0.1}], lr=1.0)
        scheduler, seen = utils.EpochDecay(optimizer, kind, epochs), []
        for epoch in range(epochs):
            seen.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
            if epoch == resume_after:  # through a checkpoint: a new optimizer and scheduler load the states
                state = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}
                optimizer = torch.optim.AdamW([{"params": [parameter]}, {"params": [torch.zeros(1)]}], lr=1.0)
                scheduler = utils.EpochDecay(optimizer, kind, 99)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["lr_scheduler"])
        return seen

    linear = rates("linear", 4)
    np.testing.assert_allclose(linear, [[1.0, 0.1], [0.75, 0.075], [0.5, 0.05], [0.25, 0.025]], rtol=1e-12)
    cosine = rates("cosine", 4)
    expected = [[c, c / 10] for c in (1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2)]
    np.testing.assert_allclose(cosine, expected, rtol=1e-12)
    assert rates("linear", 4, resume_after=1) == linear and rates("cosine", 4, resume_after=0) == cosine
    with pytest.raises(ValueError, match="--lr_schedule 'exp'"):
        utils.EpochDecay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "exp", 4)
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        main_py.parse_args(["--lr_schedule", "exp"])
    assert main_py.parse_args([]).lr_schedule == "step"  # the original's


def test_a_linear_schedule_run_logs_its_decay_and_resumes_exactly(synthetic_root, tmp_path):
    # --lr_drop 1 would keep a copy after every epoch under the step schedule; a decay has no drop to keep one for.
    flags = ("--no_plots", "--lr_drop", "1", "--lr_schedule", "linear", "--epochs", "3")
    run_main(tiny_flags(synthetic_root, tmp_path / "straight", *flags))
    run_main(tiny_flags(synthetic_root, tmp_path / "resumed", *flags[:-1], "1"))
    run_main(
        tiny_flags(
            synthetic_root, tmp_path / "resumed", *flags, "--resume", str(tmp_path / "resumed" / "checkpoint.pth")
        )
    )
    straight, resumed = read_log(tmp_path / "straight" / "log.txt"), read_log(tmp_path / "resumed" / "log.txt")
    lr = main_py.parse_args(tiny_flags(synthetic_root)).lr
    assert [row["train_lr"] for row in straight] == pytest.approx([lr, lr * 2 / 3, lr / 3])
    assert [row["train_loss"] for row in resumed] == [row["train_loss"] for row in straight]
    assert not list((tmp_path / "straight").glob("checkpoint0*.pth"))  # no drop, so no copy before one


def test_a_run_stops_at_its_time_budget_and_resumes_with_the_schedule_it_fitted(synthetic_root, tmp_path):
    # A budget of 0.6 s: the first epoch takes longer, so the run ends after it, with the schedule it fitted saved.
    flags = ("--no_plots", "--time_budget", "0.01")
    _, printed = run_main(tiny_flags(synthetic_root, tmp_path, "--epochs", "5", *flags))
    assert "--time_budget 0.01 min: " in printed and "so 1 of 5 epochs" in printed
    assert [row["epoch"] for row in read_log(tmp_path / "log.txt")] == [0]
    checkpoint = load_checkpoint_safely(tmp_path / "checkpoint.pth")
    assert checkpoint["args"].epochs == 1 and checkpoint["time_spent_s"] > 0.6
    # Resumed with the same command: nothing is left to train.
    _, printed = run_main(tiny_flags(synthetic_root, tmp_path, "--epochs", "5", *flags, "--auto_resume"))
    assert [row["epoch"] for row in read_log(tmp_path / "log.txt")] == [0]
    assert "so 1 of 5 epochs" in printed  # the resumed run measured the budget as spent before training
