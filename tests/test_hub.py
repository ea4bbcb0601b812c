"""Tests of hubconf.py and util/checkpoint.py: the published layouts, safe loading, and no surprise network."""

import argparse
import os
import pickle
import urllib.error

import pytest
import torch

import hubconf
from helpers import REPO_ROOT, SPEC_DIR, block_network, tiny_model
from models.detr import DETR, PostProcess
from util.checkpoint import load_checkpoint, load_state_dict_checked, model_state_from, safe_globals

# The published files, as listed in the original README (spec/HUB.md).
PUBLISHED = {
    "detr_resnet50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_resnet50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_resnet101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_resnet101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
    "detr_resnet50_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth",
    "detr_resnet50_dc5_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-panoptic-da08f1b1.pth",
    "detr_resnet101_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r101-panoptic-40021d53.pth",
}
DETECTION = ["detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", "detr_resnet101_dc5"]
PANOPTIC = ["detr_resnet50_panoptic", "detr_resnet50_dc5_panoptic", "detr_resnet101_panoptic"]


def read_layout(name):
    """[(key, shape, dtype)] from spec/state_dict_<name>.tsv (columns: key, shape as [a, b], dtype)."""
    with open(SPEC_DIR / f"state_dict_{name}.tsv") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    assert header == ["key", "shape", "dtype"]
    return [(key, [int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype) for key, shape, dtype in rows]


def expected_layout(entry):
    backbone = "resnet101" if "resnet101" in entry else "resnet50"
    detection = read_layout(f"detr_{backbone}")
    if entry in DETECTION:
        return detection
    # Panoptic files hold the detection model (250 classes) under "detr." plus the mask head. Only the R50 one is
    # published; R101's swaps in the R101 backbone rows (the mask head's shapes do not depend on the depth).
    panoptic = read_layout("detr_resnet50_panoptic")
    is_backbone = [k.startswith("detr.backbone.") for k, _, _ in panoptic]
    first, last = is_backbone.index(True), len(is_backbone) - is_backbone[::-1].index(True)
    assert all(is_backbone[first:last])
    backbone_rows = [("detr." + k, s, d) for k, s, d in detection if k.startswith("backbone.")]
    return panoptic[:first] + backbone_rows + panoptic[last:]


def layout(model):
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


def refuse_weight_files(monkeypatch):
    """Any read of a weights file fails: building with pretrained=False must not load anything."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"weights were loaded: torch.load{args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)


# ---------------------------------------------------------------------------------------------- layouts, offline


@pytest.mark.slow
@pytest.mark.parametrize("entry", DETECTION + PANOPTIC)
def test_entry_point_offline_with_the_published_layout(entry, monkeypatch, tmp_path):
    attempts = block_network(monkeypatch)
    refuse_weight_files(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = getattr(hubconf, entry)(pretrained=False)
    assert attempts == []
    assert layout(model) == expected_layout(entry)
    # No ImageNet backbone either: its frozen batch-norm statistics are still the defaults.
    body = (model.detr if entry in PANOPTIC else model).backbone[0].body
    assert torch.equal(body.bn1.running_var, torch.ones(64)) and torch.equal(body.bn1.running_mean, torch.zeros(64))
    assert os.listdir(tmp_path) == []  # nothing cached either
    dc5 = "_dc5" in entry
    last_stage = body.layer4[0].conv2
    assert last_stage.stride == ((1, 1) if dc5 else (2, 2))


def test_layout_files_agree_with_each_other():
    # Guards the derivation of the R101 panoptic layout above: the panoptic R50 file is the detection R50 file
    # under "detr." (with a 250-class head), then the mask head.
    r50, pan = read_layout("detr_resnet50"), read_layout("detr_resnet50_panoptic")
    inner = [row for row in pan if row[0].startswith("detr.")]
    assert len(inner) == len(r50) and pan[: len(inner)] == inner
    for (k, s, d), (pk, ps, pd) in zip(r50, inner):
        assert pk == "detr." + k and pd == d
        assert ps == s or (k.startswith("class_embed.") and ps == [251] + s[1:] and s[0] == 92), k


# ---------------------------------------------------------------------------------------------- pretrained=True


@pytest.fixture
def tiny_hub(monkeypatch):
    """Entry points build the tiny model, so that the loading path is tested without 40M-parameter models."""
    model, _, _ = tiny_model("--no_aux_loss")
    monkeypatch.setattr(hubconf, "_make_detr", lambda *args, **kwargs: model)
    return model


@pytest.mark.parametrize("entry", DETECTION + PANOPTIC)
def test_pretrained_offline_names_the_url_and_the_way_out(entry, tiny_hub, monkeypatch, tmp_path):
    block_network(monkeypatch, hub_cache=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_route(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_route)
    with pytest.raises(RuntimeError) as info:
        getattr(hubconf, entry)(pretrained=True)
    message = str(info.value)
    url = PUBLISHED[entry]
    assert url in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints", os.path.basename(url)) in message
    assert "pretrained=PATH" in message


def test_pretrained_download_checks_the_hash_and_loads_safely(tiny_hub, monkeypatch):
    calls = []

    def record(url, **kwargs):
        calls.append((url, kwargs))
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", record)
    with pytest.raises(RuntimeError, match="detr-r50-e632da11.pth"):
        hubconf.detr_resnet50(pretrained=True)
    ((url, kwargs),) = calls
    assert url == PUBLISHED["detr_resnet50"]
    assert kwargs.get("check_hash") is True and kwargs.get("weights_only") is True


def test_pretrained_true_uses_a_copy_in_the_hub_cache(tiny_hub, monkeypatch, tmp_path):
    # What the offline message suggests: put the file in torch.hub's cache; then no network is needed.
    attempts = block_network(monkeypatch, hub_cache=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source, _, _ = tiny_model("--no_aux_loss", seed=5)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=1e-4)}, cache / "detr-r50-e632da11.pth")
    model = hubconf.detr_resnet50(pretrained=True)
    assert attempts == []
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- local checkpoints


@pytest.fixture(scope="module")
def r50_checkpoint(tmp_path_factory):
    """A checkpoint of detr_resnet50 in the published format: model state_dict, args Namespace, and more."""
    torch.manual_seed(1)
    model = hubconf.detr_resnet50(pretrained=False)
    args = argparse.Namespace(lr=1e-4, backbone="resnet50", dilation=False, num_queries=100, aux_loss=True)
    path = tmp_path_factory.mktemp("published") / "detr-r50-e632da11.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 499}, path)
    return path, model.state_dict(), args


@pytest.mark.slow
def test_published_format_loads_strictly_through_hub_and_load_checkpoint(r50_checkpoint, monkeypatch):
    path, state, args = r50_checkpoint
    attempts = block_network(monkeypatch)
    checkpoint = load_checkpoint(str(path))
    assert checkpoint["args"] == args and checkpoint["epoch"] == 499
    assert list(model_state_from(checkpoint, str(path))) == list(state)
    torch.manual_seed(2)
    model, post = hubconf.detr_resnet50(pretrained=str(path), return_postprocessor=True)
    assert isinstance(post, PostProcess) and isinstance(model, DETR)
    assert model.num_queries == 100 and not model.aux_loss
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert attempts == []


@pytest.mark.slow
def test_checkpoint_of_another_class_count_is_refused_by_the_hub(r50_checkpoint):
    path, _, _ = r50_checkpoint
    with pytest.raises(ValueError) as info:
        hubconf.detr_resnet50(pretrained=str(path), num_classes=20)
    message = str(info.value)
    assert str(path) in message
    assert "class_embed.weight: checkpoint [92, 256] vs model [21, 256]" in message
    assert "class_embed.bias: checkpoint [92] vs model [21]" in message
    assert "--num_classes" in message


def test_load_state_dict_checked_lists_every_offending_key():
    model, _, _ = tiny_model("--no_aux_loss")
    state = dict(model.state_dict())
    del state["query_embed.weight"]
    state["decoder.extra.weight"] = torch.zeros(3)
    state["bbox_embed.layers.0.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as info:
        load_state_dict_checked(model, state, "my.pth")
    message = str(info.value)
    assert message.startswith("my.pth does not fit this model")
    assert "missing keys: query_embed.weight" in message
    assert "unexpected keys: decoder.extra.weight" in message
    assert "bbox_embed.layers.0.bias: checkpoint [7] vs model [32]" in message


def test_load_state_dict_checked_loads_a_fitting_state_and_ignores_batch_counters():
    model, _, _ = tiny_model("--no_aux_loss", seed=0)
    source, _, _ = tiny_model("--no_aux_loss", seed=1)
    state = dict(source.state_dict())
    # Published checkpoints of ResNets trained with BatchNorm2d may carry these counters.
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(10)
    load_state_dict_checked(model, state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


def test_load_checkpoint_is_weights_only(tmp_path):
    # A pickle that would run code (here: os.getcwd) on unpickling is refused, not executed.
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {}, "payload": Evil()}, f)
    with pytest.raises(RuntimeError, match="(?s)could not read checkpoint.*Weights only load failed"):
        load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_safe_globals_without_the_context_manager_of_newer_torch(tmp_path, monkeypatch):
    # torch 2.4 has add_safe_globals only: the allowance holds inside the block and is taken back on leaving it.
    path = tmp_path / "checkpoint.pth"
    torch.save({"args": argparse.Namespace(lr=1e-4)}, path)
    before = set(torch.serialization.get_safe_globals())
    monkeypatch.delattr(torch.serialization, "safe_globals", raising=False)
    with safe_globals([argparse.Namespace]):
        assert torch.load(path, weights_only=True)["args"] == argparse.Namespace(lr=1e-4)
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)


def test_model_state_from_accepts_bare_state_dicts_and_rejects_others():
    bare = {"w": torch.zeros(2)}
    assert model_state_from(bare) is bare
    assert model_state_from({"model": bare, "epoch": 1}) is bare
    with pytest.raises(ValueError, match="no 'model' state_dict"):
        model_state_from({"optimizer": {}, "epoch": 1}, "opt.pth")


# ---------------------------------------------------------------------------------------------- torch.hub itself


def test_hubconf_needs_only_torch_and_torchvision():
    assert hubconf.dependencies == ["torch", "torchvision"]
    for entry in DETECTION + PANOPTIC:
        assert callable(getattr(hubconf, entry)) and getattr(hubconf, entry).__doc__, entry


@pytest.mark.slow
def test_torch_hub_load_from_a_local_clone(monkeypatch, tmp_path):
    attempts = block_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, post = torch.hub.load(
        str(REPO_ROOT), "detr_resnet50", source="local", pretrained=False, num_classes=10, return_postprocessor=True
    )
    assert model.class_embed.out_features == 11 and type(post).__name__ == "PostProcess"
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 100, 11) and out["pred_boxes"].shape == (1, 100, 4)
    assert attempts == []


def test_panoptic_postprocessor(tiny_hub):
    model, post = hubconf.detr_resnet50_panoptic(pretrained=False, threshold=0.7, return_postprocessor=True)
    assert type(post).__name__ == "PostProcessPanoptic" and post.threshold == 0.7
    thing = post.is_thing_map
    assert [thing[i] for i in (0, 1, 90, 91, 200, 249)] == [True, True, True, False, False, False]
    assert len(thing) == 250
