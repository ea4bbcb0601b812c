"""datasets/coco.py: COCO annotations to target tensors, and clear errors for bad datasets."""

import json
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, coco, get_coco_api_from_dataset
from datasets.coco import ConvertCocoPolysToMask, convert_coco_poly_to_mask
from util.config import complete_args


def square(x, y, side):
    return [x, y, x + side, y, x + side, y + side, x, y + side]


def write_coco(root, images=None, annotations=None, categories=None, split="train"):
    """A tiny COCO-layout dataset: three 40x30 images; image 3 has no annotations."""
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    if images is None:
        images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 30, "width": 40} for i in (1, 2, 3)]
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (40, 80, 120)).save(root / f"{split}2017" / img["file_name"])
    if annotations is None:
        annotations = [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "bbox": [5, 5, 10, 10],
                "area": 100,
                "iscrowd": 0,
                "segmentation": [square(5, 5, 10)],
            },
            # a crowd annotation: dropped
            {
                "id": 2,
                "image_id": 1,
                "category_id": 4,
                "bbox": [0, 0, 20, 20],
                "area": 400,
                "iscrowd": 1,
                "segmentation": {"counts": [0, 10, 1190], "size": [30, 40]},
            },
            # extends past the right edge: clamped to x1 = 40
            {
                "id": 3,
                "image_id": 2,
                "category_id": 7,
                "bbox": [30, 10, 20, 5],
                "area": 100,
                "iscrowd": 0,
                "segmentation": [square(30, 10, 10)],
            },
            # zero width: dropped
            {
                "id": 4,
                "image_id": 2,
                "category_id": 7,
                "bbox": [10, 10, 0, 5],
                "area": 0,
                "iscrowd": 0,
                "segmentation": [square(10, 10, 1)],
            },
        ]
    if categories is None:
        categories = [{"id": i, "name": f"c{i}"} for i in (3, 4, 7)]
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


def args_for(root, **overrides):
    return complete_args(
        Namespace(**{"dataset_file": "coco", "coco_path": str(root), "masks": False, "num_classes": None, **overrides})
    )


def test_convert_coco_poly_to_mask():
    masks = convert_coco_poly_to_mask([[square(2, 3, 4)], [square(0, 0, 2), square(6, 6, 2)]], 10, 12)
    assert masks.shape == (2, 10, 12) and masks.dtype == torch.bool
    assert masks[0].sum() == 16 and masks[0, 3:7, 2:6].all()
    assert masks[1].sum() == 8  # the union of the object's two polygons
    assert convert_coco_poly_to_mask([], 10, 12).shape == (0, 10, 12)


def test_convert_drops_crowd_and_degenerate_and_clamps():
    image = Image.new("RGB", (40, 30))
    annotations = [
        {
            "bbox": [5, 5, 10, 10],
            "category_id": 3,
            "area": 100,
            "iscrowd": 0,
            "segmentation": [square(5, 5, 10)],
            "keypoints": [6, 6, 2, 8, 8, 1],
        },
        {
            "bbox": [0, 0, 20, 20],
            "category_id": 4,
            "area": 400,
            "iscrowd": 1,
            "segmentation": [square(0, 0, 20)],
            "keypoints": [0, 0, 0, 0, 0, 0],
        },
        {
            "bbox": [-5, 25, 20, 10],
            "category_id": 5,
            "area": 50,
            "segmentation": [square(0, 25, 5)],
            "keypoints": [1, 26, 2, 0, 0, 0],
        },  # no 'iscrowd' key: not crowd
        {
            "bbox": [10, 35, 5, 5],
            "category_id": 6,
            "area": 25,
            "iscrowd": 0,
            "segmentation": [square(10, 29, 1)],
            "keypoints": [0, 0, 0, 0, 0, 0],
        },  # below the image: empty after clamping
    ]
    _, target = ConvertCocoPolysToMask(return_masks=True)(image, {"image_id": 9, "annotations": annotations})
    assert target["boxes"].tolist() == [[5, 5, 15, 15], [0, 25, 15, 30]]
    assert target["labels"].tolist() == [3, 5]
    assert target["area"].tolist() == [100, 50] and target["area"].dtype == torch.float32
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["image_id"].tolist() == [9]
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["masks"].shape == (2, 30, 40) and target["masks"][0].sum() == 100
    assert target["keypoints"].shape == (2, 2, 3) and target["keypoints"][1, 0].tolist() == [1, 26, 2]


def test_convert_empty_annotations():
    _, target = ConvertCocoPolysToMask(return_masks=True)(
        Image.new("RGB", (40, 30)), {"image_id": 1, "annotations": []}
    )
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 30, 40)


def test_dataset_targets_through_build(tmp_path):
    write_coco(tmp_path)
    dataset = coco.build_from_folder(tmp_path, "train", transforms=None, args=args_for(tmp_path, masks=True))
    assert len(dataset) == 3 and get_coco_api_from_dataset(torch.utils.data.Subset(dataset, [0])) is dataset.coco
    image, target = dataset[1]  # image id 2: one clamped box, one degenerate dropped
    assert image.size == (40, 30)
    assert target["boxes"].tolist() == [[30, 10, 40, 15]] and target["labels"].tolist() == [7]
    assert target["masks"].shape == (1, 30, 40)
    _, target = dataset[2]  # image id 3: no annotations, kept with empty targets
    assert target["image_id"].tolist() == [3] and target["boxes"].shape == (0, 4)

    # The real build adds the original augmentation; val resizes the shorter side to 800.
    write_coco(tmp_path, split="val")
    image, target = build_dataset("val", args_for(tmp_path))[0]
    assert image.shape == (3, 800, 1066)
    assert torch.allclose(target["boxes"], torch.tensor([[10 / 40, 10 / 30, 10 / 40, 10 / 30]]))


def test_missing_dataset_path_names_flag_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="--coco_path.*train2017"):
        coco.build("train", args_for(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--coco_path is required"):
        coco.build("train", Namespace(coco_path=None, masks=False))
    (tmp_path / "train2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json is missing.*--coco_path"):
        coco.build("train", args_for(tmp_path))


def test_malformed_annotation_file_is_named(tmp_path):
    ann_file = write_coco(tmp_path)
    ann_file.write_text('{"images": [')
    with pytest.raises(ValueError, match="instances_train2017.json is not valid JSON"):
        coco.build("train", args_for(tmp_path))
    ann_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="instances_train2017.json is not in COCO format"):
        coco.build("train", args_for(tmp_path))
    ann_file.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances_train2017.json.*'categories'"):
        coco.build("train", args_for(tmp_path))


def test_missing_annotation_keys_are_named(tmp_path):
    write_coco(tmp_path, annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]}])
    with pytest.raises(ValueError, match=r"instances_train2017.json: annotations\[0\] lacks key 'area'"):
        coco.build("train", args_for(tmp_path))
    write_coco(tmp_path, annotations=[{"id": 1, "category_id": 3, "bbox": [0, 0, 2, 2], "area": 4}])
    with pytest.raises(ValueError, match="instances_train2017.json.*image_id"):
        coco.build("train", args_for(tmp_path))
    write_coco(tmp_path, annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2], "area": 4}])
    coco.build("train", args_for(tmp_path))  # fine without masks...
    with pytest.raises(ValueError, match="lacks key 'segmentation', which --masks needs"):
        coco.build("train", args_for(tmp_path, masks=True))


def test_category_id_beyond_num_classes(tmp_path):
    write_coco(tmp_path)
    args = args_for(tmp_path)
    args.num_classes = 7
    with pytest.raises(ValueError, match="category id 7 in .*instances_train2017.json.*--num_classes 7"):
        coco.build("train", args)
    args.num_classes = 8
    assert len(coco.build("train", args)) == 3


def test_missing_and_undecodable_images(tmp_path, monkeypatch):
    write_coco(tmp_path)
    (tmp_path / "train2017" / "000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000000002.jpg"):
        coco.build("train", args_for(tmp_path))
    (tmp_path / "train2017" / "000000000002.jpg").write_bytes(b"not a jpeg")
    # Small datasets have every image header read at build time, before any training.
    with pytest.raises(OSError, match="cannot decode image .*000000000002.jpg"):
        coco.build("train", args_for(tmp_path))
    # Past the probing limit, the file is named when it is first read.
    monkeypatch.setattr(coco, "MAX_IMAGES_TO_PROBE", 0)
    dataset = coco.build("train", args_for(tmp_path))
    dataset[0]
    with pytest.raises(OSError, match="cannot decode image .*000000000002.jpg"):
        dataset[1]


def test_make_coco_transforms_train_sizes(tmp_path):
    import random

    random.seed(0)
    image = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    target = {
        "boxes": torch.tensor([[10.0, 10, 200, 150]]),
        "labels": torch.tensor([1]),
        "area": torch.tensor([190.0 * 140]),
        "iscrowd": torch.tensor([0]),
        "size": torch.tensor([300, 400]),
    }
    transforms = coco.make_coco_transforms("train")
    for _ in range(5):
        out, out_target = transforms(image, target)
        assert min(out.shape[-2:]) in range(480, 801, 32) and max(out.shape[-2:]) <= 1333
        assert ((out_target["boxes"] >= 0) & (out_target["boxes"] <= 1)).all()
    with pytest.raises(ValueError, match="image_set"):
        coco.make_coco_transforms("test")


# ---------------------------------------------------------------------------------------------- bad data


def image_of_mode(mode: str, size=(40, 30)) -> Image.Image:
    """A 40x30 image in `mode` whose left half is dark and right half bright."""
    if mode == "I;16":
        pixels = np.zeros((size[1], size[0]), dtype=np.uint16)
        pixels[:, size[0] // 2 :] = 50000
        return Image.fromarray(pixels)
    image = Image.new("RGB", size, (10, 10, 10))
    image.paste((240, 240, 240), (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode, dither=Image.Dither.NONE)


@pytest.mark.parametrize(
    "mode, suffix", [("L", ".jpg"), ("CMYK", ".jpg"), ("I;16", ".png"), ("RGBA", ".png"), ("P", ".png"), ("LA", ".png")]
)
def test_images_of_any_mode_load_as_8_bit_rgb(mode, suffix, tmp_path):
    path = tmp_path / f"image{suffix}"
    image_of_mode(mode).save(path)
    assert Image.open(path).mode == mode
    rgb = coco.read_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    pixels = np.asarray(rgb).astype(int)
    # Dark left, bright right in every channel: 16-bit values are scaled (50000 -> 195), not clipped to 255.
    assert pixels[:, :15].max() < 40 and pixels[:, 25:].min() > 180, (pixels[:, :15].max(), pixels[:, 25:].min())
    if mode == "I;16":
        assert pixels[0, 30].tolist() == [50000 // 256] * 3


def test_exif_orientation_is_not_applied_as_in_the_original(tmp_path):
    # Stored 40x30, tagged "rotate 90" (orientation 6): boxes refer to the stored pixels, which are kept.
    write_coco(tmp_path)
    path = tmp_path / "train2017" / "000000000001.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    image_of_mode("RGB").save(path, exif=exif)
    assert Image.open(path).getexif()[0x0112] == 6
    dataset = coco.build_from_folder(tmp_path, "train", transforms=None, args=args_for(tmp_path))
    image, target = dataset[0]
    assert image.size == (40, 30) and target["size"].tolist() == [30, 40]
    assert target["boxes"].tolist() == [[5, 5, 15, 15]]


def test_a_truncated_jpeg_is_named_with_its_image_id(tmp_path):
    write_coco(tmp_path)
    path = tmp_path / "train2017" / "000000000002.jpg"
    Image.effect_noise((40, 30), 50).convert("RGB").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[:300])  # the header itself is cut: found when the dataset is built
    with pytest.raises(OSError, match=r"cannot decode image .*000000000002.jpg \(listed in .*instances_train"):
        coco.build_from_folder(tmp_path, "train", None, args_for(tmp_path))
    path.write_bytes(data[: len(data) * 2 // 3])  # the header is whole, the pixels are not: found when read
    dataset = coco.build_from_folder(tmp_path, "train", None, args_for(tmp_path))
    dataset[0]
    with pytest.raises(OSError, match=r"cannot decode image .*000000000002.jpg \(image id 2\)"):
        dataset[1]


@pytest.mark.parametrize(
    "bbox, kept",
    [
        ([-10, -10, 25, 25], [[0, 0, 15, 15]]),  # partly outside: clamped
        ([50, 40, 10, 10], []),  # wholly outside: empty after clamping, dropped
        ([5, 5, 0, 10], []),  # zero width: dropped
        ([5, 5, 10, -3], []),  # negative height: dropped
        ([float("nan"), 5, 10, 10], []),  # NaN: dropped
    ],
    ids=["partly_outside", "outside", "zero_width", "negative_height", "nan"],
)
def test_boxes_outside_empty_or_nan_are_clamped_or_dropped_as_in_the_original(bbox, kept, tmp_path):
    write_coco(tmp_path, annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": bbox, "area": 1}])
    dataset = coco.build_from_folder(tmp_path, "train", transforms=None, args=args_for(tmp_path))
    _, target = dataset[0]
    assert target["boxes"].tolist() == kept and len(target["labels"]) == len(kept)
    # Through the training transforms, a dropped box leaves an image trained on as background.
    image, target = coco.build("train", args_for(tmp_path))[0]
    assert target["boxes"].shape == (len(kept), 4) and torch.isfinite(target["boxes"]).all()


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["annotations"].__setitem__(0, [5, 5, 10, 10]), r"annotations\[0\] must be a JSON object"),
        (lambda d: d["annotations"][0].update(bbox="5 5 10 10"), r"annotations\[0\] \(id 1\) 'bbox' must be"),
        (lambda d: d["annotations"][0].update(bbox=[5, 5, None, 10]), r"annotations\[0\] \(id 1\) 'bbox' must be"),
        (lambda d: d.update(images={"id": 1}), "non-list top-level key 'images'"),
        (lambda d: d["categories"].__setitem__(0, "c3"), r"categories\[0\] must be a JSON object"),
    ],
    ids=["annotation_not_an_object", "bbox_a_string", "bbox_with_null", "images_not_a_list", "category_a_string"],
)
def test_annotation_files_of_the_wrong_shape_name_the_file_and_the_key(change, expected, tmp_path):
    ann_file = write_coco(tmp_path)
    data = json.loads(ann_file.read_text())
    change(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"instances_train2017.json.*{expected}"):
        coco.build("train", args_for(tmp_path))
