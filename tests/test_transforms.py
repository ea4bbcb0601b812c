"""datasets/transforms.py: boxes, masks and areas follow the pixels; numbers computed by hand."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.transforms as T
from util.box_ops import masks_to_boxes


def make_sample(width=100, height=80, boxes=((10, 10, 50, 50),), masks=True):
    """A noise image and a target whose masks are exactly its (integer) boxes."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target = {
        "boxes": boxes,
        "labels": torch.arange(1, len(boxes) + 1),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
        "image_id": torch.tensor([7]),
        "size": torch.tensor([height, width]),
        "orig_size": torch.tensor([height, width]),
    }
    if masks:
        m = torch.zeros((len(boxes), height, width), dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            m[i, y0:y1, x0:x1] = True
        target["masks"] = m
    return image, target


def test_crop_shifts_clamps_and_drops():
    # Boxes: one partly inside the crop, one touching only its bottom edge, one entirely outside.
    image, target = make_sample(boxes=[(10, 10, 50, 50), (80, 60, 120, 90), (0, 0, 5, 5)])
    out_image, out = T.crop(image, target, (20, 30, 40, 60))  # top, left, height, width
    assert out_image.size == (60, 40)
    # (10,10,50,50) - (30,20,30,20) = (-20,-10,20,30) -> clamped (0,0,20,30); the others become empty.
    assert out["boxes"].tolist() == [[0, 0, 20, 30]]
    assert out["area"].tolist() == [600]
    assert out["labels"].tolist() == [1]
    assert out["iscrowd"].tolist() == [0]
    assert out["masks"].shape == (1, 40, 60)
    assert out["masks"].sum().item() == 600
    assert out["size"].tolist() == [40, 60]
    assert out["orig_size"].tolist() == [80, 100] and out["image_id"].tolist() == [7]
    assert target["boxes"].shape == (3, 4), "the input target must not be modified"


def test_crop_without_boxes_drops_empty_masks():
    image, target = make_sample(boxes=[(10, 10, 20, 20), (60, 50, 90, 70)])
    del target["boxes"]
    _, out = T.crop(image, target, (0, 0, 40, 40))
    assert out["labels"].tolist() == [1] and out["masks"].shape == (1, 40, 40)


def test_hflip_values_and_twice_is_identity():
    image, target = make_sample(boxes=[(10, 20, 30, 40), (0, 0, 100, 80)])
    flipped_image, flipped = T.hflip(image, target)
    assert flipped["boxes"].tolist() == [[70, 20, 90, 40], [0, 0, 100, 80]]
    assert torch.equal(masks_to_boxes(flipped["masks"]), torch.tensor([[70.0, 20, 89, 39], [0, 0, 99, 79]]))
    back_image, back = T.hflip(flipped_image, flipped)
    assert np.array_equal(np.asarray(back_image), np.asarray(image))
    for key in target:
        assert torch.equal(back[key], target[key]), key


@pytest.mark.parametrize(
    "image_size, size, max_size, expected_hw",
    [
        ((640, 480), 800, 1333, (800, 1066)),  # 640/480*800 = 1066.7, truncated
        ((480, 640), 800, 1333, (1066, 800)),
        ((1000, 200), 800, 1333, (267, 1335)),  # capped: round(1333*200/1000) = 267, then int(267*5) = 1335
        ((1066, 800), 800, 1333, (800, 1066)),  # shorter side already 800: unchanged
        ((300, 300), 512, None, (512, 512)),
        ((50, 30), (20, 10), None, (10, 20)),  # a sequence is (w, h)
    ],
)
def test_get_size(image_size, size, max_size, expected_hw):
    assert tuple(T.get_size(image_size, size, max_size)) == expected_hw


def test_resize_scales_boxes_area_and_masks():
    image, target = make_sample(width=100, height=80, boxes=[(10, 10, 50, 50)])
    out_image, out = T.resize(image, target, 40)  # shorter side 80 -> 40: both ratios 0.5
    assert out_image.size == (50, 40)
    assert out["boxes"].tolist() == [[5, 5, 25, 25]]
    assert out["area"].tolist() == [400]
    assert out["size"].tolist() == [40, 50]
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (1, 40, 50)
    assert torch.equal(masks_to_boxes(out["masks"]), torch.tensor([[5.0, 5, 24, 24]]))
    # Unequal ratios: (w, h) = (50, 20) scales x by 0.5 and y by 0.25.
    _, out = T.resize(image, target, (50, 20))
    assert out["boxes"].tolist() == [[5, 2.5, 25, 12.5]]
    assert out["area"].tolist() == [1600 * 0.125]


def test_resize_without_target_and_empty_masks():
    image, target = make_sample(boxes=torch.zeros((0, 4)))
    assert T.resize(image, None, 40)[1] is None
    _, out = T.resize(image, target, 40)
    assert out["masks"].shape == (0, 40, 50) and out["boxes"].shape == (0, 4)


def test_pad_keeps_boxes_and_pads_masks():
    image, target = make_sample(boxes=[(10, 10, 50, 50)])
    out_image, out = T.pad(image, target, (7, 3))
    assert out_image.size == (107, 83)
    assert np.asarray(out_image)[80:, :].max() == 0 and np.asarray(out_image)[:, 100:].max() == 0
    assert torch.equal(out["boxes"], target["boxes"])
    assert out["size"].tolist() == [83, 107] and out["masks"].shape == (1, 83, 107)


def test_center_crop():
    image, target = make_sample(width=100, height=80, boxes=[(10, 10, 50, 50)])
    out_image, out = T.CenterCrop((41, 50))(image, target)
    # top = round((80 - 41) / 2) = round(19.5) = 20 (banker's rounding), left = 25
    assert out_image.size == (50, 41)
    assert np.array_equal(np.asarray(out_image), np.asarray(image)[20:61, 25:75])
    assert out["boxes"].tolist() == [[0, 0, 25, 30]]


def test_random_crops_stay_in_bounds():
    random.seed(0)
    image, target = make_sample(width=100, height=80, boxes=[(10, 10, 50, 50), (60, 30, 95, 75)])
    for _ in range(20):
        out_image, out = T.RandomSizeCrop(30, 60)(image, target)
        assert 30 <= out_image.width <= 60 and 30 <= out_image.height <= 60
        w, h = out_image.size
        assert (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all()
        assert (out["boxes"] >= 0).all()
    out_image, out = T.RandomCrop((20, 30))(image, target)
    assert out_image.size == (30, 20) and out["size"].tolist() == [20, 30]
    # Smaller than min_size: the crop falls back to the image's own size instead of failing.
    small, small_target = make_sample(width=20, height=16, boxes=[(2, 2, 8, 8)])
    assert T.RandomSizeCrop(384, 600)(small, small_target)[0].size == (20, 16)


def test_random_select_flip_and_pad_follow_probability():
    image, target = make_sample()
    assert T.RandomSelect(T.CenterCrop((10, 10)), T.CenterCrop((20, 20)), p=1.0)(image, target)[0].size == (10, 10)
    assert T.RandomSelect(T.CenterCrop((10, 10)), T.CenterCrop((20, 20)), p=0.0)(image, target)[0].size == (20, 20)
    assert T.RandomHorizontalFlip(p=1.0)(image, target)[1]["boxes"].tolist() == [[50, 10, 90, 50]]
    assert T.RandomHorizontalFlip(p=0.0)(image, target)[1]["boxes"].tolist() == [[10, 10, 50, 50]]
    random.seed(1)
    out_image, _ = T.RandomPad(5)(image, target)
    assert 100 <= out_image.width <= 105 and 80 <= out_image.height <= 85
    with pytest.raises(TypeError):
        T.RandomResize(800)


def test_to_tensor_normalize_and_erasing():
    image, target = make_sample(width=100, height=40, boxes=[(10, 10, 50, 30)])
    tensor, _ = T.ToTensor()(image, target)
    assert tensor.shape == (3, 40, 100) and 0 <= tensor.min() and tensor.max() <= 1
    normalized, out = T.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])(tensor, target)
    assert torch.allclose(normalized, (tensor - 0.5) / 0.25)
    # cxcywh (30, 20, 40, 20) / (w, h, w, h) = (100, 40, 100, 40)
    assert torch.allclose(out["boxes"], torch.tensor([[0.3, 0.5, 0.4, 0.5]]))
    assert target["boxes"].tolist() == [[10, 10, 50, 30]]
    erased, same = T.RandomErasing(p=1.0, value=0)(tensor, target)
    assert same is target and (erased == 0).any() and erased.shape == tensor.shape


def test_coco_train_pipeline_keeps_masks_boxes_area_consistent():
    """Run the full geometric train pipeline many times: masks built as the boxes must stay the boxes."""
    scales = [48, 56, 64]
    geometric = T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomSelect(
                T.RandomResize(scales, max_size=100),
                T.Compose(
                    [T.RandomResize([40, 50, 60]), T.RandomSizeCrop(24, 40), T.RandomResize(scales, max_size=100)]
                ),
            ),
        ]
    )
    random.seed(0)
    # Box corners on multiples of 8 so that every resize keeps them on whole pixels.
    image, target = make_sample(width=96, height=64, boxes=[(8, 8, 40, 32), (48, 16, 88, 56), (0, 40, 24, 64)])
    dropped_once = False
    for _ in range(30):
        out_image, out = geometric(image, target)
        w, h = out_image.size
        assert out["size"].tolist() == [h, w] and out["masks"].shape[-2:] == (h, w)
        n = len(out["labels"])
        assert out["boxes"].shape == (n, 4) and out["masks"].shape[0] == n and out["area"].shape == (n,)
        box_w = out["boxes"][:, 2] - out["boxes"][:, 0]
        box_h = out["boxes"][:, 3] - out["boxes"][:, 1]
        assert (box_w > 0).all() and (box_h > 0).all()
        assert torch.allclose(out["area"], box_w * box_h, rtol=1e-4)
        nonempty = out["masks"].flatten(1).any(1)
        mask_boxes = masks_to_boxes(out["masks"][nonempty])
        mask_boxes[:, 2:] += 1  # pixel indices -> pixel edges
        # torch's "nearest" reads source pixel floor(j / scale): each of the two resizes can move a mask
        # edge by up to one source pixel; a box and mask going separate ways would be off by far more.
        assert torch.allclose(mask_boxes, out["boxes"][nonempty], atol=3)
        dropped_once = dropped_once or n < 3
    assert dropped_once, "no crop removed an object: the test did not exercise dropping"


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (500, 333), (1000, 200), (801, 800)])
def test_output_image_size_is_what_the_val_transforms_deliver(size):
    transforms = T.Compose(
        [T.RandomResize([800], max_size=1333), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    image, _ = transforms(Image.new("RGB", size), {})
    assert T.output_image_size(transforms, size) == (image.shape[2], image.shape[1])


def test_output_image_size_refuses_a_random_scale_or_crop():
    with pytest.raises(ValueError, match="RandomResize with 2 sizes picks one at random"):
        T.output_image_size(T.Compose([T.RandomResize([480, 512])]), (64, 64))
    with pytest.raises(ValueError, match="RandomSizeCrop may change the image size"):
        T.output_image_size(T.Compose([T.RandomSizeCrop(10, 20)]), (64, 64))
    with pytest.raises(ValueError, match="RandomPad may change the image size"):
        T.output_image_size(T.Compose([T.Compose([T.RandomPad(3)])]), (64, 64))  # found inside a nested Compose
    select = T.RandomSelect(T.RandomResize([32]), T.CenterCrop((40, 50)))
    with pytest.raises(ValueError, match=r"RandomSelect's two branches give \[\(32, 32\), \(50, 40\)\]"):
        T.output_image_size(select, (64, 64))


def test_output_image_size_sees_through_nested_composes_and_every_fixed_size_transform():
    normalize = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.2] * 3)])
    cases = [
        T.Compose([T.RandomResize([48]), normalize]),  # the synthetic val transform
        T.Compose([T.RandomHorizontalFlip(), T.Compose([T.RandomResize([60], max_size=70), normalize])]),
        T.Compose([T.CenterCrop((30, 40)), normalize, T.RandomErasing(p=1.0)]),
        T.Compose([T.RandomCrop((20, 24)), T.RandomPad(0), normalize]),
        # Either branch gives the same size; p = 1 and 0 take one branch only.
        T.Compose([T.RandomSelect(T.RandomResize([(50, 30)]), T.CenterCrop((30, 50))), normalize]),
        T.Compose([T.RandomSelect(T.RandomResize([40]), T.RandomSizeCrop(5, 9), p=1.0), normalize]),
        T.Compose([T.RandomSelect(T.RandomSizeCrop(5, 9), T.RandomResize([(36, 24)]), p=0.0), normalize]),
    ]
    random.seed(0)
    for transforms in cases:
        for size in [(64, 48), (48, 80), (56, 56)]:
            for _ in range(3):  # the random choices vary, the size does not
                image, _ = transforms(Image.new("RGB", size), {})
                assert T.output_image_size(transforms, size) == (image.shape[2], image.shape[1]), (transforms, size)
