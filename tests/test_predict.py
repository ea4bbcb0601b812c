"""tools/predict.py and tools/detector.py: pictures with the boxes where the detections are, COCO results
pycocotools reads, panoptic pictures, clear errors for bad input, and checkpoints older than this project's flags.
Tiny models with fixed heads make the expected boxes known."""

import argparse
import ast
import contextlib
import io
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import main as main_py
from helpers import MASK_HEAD_FLAGS, ORIGINAL_FLAGS, REPO_ROOT
from tool_checkpoints import run_tool, tiny_checkpoint
from tools import predict
from tools.detector import checkpoint_args, dataset_names, load_detector, names_from_annotations
from util.visualize import color_for, draw_boxes, image_axes, keep_texts_inside

BOX = (0.5, 0.45, 0.5, 0.4)  # cx, cy, w, h: xyxy (0.25, 0.25, 0.75, 0.65) of any image
LABEL = 2  # "square" in the synthetic dataset


def run_predict(*argv):
    """predict.main(argv) -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = predict.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fixed_checkpoint(synthetic_root, tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "fixed.pth", synthetic_root, box=BOX, label=LABEL)


def grey_image(path, width, height):
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)
    return path


def near(pixels: np.ndarray, color, tolerance: int = 12) -> np.ndarray:
    return np.abs(pixels[..., :3].astype(int) - np.asarray(color)).max(-1) <= tolerance


def test_boxes_are_drawn_and_written_where_the_detections_are(fixed_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    grey_image(images / "wide.png", 100, 60)
    grey_image(images / "tall.jpg", 48, 80)
    out = tmp_path / "out"
    # As a user runs it, from another folder than the repository root.
    command = run_tool(
        "predict.py",
        "--resume",
        fixed_checkpoint,
        images,
        "--output_dir",
        out,
        "--batch_size",
        2,
        "--threshold",
        0.9,
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert command.returncode == 0, command.stderr
    assert "[2/2]" in command.stdout

    # results.json: each image's boxes in its own pixels, although both went through the model in one padded batch.
    results = json.loads((out / "results.json").read_text())
    images_json = json.loads((out / "images.json").read_text())
    listed = {entry["file_name"].rsplit("/", 1)[-1]: entry["id"] for entry in images_json}
    assert sorted(listed) == ["tall.jpg", "wide.png"]
    expected = {"wide.png": [25.0, 15.0, 50.0, 24.0], "tall.jpg": [12.0, 20.0, 24.0, 32.0]}
    for name, bbox in expected.items():
        mine = [r for r in results if r["image_id"] == listed[name]]
        assert len(mine) == 8  # every query of the fixed model
        for r in mine:
            assert r["category_id"] == LABEL
            assert r["score"] == pytest.approx(0.9975, abs=1e-3)
            assert r["bbox"] == pytest.approx(bbox, abs=0.02)

    # The picture: the box outline, in the class's colour, along the box's edges; grey inside it.
    picture = np.asarray(Image.open(out / "wide_detections.png").convert("RGB"))
    scale = 6  # image_axes: ceil(512 / 100)
    assert picture.shape == (60 * scale, 100 * scale, 3)
    green = [round(255 * c) for c in color_for(LABEL)[:3]]
    x0, y0, x1, y1 = (v * scale for v in (25, 15, 75, 39))
    band = 3  # the line is 2 points (~3 pixels) wide at 100 dpi
    bottom = near(picture[y1 - band : y1 + band + 1, x0 + 10 : x1 - 10], green).any(0)
    left = near(picture[y0 + 10 : y1 - 10, x0 - band : x0 + band + 1], green).any(1)
    right = near(picture[y0 + 10 : y1 - 10, x1 - band : x1 + band + 1], green).any(1)
    assert bottom.mean() > 0.95 and left.mean() > 0.95 and right.mean() > 0.95
    inside = picture[y0 + 20 : y1 - 20, x0 + 20 : x1 - 20]
    assert near(inside, (128, 128, 128), 3).mean() > 0.99
    assert not near(picture[: y0 - 30], green).any()  # nothing green above the box and its label
    assert (out / "tall_detections.png").stat().st_size > 0


def test_labels_at_the_border_stay_inside_the_picture():
    fig, ax, scale = image_axes(64, 64)
    # A box at the top-right corner: its label would start at the top edge and run past the right one.
    draw_boxes(ax, [[40, 0, 64, 20]], [1], [0.99], {1: "a rather long class name"}, fontsize=12)
    keep_texts_inside(ax)
    fig.canvas.draw()  # lays the moved label out again
    frame = ax.get_window_extent()
    patch = ax.texts[0].get_bbox_patch().get_window_extent()
    assert frame.x0 - 0.5 <= patch.x0 and patch.x1 <= frame.x1 + 0.5
    assert frame.y0 - 0.5 <= patch.y0 and patch.y1 <= frame.y1 + 0.5
    plt.close(fig)


@pytest.mark.parametrize(
    "flags",
    [(), ("--two_stage", "--enc_layers", "0", "--feature_stride", "8")],
    ids=["original", "synthetic-detection-defaults"],
)
def test_results_load_with_pycocotools(synthetic_root, tmp_path, flags):
    checkpoint = tiny_checkpoint(tmp_path / "random.pth", synthetic_root, *flags)
    out = tmp_path / "out"
    status, _, _ = run_predict(
        "--resume", checkpoint, synthetic_root / "val2017", "--output_dir", out, "--threshold", 0, "--device", "cpu"
    )
    assert status == 0
    gt = COCO(str(synthetic_root / "annotations" / "instances_val2017.json"))
    detections = gt.loadRes(str(out / "results.json"))
    # Ids come from the COCO-style file names, so they are the ground truth's.
    assert set(detections.getImgIds()) == set(gt.getImgIds())
    assert len(detections.getAnnIds()) == 8 * len(gt.getImgIds())  # threshold 0: every query
    assert len(list((out).glob("*_detections.png"))) == len(gt.getImgIds())


def test_unreadable_images_are_reported_and_skipped(fixed_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    grey_image(images / "good.png", 40, 40)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    status, stdout, stderr = run_predict(
        "--resume", fixed_checkpoint, images, "--output_dir", tmp_path / "out", "--device", "cpu"
    )
    assert status == 0  # the good image was processed
    assert "broken.jpg" in stderr and "could not be read" in stderr
    assert (tmp_path / "out" / "good_detections.png").exists()
    assert {r["image_id"] for r in json.loads((tmp_path / "out" / "results.json").read_text())} == {1}

    status, _, stderr = run_predict(
        "--resume", fixed_checkpoint, images / "broken.jpg", "--output_dir", tmp_path / "out2", "--device", "cpu"
    )
    assert status == 1 and "broken.jpg" in stderr  # nothing could be processed


def test_bad_inputs_give_clear_errors(synthetic_root, fixed_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    with pytest.raises(SystemExit, match="holds no images"):
        run_predict("--resume", fixed_checkpoint, empty, "--output_dir", tmp_path / "out")
    with pytest.raises(SystemExit, match="no such file"):
        run_predict("--resume", fixed_checkpoint, tmp_path / "missing.jpg", "--output_dir", tmp_path / "out")

    image = grey_image(tmp_path / "a.png", 32, 32)
    # A checkpoint whose weights are of another architecture than its flags say.
    other = torch.load(tiny_checkpoint(tmp_path / "wide.pth", synthetic_root, "--hidden_dim", "64"), weights_only=False)
    mixed = tmp_path / "mixed.pth"
    torch.save({"model": other["model"], "args": torch.load(fixed_checkpoint, weights_only=False)["args"]}, mixed)
    with pytest.raises(SystemExit, match="(?s)does not fit this model.*shape mismatches"):
        run_predict("--resume", mixed, image, "--output_dir", tmp_path / "out", "--device", "cpu")
    # The tiny checkpoint is not a DETR R50.
    with pytest.raises(SystemExit, match="does not fit this model"):
        run_predict(
            "--hub",
            "detr_resnet50",
            "--pretrained",
            fixed_checkpoint,
            image,
            "--output_dir",
            tmp_path / "out",
            "--device",
            "cpu",
        )
    with pytest.raises(SystemExit, match="(?s)not an entry point.*detr_resnet50, detr_resnet50_dc5"):
        run_predict("--hub", "detr_resnet51", image, "--output_dir", tmp_path / "out")
    with pytest.raises(SystemExit, match="carries no 'args'"):
        torch.save({"model": other["model"]}, tmp_path / "bare.pth")
        run_predict("--resume", tmp_path / "bare.pth", image, "--output_dir", tmp_path / "out", "--device", "cpu")


def test_panoptic_model_gets_a_panoptic_picture(synthetic_root, tmp_path):
    # The mask head's group norms need a width of 128 and 8 heads; labels 1 ("circle") is a thing.
    checkpoint = tiny_checkpoint(
        tmp_path / "panoptic.pth",
        synthetic_root,
        "--dataset_file",
        "synthetic_panoptic",
        "--masks",
        *MASK_HEAD_FLAGS,
        num_classes=9,
        box=BOX,
        label=1,
        thing_classes=[1, 2, 3, 4, 5],
    )
    detector = load_detector(resume=str(checkpoint))
    assert "panoptic" in detector.postprocessors
    assert detector.names[1] == "circle" and detector.names[6] == "sky"  # from the panoptic annotations
    images = [Image.fromarray(np.zeros((48, 80, 3), np.uint8)), Image.fromarray(np.zeros((64, 64, 3), np.uint8))]
    found = predict.detect(detector, images, threshold=0.5)
    for image, result in zip(images, found):
        ids = result["segment_ids"]
        assert ids.shape == (image.height, image.width)
        assert result["segments_info"], "every query scores 0.9975 > 0.85: some segment must be kept"
        assert set(np.unique(ids)) <= {s["id"] for s in result["segments_info"]}
        assert all(s["category_id"] == 1 and s["isthing"] for s in result["segments_info"])

    image_file = tmp_path / "black.png"
    images[0].save(image_file)
    status, _, _ = run_predict("--resume", checkpoint, image_file, "--output_dir", tmp_path / "out", "--device", "cpu")
    assert status == 0
    picture = Image.open(tmp_path / "out" / "black_panoptic.png")
    detections = Image.open(tmp_path / "out" / "black_detections.png")
    assert picture.width > detections.width  # the legend beside the image


def test_image_ids_and_category_names(tmp_path):
    assert predict.image_ids([Path("000000000139.jpg"), Path("7.png")]) == [139, 7]
    assert predict.image_ids([Path("1.jpg"), Path("cat.jpg")]) == [0, 1]
    assert predict.image_ids([Path("a/1.jpg"), Path("b/001.jpg")]) == [0, 1]  # the same number twice
    assert predict.output_names([Path("a/x.jpg"), Path("b/x.png")]) == ["00000_x", "00001_x"]
    # With an annotation file, the ids it gives the file names: results.json then evaluates against it.
    annotations = tmp_path / "instances.json"
    images = [{"id": 17, "file_name": "sub/cat.jpg"}, {"id": 4, "file_name": "dog.jpg"}]
    annotations.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    assert predict.image_ids([Path("x/dog.jpg"), Path("cat.jpg")], annotations) == [4, 17]
    with pytest.raises(ValueError, match="not among the images.*cow.jpg"):
        predict.image_ids([Path("dog.jpg"), Path("cow.jpg")], annotations)

    args = argparse.Namespace(dataset_file="coco", num_classes=91, coco_path=None, coco_panoptic_path=None)
    assert dataset_names(args)[90] == "toothbrush" and dataset_names(args)[1] == "person"
    args.num_classes = 4  # a custom dataset whose annotations are not at hand: no guessing
    assert dataset_names(args) == {}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        json.dumps(
            {"images": [], "annotations": [], "categories": [{"id": 1, "name": "bolt"}, {"id": 3, "name": "nut"}]}
        )
    )
    args.coco_path = str(tmp_path)
    assert dataset_names(args) == {1: "bolt", 3: "nut"}
    with pytest.raises(ValueError, match="cannot read category names"):
        names_from_annotations(tmp_path / "annotations")


def test_the_flags_a_checkpoint_predates_are_main_py_defaults():
    defaults = vars(main_py.get_args_parser().parse_args([]))
    assert set(ORIGINAL_FLAGS) <= set(defaults)
    original = argparse.Namespace(
        **{
            **{k: v for k, v in defaults.items() if k in ORIGINAL_FLAGS},
            "dataset_file": "coco_panoptic",
            "masks": True,
            "lr": 5e-5,
        }
    )
    state = {"detr.class_embed.bias": torch.zeros(251)}
    args = vars(checkpoint_args({"model": state, "args": original}, state, "old.pth"))
    assert (args["dataset_file"], args["masks"], args["lr"]) == ("coco_panoptic", True, 5e-5)  # its own flags
    newer = {k: args[k] for k in defaults if k not in ORIGINAL_FLAGS}
    # The class count from the weights; nothing to download; everything else as main.py's parser has it.
    assert newer == {**{k: defaults[k] for k in newer}, "num_classes": 250, "backbone_weights": "none"}
    assert args["thing_classes"] is defaults["thing_classes"] is None  # set by main.py from panoptic data, no flag


def test_a_checkpoint_with_the_original_flags_only_rebuilds_the_same_model(synthetic_root, tmp_path):
    # The synthetic recipe's batch norm, channels-last and query NMS set back to the original's, which an older
    # checkpoint, trained before these flags, had.
    full = tiny_checkpoint(
        tmp_path / "full.pth", synthetic_root, "--backbone_norm", "frozen", "--no_channels_last", "--query_nms", "1.0"
    )
    checkpoint = torch.load(full, weights_only=False)
    original = argparse.Namespace(**{k: v for k, v in vars(checkpoint["args"]).items() if k in ORIGINAL_FLAGS})
    assert not hasattr(original, "two_stage") and not hasattr(original, "num_classes")
    torch.save({"model": checkpoint["model"], "args": original}, tmp_path / "original.pth")

    expected, rebuilt = load_detector(resume=str(full)), load_detector(resume=str(tmp_path / "original.pth"))
    image = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = expected.model([image]), rebuilt.model([image])
    assert torch.equal(want["pred_logits"], got["pred_logits"]) and torch.equal(want["pred_boxes"], got["pred_boxes"])
    assert got["pred_logits"].shape[-1] == 7  # the class count, 6, read from the weights
    # The image size the tiny checkpoint names (64) is gone with its flags: the synthetic dataset's default.
    default_size = main_py.get_args_parser().parse_args([]).synthetic_image_size
    assert rebuilt.transform(Image.new("RGB", (64, 64)), None)[0].shape[-1] == default_size


def test_tools_import_no_script():
    """Scripts share code through tools/detector.py only: none imports another script of tools/, nor anything of
    main.py but its flags (get_args_parser, the one source of their defaults; tools/detector.py reads them through
    util.config.complete_args)."""
    scripts = {p.stem for p in (REPO_ROOT / "tools").glob("*.py")} - {"__init__", "detector"}
    assert {"predict", "attention", "export_onnx", "plot_logs"} <= scripts
    readers = set()
    for path in (REPO_ROOT / "tools").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "main":
                assert [alias.name for alias in node.names] == ["get_args_parser"], path.name
                readers.add(path.name)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        banned = {"main", "run_with_submitit"} | scripts | {f"tools.{s}" for s in scripts}
        assert not imported & banned, f"{path.name} imports {sorted(imported & banned)}"
    assert "benchmark.py" in readers
