"""util/hf.py: Hugging Face DETR folders <-> the original's checkpoint layout. transformers (and timm, for its
backbone names) build random-weight models that save_pretrained writes into folders, which the project reads;
the project's checkpoints go the other way and transformers' from_pretrained reads them. Outputs of both models
on the same padded batch must agree, and round trips must give back every tensor exactly."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import datasets
import hubconf
import main as main_py
from helpers import SPEC_DIR, hf_folder, import_transformers, randomize, run_main, tiny_args, tiny_flags, tiny_model
from models import build_model
from models.detr import PostProcess
from tools.detector import checkpoint_args, load_detector
from util.checkpoint import architecture_differences, load_checkpoint
from util.config import complete_args
from util.hf import HFFolderError, read_hf_folder, write_hf_folder
from util.misc import NestedTensor

transformers = import_transformers()

TRANSFORMERS_RESNET50 = {
    "model_type": "resnet",
    "layer_type": "bottleneck",
    "depths": [3, 4, 6, 3],
    "hidden_sizes": [256, 512, 1024, 2048],
    "out_features": ["stage4"],
}
TRANSFORMERS_RESNET18 = {
    "model_type": "resnet",
    "layer_type": "basic",
    "depths": [2, 2, 2, 2],
    "hidden_sizes": [64, 128, 256, 512],
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


def project_model(checkpoint: dict) -> torch.nn.Module:
    """The project's DETR built from a converted checkpoint's args, with its weights, in eval mode."""
    args = checkpoint_args(checkpoint, checkpoint["model"], "test")
    args.device = "cpu"
    model = build_model(args)[0]
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def padded_batch():
    """Two images, the second padded at its bottom and right (HF's pixel_mask is 1 on pixels, ours True on padding)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 64, 64, dtype=torch.bool)
    padding[1, 48:, :] = padding[1, :, 40:] = True
    images[1][:, padding[1]] = 0
    return images, padding


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Within `tolerance` relative to the size of the values, with a floor of 1."""
    scale = max(1.0, theirs.abs().max().item())
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= tolerance * scale


@torch.no_grad()
def compare_outputs(project: torch.nn.Module, hf_model: torch.nn.Module, masks: bool = False) -> None:
    """The two models' raw outputs and post-processed detections on padded_batch() agree."""
    images, padding = padded_batch()
    ours = project(NestedTensor(images, padding))
    theirs = hf_model(pixel_values=images, pixel_mask=(~padding).long())
    assert_close(ours["pred_logits"], theirs.logits)
    assert_close(ours["pred_boxes"], theirs.pred_boxes)
    if masks:
        assert_close(ours["pred_masks"], theirs.pred_masks)
    sizes = torch.tensor([[480, 640], [300, 250]])
    processor = transformers.DetrImageProcessor()
    hf_results = processor.post_process_object_detection(theirs, threshold=-1.0, target_sizes=sizes)
    for mine, hf in zip(PostProcess()(ours, sizes), hf_results):
        assert torch.equal(mine["labels"], hf["labels"])
        assert (mine["boxes"] - hf["boxes"]).abs().max().item() <= 1e-3


# 1. HF -> project: the same outputs ------------------------------------------------------------------------------

HF_CASES = {
    "r50": dict(backbone="resnet50"),
    "r101": dict(backbone="resnet101"),
    "dc5": dict(backbone="resnet50", dilation=True),
    "learned_position": dict(position_embedding_type="learned"),
    "20_labels": dict(num_labels=20),
    "transformers_resnet50": dict(use_timm_backbone=False, backbone=None, backbone_config=TRANSFORMERS_RESNET50),
    # facebook/detr-resnet-50's configuration
    "r50_full_size": dict(
        backbone="resnet50",
        d_model=256,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_queries=100,
        num_labels=91,
    ),
}
SLOW_CASES = ("r101", "r50_full_size")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in HF_CASES])
def test_hf_folder_gives_the_same_outputs(tmp_path, case):
    folder = hf_folder(tmp_path / case, **HF_CASES[case])
    checkpoint = read_hf_folder(folder)
    expected_layout = "transformers" if case.startswith("transformers") else "timm"
    assert checkpoint["hf_backbone_layout"] == expected_layout
    assert checkpoint["args"].backbone == {
        "r101": "resnet101",
        "learned_position": "resnet18",
        "20_labels": "resnet18",
    }.get(case, "resnet50")
    assert checkpoint["args"].dilation == (case == "dc5")
    hf_model = transformers.DetrForObjectDetection.from_pretrained(str(folder)).eval()
    compare_outputs(project_model(checkpoint), hf_model)


@pytest.mark.parametrize("layout", ["timm", "transformers"])
def test_hf_panoptic_folder_gives_the_same_masks(tmp_path, layout):
    backbone = (
        dict(backbone="resnet18")
        if layout == "timm"
        else dict(use_timm_backbone=False, backbone=None, backbone_config=TRANSFORMERS_RESNET18)
    )
    folder = hf_folder(
        tmp_path / layout,
        segmentation=True,
        d_model=128,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        **backbone,
    )
    checkpoint = read_hf_folder(folder)
    assert checkpoint["args"].masks and "mask_head.lay1.weight" in checkpoint["model"]
    hf_model = transformers.DetrForSegmentation.from_pretrained(str(folder)).eval()
    compare_outputs(project_model(checkpoint), hf_model, masks=True)


def test_id2label_becomes_the_class_names(tmp_path):
    names = {0: "N/A", 1: "cat", 2: "dog", 3: "bird", 4: "fish"}
    folder = hf_folder(tmp_path / "named", id2label=names, label2id={v: k for k, v in names.items()})
    checkpoint = read_hf_folder(folder)
    assert checkpoint["class_names"] == names
    assert checkpoint["args"].num_classes == 5
    assert checkpoint["model"]["class_embed.weight"].shape[0] == 6  # and "no object"
    detector = load_detector(resume=str(folder), size=64)  # tools' --resume takes the folder
    assert detector.names == names


@pytest.mark.parametrize("layout", ["timm", "transformers"])
def test_label_counts_both_ways(tmp_path, layout):
    # transformers leaves id2label and num_labels out of config.json at its default of 2 labels: the count then
    # comes from the class head's weights. Each folder converts to a checkpoint and back, and both directions give
    # transformers' outputs.
    backbone = (
        dict(backbone="resnet18")
        if layout == "timm"
        else dict(use_timm_backbone=False, backbone=None, backbone_config=TRANSFORMERS_RESNET18)
    )
    for labels in (1, 2, 5, 91):
        folder = hf_folder(tmp_path / f"hf{labels}", num_labels=labels, **backbone)
        written = json.loads((folder / "config.json").read_text())
        assert ("id2label" in written) == (labels != 2)  # what makes 2 labels the hard case
        hf_model = transformers.DetrForObjectDetection.from_pretrained(str(folder)).eval()
        checkpoint = read_hf_folder(folder)
        assert checkpoint["args"].num_classes == labels and checkpoint["hf_backbone_layout"] == layout
        project = project_model(checkpoint)
        compare_outputs(project, hf_model)

        config = write_hf_folder(checkpoint, tmp_path / f"back{labels}", layout=layout)
        assert len(config["id2label"]) == labels
        back, info = transformers.DetrForObjectDetection.from_pretrained(
            str(tmp_path / f"back{labels}"), output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert back.config.num_labels == labels
        compare_outputs(project, back.eval())


def test_a_label_count_the_weights_contradict_is_refused(tmp_path):
    folder = hf_folder(tmp_path / "hf", num_labels=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_labels": 7}))
    with pytest.raises(
        HFFolderError,
        match=r"hf/config\.json gives 7 labels .*, but .*hf/model\.safetensors has 2 "
        r"\(class_labels_classifier\.weight has 3 rows",
    ):
        read_hf_folder(folder)


# 2. Project -> HF -> project -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,extra",
    [
        ("timm", ()),
        ("transformers", ()),
        pytest.param(
            "timm",
            ("--position_embedding", "learned"),
            marks=pytest.mark.skipif(
                int(transformers.__version__.split(".")[0]) < 5,
                reason="learned position embeddings are written under transformers 5's name, which 4 does not read",
            ),
        ),
        ("timm", ("--masks", "--hidden_dim", "128", "--nheads", "8")),
        # Trained batch norms: in eval mode frozen ones with their running statistics, as transformers' are.
        ("transformers", ("--backbone_norm", "batch")),
    ],
)
def test_checkpoint_round_trip_through_hf(tmp_path, layout, extra):
    model = randomize(tiny_model(*extra)[0]).eval()
    args = tiny_args(*extra)
    checkpoint = {"model": model.state_dict(), "args": args, "epoch": 3}
    folder = tmp_path / "hf"
    config = write_hf_folder(checkpoint, folder, "test checkpoint", layout=layout, id2label={1: "one", 2: "two"})
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert config["id2label"]["1"] == "one" and config["id2label"]["0"] == "LABEL_0"

    hf_class = transformers.DetrForSegmentation if args.masks else transformers.DetrForObjectDetection
    hf_model, info = hf_class.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    compare_outputs(model, hf_model.eval(), masks=args.masks)

    back = read_hf_folder(folder)
    # num_batches_tracked, a BatchNorm2d's count of training steps, is no weight: the HF layout leaves it out.
    weights = {k: v for k, v in checkpoint["model"].items() if not k.endswith("num_batches_tracked")}
    assert back["model"].keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(back["model"][key], value), key
    for flag in (
        "backbone",
        "hidden_dim",
        "nheads",
        "enc_layers",
        "dec_layers",
        "dim_feedforward",
        "num_queries",
        "masks",
        "dilation",
    ):
        assert getattr(back["args"], flag) == getattr(args, flag), flag


def test_written_folder_runs_in_the_object_detection_pipeline(tmp_path):
    model = randomize(tiny_model("--num_classes", "3")[0])
    write_hf_folder(
        {"model": model.state_dict(), "args": tiny_args("--num_classes", "3")},
        tmp_path / "hf",
        id2label={0: "N/A", 1: "apple", 2: "pear"},
    )
    detector = transformers.pipeline("object-detection", model=str(tmp_path / "hf"), threshold=-1.0)
    image = Image.fromarray(
        torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    )
    detections = detector(image)
    assert len(detections) == 5  # every query of the tiny model
    assert {d["label"] for d in detections} <= {"N/A", "apple", "pear"}
    assert all(0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= 64 for d in detections)


def spec_checkpoint(table: str) -> dict:
    """A checkpoint of the published layout: the spec table's keys and shapes, random values, no args."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for line in (SPEC_DIR / table).read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        state[key] = torch.randn(json.loads(shape), generator=generator)
    return {"model": state}


# 3. Published checkpoints and fine-tuning ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    ["state_dict_detr_resnet50.tsv", pytest.param("state_dict_detr_resnet50_panoptic.tsv", marks=pytest.mark.slow)],
)
def test_published_checkpoint_round_trips_exactly(tmp_path, table):
    checkpoint = spec_checkpoint(table)
    config = write_hf_folder(checkpoint, tmp_path / "hf", table)
    assert config["backbone"] == "resnet50" and config["use_timm_backbone"]
    assert config["d_model"] == 256 and config["num_queries"] == 100 and config["encoder_layers"] == 6
    back = read_hf_folder(tmp_path / "hf")
    assert back["model"].keys() == checkpoint["model"].keys()
    assert all(torch.equal(back["model"][k], v) for k, v in checkpoint["model"].items())


@pytest.mark.slow
def test_published_checkpoint_loads_in_transformers(tmp_path):
    write_hf_folder(spec_checkpoint("state_dict_detr_resnet50.tsv"), tmp_path / "hf")
    _, info = transformers.DetrForObjectDetection.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_hf_folder_fine_tunes_with_another_class_count(tmp_path, synthetic_root):
    # The tiny synthetic recipe's sizes (tests/helpers.py), 3 labels where the synthetic data has more.
    folder = hf_folder(
        tmp_path / "hf",
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_layers=1,
        decoder_layers=2,
        num_queries=8,
        num_labels=3,
    )
    # HF models freeze their backbone's batch norms (the synthetic recipe trains them: --backbone_norm batch).
    _, printed = run_main(
        tiny_flags(
            synthetic_root, tmp_path / "out", "--finetune", str(folder), "--epochs", "1", "--backbone_norm", "frozen"
        )
    )
    assert "re-initialized because their shapes differ: class_embed.weight: checkpoint [4, 32]" in printed
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["epoch"] == 0


def test_hf_folder_evaluates_with_resume(tmp_path, synthetic_root):
    flags = tiny_flags(synthetic_root, tmp_path / "out", "--eval", "--backbone_norm", "frozen")
    num_classes = datasets.num_classes(main_py.parse_args(flags))
    folder = hf_folder(
        tmp_path / "hf",
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_layers=1,
        decoder_layers=2,
        num_queries=8,
        num_labels=num_classes,
    )
    run_main(flags + ["--resume", str(folder)])
    assert (tmp_path / "out" / "eval.pth").is_file()
    # A run of another architecture is told what differs, as for any checkpoint.
    with pytest.raises(ValueError, match="--backbone_norm: checkpoint 'frozen', this run 'batch'"):
        run_main(
            tiny_flags(synthetic_root, tmp_path / "out2", "--eval", "--backbone_norm", "batch", "--resume", str(folder))
        )


def test_hubconf_pretrained_takes_a_folder(tmp_path):
    model = randomize(tiny_model()[0]).eval()
    write_hf_folder({"model": model.state_dict(), "args": tiny_args()}, tmp_path / "hf")
    fresh = tiny_model(seed=1)[0]
    hubconf._load_pretrained(fresh, "detr_resnet50", str(tmp_path / "hf"))  # what pretrained=PATH does
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_main_accepts_a_folder_for_resume_and_frozen_weights(tmp_path, good_folder):
    args = tiny_args("--resume", str(good_folder), "--frozen_weights", str(good_folder), "--masks")
    main_py.check_args(args)  # no "no such file": the folder is read when the weights load
    with pytest.raises(SystemExit, match="no such file"):
        main_py.check_args(tiny_args("--resume", str(tmp_path / "missing")))


# Refused: what the HF layout cannot hold, and bad or hostile folders ---------------------------------------------


@pytest.mark.parametrize(
    "flags,named",
    [
        (("--pre_norm",), "--pre_norm"),
        (("--feature_stride", "16"), "--feature_stride"),
        (("--backbone_width", "0.5"), "--backbone_width"),
    ],
)
def test_what_the_hf_layout_cannot_hold_is_refused(tmp_path, flags, named):
    checkpoint = {"model": tiny_model(*flags)[0].state_dict(), "args": tiny_args(*flags)}
    with pytest.raises(HFFolderError, match=named):
        write_hf_folder(checkpoint, tmp_path / "hf", "ckpt.pth")
    assert not any(tmp_path.iterdir())


def test_two_stage_checkpoint_is_refused(tmp_path):
    flags = ("--two_stage", "--num_queries", "5")
    checkpoint = {"model": tiny_model(*flags)[0].state_dict(), "args": tiny_args(*flags)}
    with pytest.raises(HFFolderError, match="--two_stage"):
        write_hf_folder(checkpoint, tmp_path / "hf", "ckpt.pth")
    assert not any(tmp_path.iterdir())


class Payload:
    """Unpickling this runs os.system: what a hostile pytorch_model.bin could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("good") / "hf")


def broken_copy(good: Path, tmp_path: Path, config=None, drop=(), state=None) -> Path:
    """A copy of `good` with config.json replaced (a dict or a raw string), files dropped, or other weights."""
    from safetensors.torch import save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        if name not in drop:
            (folder / name).write_bytes((good / name).read_bytes())
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if state is not None:
        save_file(state, str(folder / "model.safetensors"))
    return folder


def good_config(good: Path) -> dict:
    return json.loads((good / "config.json").read_text())


def good_state(good: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(good / "model.safetensors"))


BAD_FOLDERS = {
    "no config.json": (lambda g: dict(drop=("config.json",)), r"broken is a folder without config\.json"),
    "config not an object": (lambda g: dict(config="[1, 2]"), r"config\.json: expected a JSON object"),
    "config not JSON": (lambda g: dict(config="{'d_model': "), r"config\.json is not valid JSON"),
    "d_model a string": (
        lambda g: dict(config={**good_config(g), "d_model": "big"}),
        r"config\.json: the key 'd_model' must be int",
    ),
    "another model type": (
        lambda g: dict(config={**good_config(g), "model_type": "deformable_detr"}),
        r"config\.json: the key 'model_type' is 'deformable_detr'",
    ),
    "unknown backbone": (
        lambda g: dict(
            config={
                **good_config(g),
                # transformers 4 writes a timm backbone in the flat form (backbone_config null), 5 as a backbone_config.
                "backbone_config": {
                    "model_type": "timm_backbone",
                    **(good_config(g)["backbone_config"] or {}),
                    "backbone": "efficientnet_b0",
                },
            }
        ),
        r"config\.json \(backbone_config\): the key 'backbone' is 'efficientnet_b0'",
    ),
    "unknown backbone, hub's flat form": (
        lambda g: dict(
            config={**good_config(g), "backbone_config": None, "use_timm_backbone": True, "backbone": "vit"}
        ),
        r"config\.json: the key 'backbone' is 'vit'",
    ),
    "other decoder heads": (
        lambda g: dict(config={**good_config(g), "decoder_attention_heads": 2}),
        r"config\.json: the key 'decoder_attention_heads'",
    ),
    "no weights": (lambda g: dict(drop=("model.safetensors",)), r"holds no weights: expected model\.safetensors"),
    "class head of another size": (
        lambda g: dict(state={**good_state(g), "class_labels_classifier.weight": torch.zeros(9, 32)}),
        r"config\.json gives 5 labels .*, but .*model\.safetensors has 8 \(class_labels_classifier\.weight has 9 rows",
    ),
    "class bias of another size": (
        lambda g: dict(state={**good_state(g), "class_labels_classifier.bias": torch.zeros(9)}),
        r"(?s)model\.safetensors does not fit .*class_labels_classifier\.bias: \[9\], expected \[6\]",
    ),
    "a q projection of another size": (
        lambda g: dict(state={**good_state(g), "model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 32)}),
        r"model\.safetensors: shapes that do not fit .*model\.encoder\.layers\.0\.self_attn\.q_proj\.weight",
    ),
    "a missing tensor": (
        lambda g: dict(state={k: v for k, v in good_state(g).items() if k != "model.input_projection.bias"}),
        r"(?s)model\.safetensors does not fit .*missing keys: model\.input_projection\.bias",
    ),
    "an unknown tensor": (
        lambda g: dict(state={**good_state(g), "model.extra.weight": torch.zeros(2)}),
        r"(?s)model\.safetensors does not fit .*unexpected keys: model\.extra\.weight",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_refused_naming_file_and_key(tmp_path, good_folder, case):
    make, message = BAD_FOLDERS[case]
    folder = broken_copy(good_folder, tmp_path, **make(good_folder))
    with pytest.raises(HFFolderError, match=message):
        read_hf_folder(folder)
    with pytest.raises(HFFolderError, match=message):
        load_checkpoint(str(folder))  # what main.py, hubconf, d2 and the tools call


def test_truncated_safetensors_is_refused(tmp_path, good_folder, synthetic_root):
    folder = broken_copy(good_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HFFolderError, match=r"model\.safetensors cannot be read.*cut short"):
        read_hf_folder(folder)
    # main.py stops before any work, naming the flag and the file.
    with pytest.raises(SystemExit, match=r"--finetune: .*model\.safetensors cannot be read"):
        run_main(tiny_flags(synthetic_root, tmp_path / "out", "--finetune", str(folder)))
    assert not (tmp_path / "out" / "log.txt").exists()


def test_pickle_bin_with_a_payload_is_refused_and_not_run(tmp_path, good_folder):
    folder = broken_copy(good_folder, tmp_path, drop=("model.safetensors",))
    marker = tmp_path / "payload_ran"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.query_position_embeddings.weight": Payload(marker)}, f, protocol=2)
    with pytest.raises(HFFolderError, match=r"pytorch_model\.bin: refused.*Nothing in it was run"):
        read_hf_folder(folder)
    assert not marker.exists()


def test_pytorch_model_bin_of_tensors_is_read(tmp_path, good_folder):
    folder = broken_copy(good_folder, tmp_path, drop=("model.safetensors",))
    torch.save(good_state(good_folder), folder / "pytorch_model.bin")
    expected = read_hf_folder(good_folder)["model"]
    got = read_hf_folder(folder)["model"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_folders_args_hold_what_config_json_says_and_main_py_defaults_stand_for_the_rest(good_folder):
    args = read_hf_folder(good_folder)["args"]
    config = json.loads((good_folder / "config.json").read_text())
    assert (args.backbone, args.hidden_dim, args.nheads) == (
        "resnet18",
        config["d_model"],
        config["encoder_attention_heads"],
    )
    assert not {"two_stage", "feature_stride", "backbone_norm", "lr", "epochs"} & set(
        vars(args)
    )  # config.json has no key
    # Resumed with a flag the folder does not hold at another value: refused, the folder's network being the default.
    run = complete_args(args)
    run.two_stage, run.backbone_norm = True, "batch"
    assert architecture_differences(args, run) == [
        "--backbone_norm: checkpoint 'frozen', this run 'batch'",
        "--two_stage: checkpoint False, this run True",
    ]
