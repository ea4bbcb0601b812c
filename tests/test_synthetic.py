"""datasets/synthetic.py: deterministic, self-consistent instances and panoptic annotations, built like COCO."""

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

import datasets
from datasets import synthetic
from util.config import complete_args

PARAMS = dict(seed=3, num_train=40, num_val=8, image_size=128)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", **PARAMS, workers=2)


def load(root, kind, split="train"):
    return json.loads((root / "annotations" / f"{kind}_{split}2017.json").read_text())


def args_for(root, **overrides):
    """The synthetic flags of a small dataset at root; every other flag at main.py's default."""
    return complete_args(
        Namespace(
            **{
                "dataset_file": "synthetic",
                "coco_path": None,
                "synthetic_path": str(root),
                "synthetic_seed": PARAMS["seed"],
                "synthetic_train_size": PARAMS["num_train"],
                "synthetic_val_size": PARAMS["num_val"],
                "synthetic_image_size": PARAMS["image_size"],
                "masks": False,
                "num_classes": None,
                **overrides,
            }
        )
    )


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    # root was drawn by 2 processes, this one by 1: the same files to the byte.
    again = synthetic.generate(tmp_path / "again", **PARAMS, workers=1)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 2 * (PARAMS["num_train"] + PARAMS["num_val"]) + 4 + 1
    for name in files:
        assert (root / name).read_bytes() == (again / name).read_bytes(), name
    first = Path("train2017") / "000000000001.jpg"
    assert np.array_equal(np.asarray(Image.open(root / first)), np.asarray(Image.open(again / first)))
    other = synthetic.generate(tmp_path / "other", **dict(PARAMS, seed=4, num_train=4, num_val=1))
    assert load(other, "instances")["annotations"] != load(root, "instances")["annotations"][:4]
    assert (other / first).read_bytes() != (root / first).read_bytes()


# SHA-256 of the annotation files and the panoptic PNGs' pixels of the PARAMS set, as the generator drew it when its
# pool still forked this process: drawing in a forkserver's processes changed no byte. (The JPEGs are left out: their
# bytes depend on Pillow's libjpeg; test_same_seed_same_bytes_other_seed_differs compares them across pools.)
PARAMS_DIGEST = "3f3abc03b321617b4147e389fb3dbe05c8b1db8aef4ab79d9eca0d5aed6460ce"


def test_the_pool_draws_what_the_generator_always_drew(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".json", ".png")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes() if path.suffix == ".json" else np.asarray(Image.open(path)).tobytes())
    assert digest.hexdigest() == PARAMS_DIGEST


def test_instances_are_self_consistent(root):
    data = load(root, "instances")
    size = PARAMS["image_size"]
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle", "star", "cross"]
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5]
    assert all(c["supercategory"] == "shape" for c in data["categories"])
    assert len(data["images"]) == PARAMS["num_train"]
    assert all(
        img["file_name"] == f"{img['id']:012d}.jpg" and img["height"] == img["width"] == size for img in data["images"]
    )
    per_image = {img["id"]: 0 for img in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
        assert ann["iscrowd"] == 0 and ann["category_id"] in range(1, 6)
        (flat,) = ann["segmentation"]
        polygon = np.array(flat).reshape(-1, 2)
        assert ann["area"] == round(synthetic.polygon_area(polygon), 2)
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
        assert np.allclose([x, y, x + w, y + h], [*polygon.min(0), *polygon.max(0)], atol=0.011)
        # The polygon as training rasterizes it covers about its geometric area.
        decoded = coco_mask.decode(coco_mask.frPyObjects([flat], size, size))[..., 0]
        assert abs(decoded.sum() - ann["area"]) <= 0.15 * ann["area"] + 6
        # ... and reaches the edges of its box: the pixels show the whole object the box annotates.
        px, py, pw, ph = synthetic.segment_bbox(decoded)
        assert np.allclose([px, py, px + pw, py + ph], [x, y, x + w, y + h], atol=1.5)
        assert 0.1 * size / 2 <= max(w, h) and max(w, h) <= 0.5 * size + 0.02
    counts = list(per_image.values())
    assert max(counts) <= synthetic.MAX_OBJECTS and min(counts) == 0 and max(counts) >= 4
    assert len({ann["category_id"] for ann in data["annotations"]}) == 5
    assert len({ann["id"] for ann in data["annotations"]}) == len(data["annotations"])


def segments_cross(p, q, r, s) -> bool:
    """Whether segments pq and rs cross at a point inside both (touching ends do not count)."""

    def side(a, b, c):
        return np.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    return side(p, q, r) * side(p, q, s) < 0 and side(r, s, p) * side(r, s, q) < 0


@pytest.mark.parametrize("name", synthetic.THING_NAMES)
def test_each_shape_is_a_simple_polygon_drawn_whole(name):
    polygon = synthetic.unit_polygon(name)
    edges = [(polygon[i], polygon[(i + 1) % len(polygon)]) for i in range(len(polygon))]
    crossings = [
        (i, j)
        for i in range(len(edges))
        for j in range(i + 2, len(edges))
        if (i, j) != (0, len(edges) - 1) and segments_cross(*edges[i], *edges[j])
    ]
    assert crossings == [], f"{name}: its outline crosses itself"
    assert np.hypot(*polygon.T).max() == pytest.approx(1.0)  # inscribed in the unit circle
    # Rasterized large, the shape fills its outline's box and its area.
    size, radius = 256, 120
    mask = synthetic.rasterize(np.round(polygon * radius + size / 2, 2), size)
    x, y, w, h = synthetic.segment_bbox(mask)
    lo, hi = polygon.min(0) * radius + size / 2, polygon.max(0) * radius + size / 2
    assert np.allclose([x, y, x + w, y + h], [*lo, *hi], atol=1.5)
    assert mask.sum() == pytest.approx(synthetic.polygon_area(polygon) * radius**2, rel=0.02)


def test_cross_has_four_arms():
    # Arms of half-width a and length 1 around a central square, scaled into the unit circle by 1 / hypot(1, a).
    a = 0.3
    expected = (4 * 2 * a * (1 - a) + (2 * a) ** 2) / (1 + a**2)
    assert synthetic.polygon_area(synthetic.unit_polygon("cross")) == pytest.approx(expected)
    mask = synthetic.rasterize(np.round(synthetic.unit_polygon("cross") * 60 + 64, 2), 128)
    # Along the middle row and column the cross spans its whole width; along a row through an arm, only the arm.
    span = 2 * 60 / np.hypot(1, a)
    assert mask[64].sum() == pytest.approx(span, abs=2) and mask[:, 64].sum() == pytest.approx(span, abs=2)
    assert mask[30].sum() == pytest.approx(2 * a * 60 / np.hypot(1, a), abs=2)


def test_panoptic_pngs_match_segments(root):
    size = PARAMS["image_size"]
    for split in ("train", "val"):
        panoptic, instances = load(root, "panoptic", split), load(root, "instances", split)
        isthing = {c["id"]: c["isthing"] for c in panoptic["categories"]}
        assert isthing == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 0, 7: 0, 8: 0}
        assert [c["name"] for c in panoptic["categories"][5:]] == ["sky", "water", "ground"]
        assert panoptic["images"] == instances["images"]
        things_by_image = {img["id"]: [] for img in instances["images"]}
        for ann in instances["annotations"]:
            things_by_image[ann["image_id"]].append(ann)
        for ann in panoptic["annotations"]:
            assert ann["file_name"] == f"{ann['image_id']:012d}.png"
            rgb = np.asarray(Image.open(root / f"panoptic_{split}2017" / ann["file_name"]), dtype=np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
            segments = ann["segments_info"]
            assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in segments)  # no unlabelled pixel
            for s in segments:
                mask = ids == s["id"]
                assert s["area"] == mask.sum() and s["iscrowd"] == 0
                ys, xs = np.nonzero(mask)
                assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            # Things come first, in the order of the instance annotations: visible part of the whole shape.
            things = [s for s in segments if isthing[s["category_id"]]]
            assert 2 <= len(segments) - len(things) <= 3
            assert [s["category_id"] for s in things] == [a["category_id"] for a in things_by_image[ann["image_id"]]]
            for s, instance in zip(things, things_by_image[ann["image_id"]]):
                full = coco_mask.decode(coco_mask.frPyObjects(instance["segmentation"], size, size))[..., 0] > 0
                visible = ids == s["id"]
                assert not (visible & ~full).any()
                assert visible.sum() >= synthetic.MIN_VISIBLE * full.sum()


def test_generation_is_skipped_redone_and_safe(tmp_path):
    params = dict(PARAMS, num_train=2, num_val=1)
    root = synthetic.generate(tmp_path / "d", **params)
    stamp = (root / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    synthetic.generate(root, **params)
    assert (root / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp
    synthetic.generate(root, **dict(params, num_train=3))  # other parameters: generated again
    assert len(load(root, "instances")["images"]) == 3
    assert synthetic.read_marker(root)["num_train"] == 3

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine.*--synthetic_path"):
        synthetic.generate(foreign, **params)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_interrupted_generation_is_redone(tmp_path, monkeypatch):
    params = dict(PARAMS, num_train=2, num_val=1)
    real_write_split = synthetic.write_split

    def interrupted(root, split, *args):
        real_write_split(root, split, *args)
        if split == "val":
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path / "d", **params)
    # Nothing half-written is left, and the status tells processes waiting for the data what happened.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", ".d.status"]
    status = synthetic.read_status(tmp_path / "d")
    assert (status["state"], status["error"], status["pid"]) == ("failed", "KeyboardInterrupt: ", os.getpid())
    monkeypatch.setattr(synthetic, "write_split", real_write_split)
    synthetic.generate(tmp_path / "d", **params)
    assert synthetic.read_marker(tmp_path / "d")["num_train"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]


# ---------------------------------------------------------------------------------------------- distributed runs


def slow_drawing(monkeypatch, seconds: float, fail_when: Path = None):
    """Make every image take `seconds` to draw, and the sixth raise OSError (a full disk) once `fail_when` exists."""
    real_write_image = synthetic.write_image

    def write_image(root, split, seed, image_size, index):
        if fail_when is not None and index == 5:
            while not fail_when.exists():
                time.sleep(0.05)
            raise OSError(28, "No space left on device")
        time.sleep(seconds)
        return real_write_image(root, split, seed, image_size, index)

    monkeypatch.setattr(synthetic, "write_image", write_image)


def when_seen_drawing(monkeypatch, action):
    """Do `action()` once the waiting process has seen the drawing process hold the lock."""
    real_lock_is_held = synthetic.lock_is_held
    done = []

    def lock_is_held(path):
        held = real_lock_is_held(path)
        if held and not done:
            done.append(action())
        return held

    monkeypatch.setattr(synthetic, "lock_is_held", lock_is_held)


def kill_once_drawing(drawer: multiprocessing.Process, root: Path) -> None:
    """Kill the drawing process once it has reported an image."""
    deadline = time.monotonic() + 60
    while (synthetic.read_status(root) or {}).get("drawn", 0) < 1:
        assert drawer.is_alive() and time.monotonic() < deadline, "the drawing process did not start"
        time.sleep(0.05)
    os.kill(drawer.pid, signal.SIGKILL)


def start_drawing(root: Path, params) -> multiprocessing.Process:
    """The first process of a distributed run, drawing `root` as a single process does (forked: it draws with the
    patched write_image)."""
    drawer = multiprocessing.get_context("fork").Process(
        target=synthetic.prepare_root, args=(args_for(root, **params),)
    )
    drawer.start()
    return drawer


def waiting_rank(root: Path, params):
    """What the second process of the run (local rank 1) gets from prepare_root: the error it stops with."""
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError) as error:
        patch.setattr(synthetic, "local_rank", lambda: 1)
        synthetic.prepare_root(args_for(root, **params))
    return str(error.value)


SMALL = dict(synthetic_train_size=20, synthetic_val_size=2, synthetic_image_size=32)


def test_the_other_ranks_stop_when_rank_0_dies_or_fails_while_drawing(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "WAIT_START_S", 60.0)  # the drawing process starts well within it
    slow_drawing(monkeypatch, seconds=0.1)
    # Killed while drawing: rank 1 notices that the lock is free and the dataset not there.
    root = tmp_path / "killed"
    drawer = start_drawing(root, SMALL)
    with monkeypatch.context() as patch:
        when_seen_drawing(patch, lambda: kill_once_drawing(drawer, root))
        message = waiting_rank(root, SMALL)
    drawer.join()
    assert drawer.exitcode == -signal.SIGKILL
    assert f"the synthetic dataset in {root} is not there" in message
    assert f"(pid {drawer.pid} on " in message and "stopped before finishing it (killed?)" in message
    assert not root.exists()

    # A failure: rank 1 gives rank 0's error.
    slow_drawing(monkeypatch, seconds=0.1, fail_when=tmp_path / "fail")
    root = tmp_path / "failed"
    drawer = start_drawing(root, SMALL)
    with monkeypatch.context() as patch:
        when_seen_drawing(patch, (tmp_path / "fail").touch)
        message = waiting_rank(root, SMALL)
    drawer.join()
    assert f"the synthetic dataset in {root} is not there" in message
    assert "stopped before finishing it (OSError: [Errno 28] No space left on device)" in message

    # Stuck: no progress for WAIT_STALL_S.
    monkeypatch.setattr(synthetic, "WAIT_STALL_S", 1.0)
    slow_drawing(monkeypatch, seconds=60)
    root = tmp_path / "stuck"
    drawer = start_drawing(root, SMALL)
    try:
        message = waiting_rank(root, SMALL)
    finally:
        drawer.kill()
        drawer.join()
    assert f"the process drawing the synthetic dataset in {root} (pid {drawer.pid} on " in message
    assert "has shown no progress for 1 s" in message

    # Nobody draws (the first process never got there, or does not see this folder).
    monkeypatch.setattr(synthetic, "WAIT_START_S", 0.5)
    message = waiting_rank(tmp_path / "nobody", SMALL)
    assert "(no status written, the first process of its machine) was not seen drawing it within 0.5 s" in message


def test_the_other_ranks_wait_for_the_data_and_draw_nothing(tmp_path, monkeypatch):
    slow_drawing(monkeypatch, seconds=0.05)
    root = tmp_path / "data"
    drawer = start_drawing(root, SMALL)
    seen = []
    when_seen_drawing(monkeypatch, lambda: seen.append(True))
    monkeypatch.setattr(synthetic, "local_rank", lambda: 1)  # after the fork: the drawing process is rank 0
    waited = synthetic.prepare_root(args_for(root, **SMALL))
    assert seen  # it waited while rank 0 drew
    drawer.join()
    assert drawer.exitcode == 0 and waited == root
    assert synthetic.read_marker(root)["num_train"] == SMALL["synthetic_train_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "data"]  # no status left behind


def test_build_gives_normalized_targets(root):
    dataset = datasets.build_dataset("train", args_for(root, masks=True))
    assert len(dataset) == PARAMS["num_train"]
    assert datasets.get_coco_api_from_dataset(dataset) is dataset.coco
    sizes = {112, 120, 128, 136, 144}
    seen_boxes = 0
    for idx in range(10):
        image, target = dataset[idx]
        assert image.shape[0] == 3 and image.shape[1] == image.shape[2] and image.shape[1] in sizes
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3, 4, 5}
        assert target["masks"].shape == (len(boxes), *image.shape[1:])
        seen_boxes += len(boxes)
    assert seen_boxes > 0
    image, _ = datasets.build_dataset("val", args_for(root))[0]
    assert image.shape == (3, 128, 128)


def test_build_checks_num_classes_and_dataset_file(root):
    with pytest.raises(ValueError, match="category id 5 in .*instances_train2017.json.*--num_classes 5"):
        datasets.build_dataset("train", args_for(root, num_classes=5))
    assert len(datasets.build_dataset("train", args_for(root, num_classes=6))) == PARAMS["num_train"]
    with pytest.raises(ValueError, match="--dataset_file 'voc'.*coco, coco_panoptic, synthetic, synthetic_panoptic"):
        datasets.build_dataset("train", args_for(root, dataset_file="voc"))


def test_num_classes_and_thing_classes_come_from_the_dataset(root):
    assert datasets.num_classes(Namespace(dataset_file="coco", num_classes=None)) == 91
    assert datasets.num_classes(Namespace(dataset_file="coco_panoptic", num_classes=None)) == 250
    assert datasets.num_classes(args_for(root)) == 6
    assert datasets.num_classes(args_for(root, dataset_file="synthetic_panoptic")) == 9
    assert datasets.num_classes(args_for(root, num_classes=12)) == 12  # the flag wins
    assert datasets.thing_classes(args_for(root, dataset_file="synthetic_panoptic")) == [1, 2, 3, 4, 5]
    assert datasets.thing_classes(Namespace(dataset_file="coco_panoptic")) == list(range(91))
    assert datasets.thing_classes(args_for(root)) is None  # no panoptic categories
    with pytest.raises(ValueError, match="--dataset_file 'voc' is not supported"):
        datasets.num_classes(args_for(root, dataset_file="voc"))
    # --coco_path pointing at a generated dataset is used as it is, whatever the --synthetic_* flags say.
    assert synthetic.prepare_root(args_for("unused", coco_path=str(root), synthetic_train_size=1)) == root


def test_each_dataset_file_is_one_entry_of_the_table():
    assert datasets.DATASET_FILES == ("coco", "coco_panoptic", "synthetic", "synthetic_panoptic")
    panoptic = {name for name, entry in datasets.DATASETS.items() if entry.thing_classes is not None}
    assert panoptic == {"coco_panoptic", "synthetic_panoptic"}
    assert {name for name in datasets.DATASETS if datasets.has_recipe(name)} == {"synthetic", "synthetic_panoptic"}
    assert datasets.recipe("coco") == {}
    assert datasets.recipe("synthetic_panoptic", two_stage=False).get("learned_queries") is None
    assert datasets.recipe("synthetic_panoptic")["learned_queries"] == 5


def test_box_ap_of_panoptic_data_is_measured_against_the_instances(root):
    detection = datasets.build_dataset("val", args_for(root))
    assert datasets.box_ground_truth(detection, args_for(root)) is detection.coco
    args = args_for(root, dataset_file="synthetic_panoptic")
    ground_truth = datasets.box_ground_truth(datasets.build_dataset("val", args), args)
    assert sorted(ground_truth.cats) == [1, 2, 3, 4, 5]  # the things: stuff has no boxes to find
    assert len(ground_truth.imgs) == PARAMS["num_val"] and all("bbox" in a for a in ground_truth.anns.values())


def test_build_panoptic(root):
    dataset = datasets.build_dataset("val", args_for(root, dataset_file="synthetic_panoptic", masks=True))
    assert len(dataset) == PARAMS["num_val"]
    image, target = dataset[0]
    assert image.shape == (3, 128, 128)
    assert {6, 7, 8} & set(target["labels"].tolist())  # stuff segments are targets too
    assert target["masks"].shape[0] == len(target["labels"])
    with pytest.raises(ValueError, match="category id 8 in .*panoptic_val2017.json.*--num_classes 8"):
        datasets.build_dataset("val", args_for(root, dataset_file="synthetic_panoptic", num_classes=8))


def test_add_synthetic_args():
    parser = synthetic.add_synthetic_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (
        args.synthetic_path,
        args.synthetic_seed,
        args.synthetic_train_size,
        args.synthetic_val_size,
        args.synthetic_image_size,
    ) == ("data/synthetic", 0, 1600, 200, 128)
    assert all(action.help for action in parser._actions if action.dest.startswith("synthetic_"))
