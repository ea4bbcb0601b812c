"""tools/convert_hf.py: the direction read from SRC, both ways through files, --check's differences, class names
for id2label, nothing written when the conversion fails, and the synthetic demo's checkpoint detecting in
transformers' object-detection pipeline what tools/predict.py detects with it."""

import ast
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, hf_folder, import_transformers, randomize, tiny_args, tiny_model
from tool_checkpoints import demo_checkpoint
from tools import convert_hf, predict
from tools.detector import load_detector
from util.checkpoint import load_checkpoint

transformers = import_transformers()


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "image.png"
    pixels = torch.randint(0, 256, (48, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def test_hf_folder_to_checkpoint_and_check(tmp_path, image_path, capsys):
    folder = hf_folder(
        tmp_path / "hf", id2label={i: f"class{i}" for i in range(5)}, label2id={f"class{i}": i for i in range(5)}
    )
    differences = convert_hf.main([str(folder), str(tmp_path / "out.pth"), "--check", str(image_path), "--size", "64"])
    assert set(differences) == {"pred_logits", "pred_boxes"}
    assert all(value <= 1e-4 for value in differences.values())
    assert "largest difference of pred_logits" in capsys.readouterr().out
    checkpoint = load_checkpoint(str(tmp_path / "out.pth"))
    assert checkpoint["class_names"][3] == "class3" and checkpoint["args"].backbone == "resnet18"
    assert torch.equal(
        checkpoint["model"]["query_embed.weight"], convert_hf.read_hf_folder(folder)["model"]["query_embed.weight"]
    )


def test_two_label_folder_converts_both_ways(tmp_path, image_path):
    # transformers writes no label count for its default of 2 labels; the class head's weights give it.
    folder = hf_folder(tmp_path / "hf", num_labels=2)
    differences = convert_hf.main([str(folder), str(tmp_path / "out.pth"), "--check", str(image_path), "--size", "64"])
    assert all(value <= 1e-4 for value in differences.values())
    assert load_checkpoint(str(tmp_path / "out.pth"))["args"].num_classes == 2
    differences = convert_hf.main(
        [str(tmp_path / "out.pth"), str(tmp_path / "back"), "--check", str(image_path), "--size", "64"]
    )
    assert all(value <= 1e-4 for value in differences.values())
    assert len(json.loads((tmp_path / "back" / "config.json").read_text())["id2label"]) == 2


def test_check_without_transformers_says_what_to_install(tmp_path, image_path, monkeypatch):
    # requirements.txt leaves transformers out (requirements-dev.txt has it): --check then stops with what to install,
    # after the conversion, which needs no transformers, has written its file.
    folder = hf_folder(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(SystemExit, match="--check .*requirements-dev.txt"):
        convert_hf.main([str(folder), str(tmp_path / "out.pth"), "--check", str(image_path), "--size", "64"])
    assert load_checkpoint(str(tmp_path / "out.pth"))["args"].backbone == "resnet18"


def test_checkpoint_to_hf_folder_with_coco_names(tmp_path, image_path):
    model = randomize(tiny_model("--num_classes", "3")[0])
    args = tiny_args("--num_classes", "3")
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, tmp_path / "checkpoint.pth")
    annotations = tmp_path / "coco" / "annotations"
    annotations.mkdir(parents=True)
    (annotations / "instances_val2017.json").write_text(
        json.dumps(
            {"images": [], "annotations": [], "categories": [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]}
        )
    )
    differences = convert_hf.main(
        [
            str(tmp_path / "checkpoint.pth"),
            str(tmp_path / "hf"),
            "--coco_path",
            str(tmp_path / "coco"),
            "--backbone_layout",
            "transformers",
            "--check",
            str(image_path),
            "--size",
            "64",
        ]
    )
    assert all(value <= 1e-4 for value in differences.values())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "LABEL_0", "1": "apple", "2": "pear"}
    assert config["backbone_config"]["model_type"] == "resnet" and config["use_timm_backbone"] is False


def test_failed_conversion_writes_nothing(tmp_path):
    folder = hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"model\.safetensors cannot be read"):
        convert_hf.main([str(folder), str(tmp_path / "out" / "out.pth")])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    args = tiny_args("--pre_norm")
    torch.save({"model": tiny_model("--pre_norm")[0].state_dict(), "args": args}, tmp_path / "pre_norm.pth")
    with pytest.raises(SystemExit, match="--pre_norm"):
        convert_hf.main([str(tmp_path / "pre_norm.pth"), str(tmp_path / "hf_out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "pre_norm.pth"]


def test_conversion_needs_no_transformers(tmp_path, monkeypatch):
    folder = hf_folder(tmp_path / "hf")
    torch.save({"model": tiny_model()[0].state_dict(), "args": tiny_args()}, tmp_path / "checkpoint.pth")
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    convert_hf.main([str(tmp_path / "checkpoint.pth"), str(tmp_path / "back")])
    convert_hf.main([str(folder), str(tmp_path / "out.pth")])
    assert (tmp_path / "back" / "model.safetensors").is_file() and (tmp_path / "out.pth").is_file()


def widest_gap_threshold(scores: torch.Tensor) -> float:
    """The middle of the widest gap between two consecutive scores: a threshold that keeps some detections and
    drops others, far from any score, so that rounding cannot move a detection across it."""
    ordered = scores.sort().values
    gaps = ordered[1:] - ordered[:-1]
    i = gaps.argmax().item()
    return ((ordered[i] + ordered[i + 1]) / 2).item()


@torch.no_grad()
def pipeline_detections(pipe, image: Image.Image, threshold: float) -> dict:
    """What pipeline("object-detection") finds in `image`, before it cuts its boxes down to whole pixels: the
    pipeline's own preprocessing, forward pass and post-processing, with 'scores', 'labels' and 'boxes' (xyxy,
    pixels of the image as given) as tensors."""
    outputs = pipe.forward(pipe.preprocess(image))
    return pipe.image_processor.post_process_object_detection(outputs, threshold, outputs["target_size"])[0]


def test_demo_checkpoint_detects_in_the_pipeline_what_predict_detects(tmp_path):
    # The demo's plain DETR with trained batch norms (--backbone_norm batch), after two SGD steps.
    checkpoint = demo_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "no_dataset")
    state = load_checkpoint(str(checkpoint))["model"]
    assert state["backbone.0.body.layer1.0.bn1.num_batches_tracked"].item() == 2
    assert not torch.equal(state["backbone.0.body.layer1.0.bn1.running_var"], torch.ones(64))
    convert_hf.main([str(checkpoint), str(tmp_path / "hf")])
    # The pipeline resizes as predict.py does for a synthetic model: the native size, here 128 pixels.
    preprocessor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 128, "longest_edge": 128000}

    detector = load_detector(resume=str(checkpoint))
    pipe = transformers.pipeline("object-detection", model=str(tmp_path / "hf"))
    id2label = pipe.model.config.id2label
    assert [id2label[i] for i in range(6)] == [detector.names.get(i, f"LABEL_{i}") for i in range(6)]
    rng = np.random.default_rng(0)
    # At the native size (as the demo's validation images are) the pixels the two models see are the same; an
    # image of another size is resized by PIL for predict.py and by torchvision for transformers' processor, whose
    # pixels differ in their last bits.
    for (height, width), box_tolerance in (((128, 128), 1e-3), ((96, 160), 1e-2)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        threshold = widest_gap_threshold(predict.detect(detector, [image], -1.0)[0]["scores"])
        ours = predict.detect(detector, [image], threshold)[0]
        theirs = pipeline_detections(pipe, image, threshold)
        assert 0 < len(ours["labels"]) < 20
        assert torch.equal(ours["labels"], theirs["labels"])
        assert (ours["scores"] - theirs["scores"]).abs().max().item() <= 1e-4
        assert (ours["boxes"] - theirs["boxes"]).abs().max().item() <= box_tolerance
        # The pipeline's own answer: the class names, and the boxes cut to whole pixels.
        answer = pipe(image, threshold=threshold)
        assert [d["label"] for d in answer] == [id2label[i] for i in ours["labels"].tolist()]
        whole = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in answer])
        assert ((ours["boxes"] - whole).abs() < 1 + box_tolerance).all()


def test_half_width_demo_checkpoint_is_refused_naming_the_flag(tmp_path):
    # The demo's ResNet on CPUs without bfloat16 (--backbone_width 0.5) has no Hugging Face form.
    checkpoint = demo_checkpoint(tmp_path / "half.pth", tmp_path / "no_dataset", "--backbone_width", "0.5", steps=0)
    with pytest.raises(
        SystemExit, match=r"half\.pth was trained with --backbone_width 0\.5: .*--backbone_width 1 converts"
    ):
        convert_hf.main([str(checkpoint), str(tmp_path / "hf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.pth"]


def test_the_core_never_imports_transformers():
    core = [
        REPO_ROOT / "main.py",
        REPO_ROOT / "engine.py",
        REPO_ROOT / "hubconf.py",
        *[path for folder in ("models", "util", "datasets") for path in (REPO_ROOT / folder).rglob("*.py")],
    ]
    importers = []
    for path in core:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] in ("transformers", "timm") for n in names):
                importers.append(str(path.relative_to(REPO_ROOT)))
    assert len(core) > 20 and importers == []
