"""d2/: the detectron2 wrapper against this project's own model, data pipeline and main.py.

The converter's key map over the published state_dicts (tests/data/spec), the wrapper's outputs against
models.build_model's on the same weights, the dataset mapper against datasets/transforms.py under the same random
draws, d2/train_net.py training (loss going down, a checkpoint that resumes) and its --eval-only against
main.py --eval on the same checkpoint, and the original d2/README's commands as written.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed: pip install a detectron2 wheel (or build it from source) to test d2/",
)

from helpers import MASK_HEAD_FLAGS, MASK_HEAD_SIZES, REPO_ROOT, SPEC_DIR, TINY_SIZES, run_main, tiny_args, tiny_flags

sys.path.insert(0, str(REPO_ROOT / "d2"))

import converter
import train_net
from detectron2.config import get_cfg
from detectron2.data.datasets import load_coco_json
from detr import Detr, DetrDatasetMapper, add_detr_config

import datasets.synthetic
import main as main_py
from datasets.coco import CocoDetection, IMAGENET_MEAN, IMAGENET_STD, make_coco_transforms
from models import build_model
from util.box_ops import box_xyxy_to_cxcywh
from util.checkpoint import compare_state_dict, load_checkpoint, model_state_from

CONFIGS = REPO_ROOT / "d2" / "configs"
SYNTHETIC_CLASSES = [1, 2, 3, 4, 5]  # the synthetic dataset's category ids; detectron2's classes 0-4
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)

# The wrapper's counterpart of helpers.tiny_flags: ResNet-18, the tiny sizes (helpers.TINY_SIZES), 8 queries, the 5
# synthetic classes, 64-pixel images.
TINY_OPTS = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.DEVICE",
    "cpu",
    "MODEL.RESNETS.DEPTH",
    18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    64,
    "MODEL.DETR.NUM_CLASSES",
    5,
    "MODEL.DETR.HIDDEN_DIM",
    TINY_SIZES["hidden_dim"],
    "MODEL.DETR.NHEADS",
    TINY_SIZES["nheads"],
    "MODEL.DETR.ENC_LAYERS",
    TINY_SIZES["enc_layers"],
    "MODEL.DETR.DEC_LAYERS",
    TINY_SIZES["dec_layers"],
    "MODEL.DETR.DIM_FEEDFORWARD",
    TINY_SIZES["dim_feedforward"],
    "MODEL.DETR.NUM_OBJECT_QUERIES",
    8,
    "MODEL.DETR.DROPOUT",
    TINY_SIZES["dropout"],
    "INPUT.MIN_SIZE_TRAIN",
    (48, 56, 64, 72),
    "INPUT.MIN_SIZE_TEST",
    64,
    "DATALOADER.NUM_WORKERS",
    0,
]


def tiny_cfg(*opts, config: str = "detr_256_6_6_torchvision.yaml"):
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list([str(o) if not isinstance(o, (tuple, list)) else o for o in TINY_OPTS + list(opts)])
    return cfg


def spec_state(name: str):
    """The keys of a published DETR checkpoint (tests/data/spec/state_dict_detr_NAME.tsv) as meta tensors."""
    path = SPEC_DIR / f"state_dict_detr_{name}.tsv"
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]
    return {key: torch.empty(json.loads(shape), device="meta") for key, shape, _ in rows}


@pytest.mark.parametrize(
    "name, opts",
    [
        ("resnet50", ["MODEL.RESNETS.DEPTH", 50]),
        ("resnet101", ["MODEL.RESNETS.DEPTH", 101]),
        (
            "resnet50_panoptic",
            [
                "MODEL.RESNETS.DEPTH",
                50,
                "MODEL.MASK_ON",
                True,
                "MODEL.RESNETS.OUT_FEATURES",
                ["res2", "res3", "res4", "res5"],
            ],
        ),
    ],
)
def test_converter_covers_every_key_of_the_published_checkpoints(name, opts):
    state = spec_state(name)
    converted = converter.convert_state_dict(state, converter.COCO_CATEGORY_IDS)
    assert len(converted) == len(state)
    # The published architecture, 80 COCO classes; built on the meta device (shapes only, no memory).
    cfg = tiny_cfg(
        *opts,
        "MODEL.DEVICE",
        "meta",
        "MODEL.DETR.NUM_CLASSES",
        80,
        "MODEL.DETR.HIDDEN_DIM",
        256,
        "MODEL.DETR.NHEADS",
        8,
        "MODEL.DETR.ENC_LAYERS",
        6,
        "MODEL.DETR.DEC_LAYERS",
        6,
        "MODEL.DETR.DIM_FEEDFORWARD",
        2048,
        "MODEL.DETR.NUM_OBJECT_QUERIES",
        100,
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        256,
    )
    with torch.device("meta"):
        model = Detr(cfg)
    assert compare_state_dict(model, converted) == ([], [], [])
    model.load_state_dict(converted, strict=True)
    # Spot checks of the names: the stem, a bottleneck's norm, a shortcut, the 91 + 1 class rows down to 80 + 1.
    prefix = "detr." if name.endswith("panoptic") else ""
    assert (
        converter.convert_key(prefix + "backbone.0.body.bn1.running_var")
        == "detr." + prefix + "backbone.0.backbone.stem.conv1.norm.running_var"
    )
    assert (
        converter.convert_key(prefix + "backbone.0.body.layer3.5.bn2.weight")
        == "detr." + prefix + "backbone.0.backbone.res4.5.conv2.norm.weight"
    )
    assert (
        converter.convert_key(prefix + "backbone.0.body.layer4.0.downsample.1.bias")
        == "detr." + prefix + "backbone.0.backbone.res5.0.shortcut.norm.bias"
    )
    assert converted["detr." + prefix + "class_embed.weight"].shape == (81, 256)


def test_class_head_keeps_the_coco_rows_and_no_object():
    weight = torch.arange(92.0)[:, None].repeat(1, 3)
    out = converter.remap_class_head("class_embed.weight", weight, converter.COCO_CATEGORY_IDS)
    assert out[:, 0].tolist() == [float(i) for i in converter.COCO_CATEGORY_IDS] + [91.0]
    assert len(converter.COCO_CATEGORY_IDS) == len(set(converter.COCO_CATEGORY_IDS)) == 80


@pytest.mark.parametrize(
    "key, expected",
    [
        ("enc_class_embed.weight", "enc_class_embed.weight: a --two_stage head"),
        ("backbone.0.body.fc.weight", "backbone.0.body.fc.weight: not a ResNet layer"),
        ("decoder.layers.0.linear1.weight", "decoder.layers.0.linear1.weight: not a key of this project's DETR"),
    ],
)
def test_converter_refuses_what_it_cannot_convert_naming_the_key(key, expected):
    with pytest.raises(converter.ConversionError, match=expected.replace(".", r"\.")):
        converter.convert_state_dict({key: torch.zeros(1)}, None)


def test_converter_refuses_a_class_head_smaller_than_the_ids(tmp_path):
    source = tmp_path / "small.pth"
    torch.save({"model": {"class_embed.bias": torch.zeros(7)}}, source)
    with pytest.raises(converter.ConversionError, match=r"class_embed\.bias has 7 rows .* --classes"):
        converter.convert_checkpoint(str(source), str(tmp_path / "out.pth"), "coco")


def test_converter_command_names_the_flag_of_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        converter.main(["--source", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "out.pth")])
    assert exit_info.value.code == 1
    assert "--source: checkpoint" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Frozen batch norms start as identities; give them statistics so that the backbone's layers differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var") or name.endswith("weight"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def project_model(*extra: str):
    """models.build_model on main.py's flags for the tiny model (frozen batch norm, as the published models)."""
    args = tiny_args("--num_classes", "6", "--num_queries", "8", *extra)
    torch.manual_seed(0)
    model, _, postprocessors = build_model(args)
    randomize_norms(model)
    # Class 0 is no category of the synthetic data: training never targets it and drives its logit down.
    # The wrapper drops its row, so its probability must be negligible for the scores to agree.
    # A larger class head's weight makes a random model's scores less uniform.
    with torch.no_grad():
        class_embed = (model.detr if hasattr(model, "detr") else model).class_embed
        class_embed.bias[0] = -30.0
        class_embed.weight.mul_(3.0)
    return model.eval(), postprocessors


@pytest.mark.parametrize("masks, feature_stride", [(False, 32), (True, 32), (False, 8)])
def test_converted_model_predicts_what_the_project_model_predicts(masks, feature_stride):
    extra = ["--masks", *MASK_HEAD_FLAGS] if masks else []
    model, postprocessors = project_model(*extra, "--feature_stride", str(feature_stride))
    converted = converter.convert_state_dict(model.state_dict(), SYNTHETIC_CLASSES)
    # main.py's --feature_stride 8 ends the ResNet after layer2: detectron2's res3 as the last feature.
    last = {32: "res5", 8: "res3"}[feature_stride]
    opts = ["MODEL.RESNETS.OUT_FEATURES", [last]]
    if masks:
        opts = [
            "MODEL.MASK_ON",
            True,
            "MODEL.RESNETS.OUT_FEATURES",
            ["res2", "res3", "res4", "res5"],
            "MODEL.DETR.HIDDEN_DIM",
            MASK_HEAD_SIZES["hidden_dim"],
            "MODEL.DETR.NHEADS",
            MASK_HEAD_SIZES["nheads"],
        ]
    wrapper = Detr(tiny_cfg(*opts))
    wrapper.load_state_dict(converted, strict=True)
    wrapper.eval()

    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 64, 80), generator=generator, dtype=torch.uint8),
        torch.randint(0, 256, (3, 72, 56), generator=generator, dtype=torch.uint8),
    ]
    original_sizes = [(96, 120), (90, 70)]  # as if the loader had resized the originals
    with torch.no_grad():
        outputs = wrapper([{"image": im, "height": h, "width": w} for im, (h, w) in zip(images, original_sizes)])
        reference = model([(im.float() / 255 - MEAN) / STD for im in images])
    expected = postprocessors["bbox"](reference, torch.tensor(original_sizes))
    if masks:
        input_sizes = torch.tensor([im.shape[1:] for im in images])
        expected = postprocessors["segm"](expected, reference, torch.tensor(original_sizes), input_sizes)
    for output, exp in zip(outputs, expected):
        instances = output["instances"]
        assert instances.image_size == tuple(exp["masks"].shape[-2:]) if masks else True
        assert torch.allclose(instances.pred_boxes.tensor, exp["boxes"], atol=1e-4, rtol=0)
        assert torch.allclose(instances.scores, exp["scores"], atol=1e-4, rtol=0)
        # Not a uniform guess over the 5 classes and no-object, and boxes that differ per query.
        assert instances.scores.max() > 0.3 and instances.pred_boxes.tensor.std(0).min() > 0.01
        # detectron2's class i is the synthetic category SYNTHETIC_CLASSES[i], main.py's class index its id.
        assert (instances.pred_classes + 1).tolist() == exp["labels"].tolist()
        if masks:
            assert torch.equal(instances.pred_masks, exp["masks"][:, 0].bool())
            assert 0 < instances.pred_masks.float().mean() < 1


def test_mapper_matches_datasets_transforms_under_the_same_draws(synthetic_root):
    """DETR's COCO training augmentation (flip, multi-scale resize to 480-800, the crop branch) both ways."""
    cfg = tiny_cfg(
        "INPUT.MIN_SIZE_TRAIN", (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), "MODEL.MASK_ON", True
    )
    mapper = DetrDatasetMapper(cfg, is_train=True)
    ann_file = synthetic_root / "annotations" / "instances_train2017.json"
    # With a dataset name, category ids become detectron2's contiguous classes, as a registered dataset's do.
    records = load_coco_json(str(ann_file), str(synthetic_root / "train2017"), dataset_name="d2test_mapper")
    dicts = {d["image_id"]: d for d in records}
    dataset = CocoDetection(synthetic_root / "train2017", ann_file, make_coco_transforms("train"), return_masks=True)
    shapes, objects = set(), 0
    for index in range(4):
        for seed in range(4):
            image_id = dataset.ids[index]
            random.seed(seed)
            torch.manual_seed(seed)
            mapped = mapper(dicts[image_id])
            random.seed(seed)
            torch.manual_seed(seed)
            image, target = dataset[index]

            assert mapped["image"].dtype == torch.uint8 and mapped["image"].shape == image.shape
            assert torch.allclose((mapped["image"].float() / 255 - MEAN) / STD, image, atol=1e-5)
            instances = mapped["instances"]
            h, w = instances.image_size
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor) / torch.tensor([w, h, w, h])
            assert torch.allclose(boxes, target["boxes"], atol=1e-5)
            assert (instances.gt_classes + 1).tolist() == target["labels"].tolist()
            assert torch.equal(instances.gt_masks.tensor, target["masks"].bool())
            shapes.add("square" if h == w else "cropped")
            objects += len(instances)
    assert shapes == {"square", "cropped"}  # both branches ran
    assert objects > 20


def test_mapper_resizes_for_evaluation_as_main_py_and_keeps_no_annotations(synthetic_root):
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 80)
    ann_file = synthetic_root / "annotations" / "instances_val2017.json"
    record = load_coco_json(str(ann_file), str(synthetic_root / "val2017"))[0]
    mapped = DetrDatasetMapper(cfg, is_train=False)(record)
    assert mapped["image"].shape == (3, 80, 80) and "annotations" not in mapped and "instances" not in mapped
    assert (mapped["height"], mapped["width"]) == (64, 64)


def train_net_args(synthetic_root, output_dir, *opts, flags=()):
    datasets = []
    for split in ("train", "val"):
        datasets += [
            "--dataset",
            f"d2test_{split}",
            str(synthetic_root / "annotations" / f"instances_{split}2017.json"),
            str(synthetic_root / f"{split}2017"),
        ]
    argv = [
        "--config-file",
        str(CONFIGS / "detr_256_6_6_torchvision.yaml"),
        *flags,
        *datasets,
        *[str(o) for o in TINY_OPTS],
        "DATASETS.TRAIN",
        "('d2test_train',)",
        "DATASETS.TEST",
        "('d2test_val',)",
        "OUTPUT_DIR",
        str(output_dir),
        "SEED",
        "0",
        *[str(o) for o in opts],
    ]
    return train_net.argument_parser().parse_args(argv)


# Training from scratch (no ImageNet weights here), as main.py's synthetic defaults: trainable batch norm, the whole
# backbone at the full learning rate. One image size and no crop, so that the loss falls clearly in a few
# iterations (the mapper's crop branch is tested above).
TRAIN_OPTS = (
    "MODEL.RESNETS.NORM",
    "BN",
    "MODEL.BACKBONE.FREEZE_AT",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "8",
    "SOLVER.BASE_LR",
    "1e-3",
    "SOLVER.BACKBONE_MULTIPLIER",
    "1.0",
    "SOLVER.STEPS",
    "()",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000",
    "TEST.EVAL_PERIOD",
    "0",
    "INPUT.CROP.ENABLED",
    "False",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
)


@pytest.mark.slow
def test_train_net_lowers_the_loss_and_resumes_from_its_checkpoint(synthetic_root, tmp_path):
    args = train_net_args(synthetic_root, tmp_path, *TRAIN_OPTS, "SOLVER.MAX_ITER", "30")
    train_net.register_datasets(args.dataset)
    trainer = train_net.Trainer(train_net.setup(args))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-3]
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [value for value, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 29 and all(k.startswith("detr.") for k in saved["model"])

    # --resume continues from iteration 30 with the saved weights, up to the new MAX_ITER.
    resumed_args = train_net_args(synthetic_root, tmp_path, *TRAIN_OPTS, "SOLVER.MAX_ITER", "33", flags=["--resume"])
    train_net.main(resumed_args)
    logged = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    # Training lines every 20 iterations and at the last; the evaluation after each run has its own line.
    assert [m["iteration"] for m in logged if "total_loss" in m] == [19, 29, 32]
    assert sum("bbox/AP" in m for m in logged) == 2
    assert torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 32


def test_eval_only_gives_main_py_eval_box_ap_on_a_converted_checkpoint(synthetic_root, tmp_path):
    # A main.py checkpoint (2 epochs of the tiny model, trainable batch norm as the synthetic defaults).
    run_main(tiny_flags(synthetic_root, tmp_path / "main", "--epochs", "2", "--no_channels_last", "--no_plots"))
    checkpoint = tmp_path / "main" / "checkpoint.pth"
    stats, _ = run_main(tiny_flags(synthetic_root, "", "--eval", "--resume", str(checkpoint), "--no_channels_last"))
    main_ap = stats["coco_eval_bbox"][0]

    converted = tmp_path / "converted.pth"
    converter.main(
        [
            "--source",
            str(checkpoint),
            "--output",
            str(converted),
            "--classes",
            str(synthetic_root / "annotations" / "instances_train2017.json"),
        ]
    )
    args = train_net_args(
        synthetic_root,
        tmp_path / "d2",
        "MODEL.WEIGHTS",
        converted,
        "MODEL.RESNETS.NORM",
        "BN",
        "MODEL.BACKBONE.FREEZE_AT",
        0,
        flags=["--eval-only"],
    )
    results = train_net.main(args)
    d2_ap = results["bbox"]["AP"] / 100  # detectron2 reports percent
    assert d2_ap == pytest.approx(main_ap, abs=0.01)

    # Beyond the AP (near 0 after 2 epochs): every detection the same, box, score and category, in query order.
    detections = json.loads((tmp_path / "d2" / "inference" / "coco_instances_results.json").read_text())
    main_args = main_py.parse_args(tiny_flags(synthetic_root, "", "--no_channels_last"))
    main_args.num_classes = max(SYNTHETIC_CLASSES) + 1
    model, _, postprocessors = build_model(main_args)
    model.load_state_dict(model_state_from(load_checkpoint(str(checkpoint))))
    model.eval()
    val = datasets.synthetic.build("val", main_args)
    assert len(detections) == len(val) * 8
    for image, target in val:
        with torch.no_grad():
            outputs = model([image])
        # The converted head: the dataset's classes and no-object. main.py's softmax also spreads probability over
        # class 0, which no synthetic object has; after 2 epochs that is still a few percent of every score.
        outputs["pred_logits"] = outputs["pred_logits"][..., SYNTHETIC_CLASSES + [-1]]
        result = postprocessors["bbox"](outputs, target["orig_size"][None])[0]
        ours = [d for d in detections if d["image_id"] == int(target["image_id"])]
        x0, y0, x1, y1 = result["boxes"].unbind(1)
        assert torch.allclose(
            torch.tensor([d["bbox"] for d in ours]), torch.stack([x0, y0, x1 - x0, y1 - y0], 1), atol=1e-3
        )
        assert torch.allclose(torch.tensor([d["score"] for d in ours]), result["scores"], atol=1e-4)
        assert [d["category_id"] for d in ours] == [SYNTHETIC_CLASSES[i] for i in result["labels"].tolist()]


def test_segmentation_config_trains_the_mask_head_on_a_frozen_detector(synthetic_root, tmp_path):
    # The mask head's group norms need hidden_dim + nheads and hidden_dim / 16 in multiples of 8.
    width = (
        "MODEL.DETR.HIDDEN_DIM",
        str(MASK_HEAD_SIZES["hidden_dim"]),
        "MODEL.DETR.NHEADS",
        str(MASK_HEAD_SIZES["nheads"]),
    )
    train_net.main(train_net_args(synthetic_root, tmp_path / "boxes", *TRAIN_OPTS, *width, "SOLVER.MAX_ITER", "2"))
    detector = torch.load(tmp_path / "boxes" / "model_final.pth", map_location="cpu", weights_only=True)["model"]

    args = train_net_args(
        synthetic_root,
        tmp_path / "masks",
        *TRAIN_OPTS,
        *width,
        "SOLVER.MAX_ITER",
        "3",
        "MODEL.DETR.FROZEN_WEIGHTS",
        tmp_path / "boxes" / "model_final.pth",
    )
    args.config_file = str(CONFIGS / "detr_segm_256_6_6_torchvision.yaml")
    train_net.main(args)
    segm = torch.load(tmp_path / "masks" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    # The detector sits under DETRsegm's "detr." and did not move (its batch norms' statistics neither).
    for key, value in detector.items():
        assert torch.equal(segm["detr.detr." + key[len("detr.") :]], value), key
    assert any(k.startswith("detr.mask_head.") for k in segm)
    logged = [json.loads(line) for line in (tmp_path / "masks" / "metrics.json").read_text().splitlines()]
    assert "loss_mask" in logged[0] and "loss_dice" in logged[0]
    assert "segm/AP" in logged[-1] and "bbox/AP" in logged[-1]


def test_imagenet_weights_in_detectron2_names_load_into_the_backbone(tmp_path):
    """MODEL.WEIGHTS as the config's torchvision R-50.pkl is laid out (backbone keys only, detectron2's names,
    name matching on): every backbone tensor finds its place under the wrapper's longer keys."""
    import pickle

    from detectron2.checkpoint import DetectionCheckpointer

    model = Detr(tiny_cfg())
    prefix = "detr.backbone.0.backbone."
    generator = torch.Generator().manual_seed(0)
    weights = {
        k[len(prefix) :]: torch.randn(v.shape, generator=generator).numpy()
        for k, v in model.state_dict().items()
        if k.startswith(prefix)
    }
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "torchvision", "matching_heuristics": True}, f)
    DetectionCheckpointer(model).load(str(tmp_path / "R-18.pkl"))
    state = model.state_dict()
    assert len(weights) > 50
    for key, value in weights.items():
        assert torch.equal(state[prefix + key], torch.from_numpy(value)), key


# The original d2/README's commands, as written (run from d2/, its paths aside), on the tiny model: COCO laid out as
# detectron2's builtin coco_2017_train / coco_2017_val expect it under $DETECTRON2_DATASETS, holding the synthetic
# images with COCO's 80 categories (the synthetic category ids 1-5 are COCO's ids 1-5), so that the configs' own
# DATASETS and NUM_CLASSES 80 stand. Sizes are set on the command line; the mask head's width, so that the trained
# detector can be fine-tuned for masks. No MODEL.DEVICE: detectron2's "cuda" falls back to the CPU.
ORIGINAL_COMMAND_SIZES = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.DETR.HIDDEN_DIM",
    str(MASK_HEAD_SIZES["hidden_dim"]),
    "MODEL.DETR.NHEADS",
    str(MASK_HEAD_SIZES["nheads"]),
    "MODEL.DETR.ENC_LAYERS",
    str(TINY_SIZES["enc_layers"]),
    "MODEL.DETR.DEC_LAYERS",
    str(TINY_SIZES["dec_layers"]),
    "MODEL.DETR.DIM_FEEDFORWARD",
    str(TINY_SIZES["dim_feedforward"]),
    "MODEL.DETR.DROPOUT",
    str(TINY_SIZES["dropout"]),
    "MODEL.DETR.NUM_OBJECT_QUERIES",
    "8",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.CROP.ENABLED",
    "False",
    "DATALOADER.NUM_WORKERS",
    "0",
]


@pytest.fixture(scope="module")
def detectron2_datasets(synthetic_root, tmp_path_factory):
    """A $DETECTRON2_DATASETS folder whose coco/ holds the synthetic images under COCO's 80 categories."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    root = tmp_path_factory.mktemp("detectron2_datasets")
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    things = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
    for split in ("train", "val"):
        annotations = json.loads((synthetic_root / "annotations" / f"instances_{split}2017.json").read_text())
        assert {a["category_id"] for a in annotations["annotations"]} <= {c["id"] for c in things}
        annotations["categories"] = things
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(annotations))
        (coco / f"{split}2017").symlink_to(synthetic_root / f"{split}2017", target_is_directory=True)
    return root


def run_in_d2(datasets_root, *argv: str) -> str:
    """`python ARGV...` from d2/, as the original README runs its commands; returns what it printed. On the CPU
    everywhere (no CUDA device visible), so that --num-gpus N starts N processes here."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, *argv], cwd=REPO_ROOT / "d2", env=env, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output


def test_converter_takes_the_original_flags_and_its_own(tmp_path, capsys):
    model, _ = project_model("--num_classes", "91")
    torch.save({"model": model.state_dict()}, tmp_path / "detr.pth")
    converter.main(["--source_model", str(tmp_path / "detr.pth"), "--output_model", str(tmp_path / "original.pth")])
    converter.main(["--source", str(tmp_path / "detr.pth"), "--output", str(tmp_path / "own.pth")])
    original, own = (torch.load(tmp_path / f"{name}.pth", weights_only=True)["model"] for name in ("original", "own"))
    assert original.keys() == own.keys() and all(torch.equal(original[k], own[k]) for k in own)
    assert original["detr.class_embed.weight"].shape[0] == 81
    with pytest.raises(SystemExit):
        converter.main(["--output_model", str(tmp_path / "out.pth")])
    assert "the following arguments are required: --source/--source_model" in capsys.readouterr().err


def test_config_files_and_keys_of_the_original_load():
    """The original's config names and its MODEL.DETR.L1_WEIGHT (the wrapper's BBOX_WEIGHT), which wins if set."""
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "detr_256_6_6_torchvision.yaml",
        "detr_segm_256_6_6_torchvision.yaml",
    ]
    criterion = Detr(tiny_cfg("MODEL.DETR.L1_WEIGHT", 3.0)).criterion
    assert criterion.weight_dict["loss_bbox"] == criterion.weight_dict["loss_bbox_0"] == 3.0
    assert criterion.matcher.cost_bbox == 3.0
    assert Detr(tiny_cfg()).criterion.weight_dict["loss_bbox"] == 5.0  # BBOX_WEIGHT, when L1_WEIGHT is not set


def test_num_gpus_beyond_the_machine_names_the_flag(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    parser = train_net.argument_parser()
    train_net.check_num_gpus(parser, 2)
    with pytest.raises(SystemExit):
        train_net.check_num_gpus(parser, 8)
    assert "--num-gpus 8: this machine has 2 CUDA device(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_original_readme_converts_then_evaluates_as_written(detectron2_datasets, tmp_path):
    """python converter.py --source_model X --output_model Y, then
    python train_net.py --eval-only --config configs/detr_256_6_6_torchvision.yaml MODEL.WEIGHTS Y."""
    model, _ = project_model("--num_classes", "91", *MASK_HEAD_FLAGS)  # main.py's COCO head: 91 classes
    torch.save({"model": model.state_dict()}, tmp_path / "detr.pth")
    converted = tmp_path / "converted_model.pth"
    run_in_d2(
        detectron2_datasets,
        "converter.py",
        "--source_model",
        str(tmp_path / "detr.pth"),
        "--output_model",
        str(converted),
    )
    weights = torch.load(converted, weights_only=True)["model"]
    expected = converter.convert_state_dict(model.state_dict(), converter.COCO_CATEGORY_IDS)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)

    output = run_in_d2(
        detectron2_datasets,
        "train_net.py",
        "--eval-only",
        "--config",
        "configs/detr_256_6_6_torchvision.yaml",
        "MODEL.WEIGHTS",
        str(converted),
        *ORIGINAL_COMMAND_SIZES,
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
    )
    assert "MODEL.DEVICE cuda: no CUDA device is available here, using the CPU instead" in output
    assert "Evaluation results for coco_2017_val" in output
    detections = json.loads((tmp_path / "eval" / "inference" / "coco_instances_results.json").read_text())

    # The same weights in this process: every detection of the command, in query order.
    cfg = tiny_cfg(*ORIGINAL_COMMAND_SIZES, "MODEL.DETR.NUM_CLASSES", 80)
    wrapper = Detr(cfg).eval()
    wrapper.load_state_dict(weights, strict=True)
    coco = detectron2_datasets / "coco"
    records = load_coco_json(str(coco / "annotations" / "instances_val2017.json"), str(coco / "val2017"))
    mapper = DetrDatasetMapper(cfg, is_train=False)
    assert len(detections) == len(records) * 8
    for record in records:
        with torch.no_grad():
            instances = wrapper([mapper(record)])[0]["instances"]
        ours = [d for d in detections if d["image_id"] == record["image_id"]]
        x0, y0, x1, y1 = instances.pred_boxes.tensor.unbind(1)
        assert torch.allclose(
            torch.tensor([d["bbox"] for d in ours]), torch.stack([x0, y0, x1 - x0, y1 - y0], 1), atol=1e-3
        )
        assert torch.allclose(torch.tensor([d["score"] for d in ours]), instances.scores, atol=1e-4)
        assert [d["category_id"] for d in ours] == [
            converter.COCO_CATEGORY_IDS[i] for i in instances.pred_classes.tolist()
        ]


@pytest.mark.slow
def test_original_readme_trains_then_trains_masks_as_written(detectron2_datasets, tmp_path):
    """python train_net.py --config configs/detr_256_6_6_torchvision.yaml --num-gpus N (2 processes on the CPU),
    then python train_net.py --config configs/detr_segm_256_6_6_torchvision.yaml --num-gpus N
    MODEL.DETR.FROZEN_WEIGHTS <model_path>. MODEL.WEIGHTS "" : the configs' ImageNet ResNet-50 would be downloaded."""
    short = ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "MODEL.WEIGHTS", ""]
    run_in_d2(
        detectron2_datasets,
        "train_net.py",
        "--config",
        "configs/detr_256_6_6_torchvision.yaml",
        "--num-gpus",
        "2",
        *ORIGINAL_COMMAND_SIZES,
        *short,
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(tmp_path / "boxes"),
    )
    assert (tmp_path / "boxes" / "log.txt.rank1").is_file()  # the second process's log
    detector = torch.load(tmp_path / "boxes" / "model_final.pth", map_location="cpu", weights_only=True)
    assert detector["iteration"] == 1
    logged = [json.loads(line) for line in (tmp_path / "boxes" / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in logged] == [1] and logged[0]["total_loss"] > 0

    run_in_d2(
        detectron2_datasets,
        "train_net.py",
        "--config",
        "configs/detr_segm_256_6_6_torchvision.yaml",
        "--num-gpus",
        "1",
        "MODEL.DETR.FROZEN_WEIGHTS",
        str(tmp_path / "boxes" / "model_final.pth"),
        *ORIGINAL_COMMAND_SIZES,
        *short,
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(tmp_path / "masks"),
    )
    segm = torch.load(tmp_path / "masks" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    for key, value in detector["model"].items():  # frozen under DETRsegm's "detr."
        assert torch.equal(segm["detr.detr." + key[len("detr.") :]], value), key
    assert any(k.startswith("detr.mask_head.") for k in segm)
    logged = [json.loads(line) for line in (tmp_path / "masks" / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in logged] == [1] and logged[0]["loss_mask"] > 0 and logged[0]["loss_dice"] > 0
