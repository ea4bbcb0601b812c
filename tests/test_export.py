"""The model outside eager PyTorch: TorchScript, ONNX (run in onnxruntime) and torch.compile, each against eager."""

import pytest
import torch

from helpers import tiny_model
from models.backbone import Backbone
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from util.misc import NestedTensor, nested_tensor_from_tensor_list
from tools.export_onnx import torch_exports_onnx

OUTPUTS = ("pred_logits", "pred_boxes")


@pytest.fixture(scope="module")
def detection_model():
    model, _, _ = tiny_model("--no_aux_loss", "--dec_layers", "1")
    return model.eval()


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return nested_tensor_from_tensor_list([torch.rand(3, 64, 96, generator=g), torch.rand(3, 80, 64, generator=g)])


# ---------------------------------------------------------------------------------------------- TorchScript


def test_script_detr(detection_model):
    scripted = torch.jit.script(detection_model)
    batch = padded_batch()
    with torch.no_grad():
        eager, script = detection_model(batch), scripted(batch)
    assert set(script) == set(OUTPUTS)
    for k in OUTPUTS:
        torch.testing.assert_close(script[k], eager[k], rtol=1e-5, atol=1e-5)


def test_script_backbone():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", train_backbone=True, return_interm_layers=True, dilation=False).eval()
    scripted = torch.jit.script(backbone)
    batch = padded_batch(1)
    with torch.no_grad():
        eager, script = backbone(batch), scripted(batch)
    assert list(script) == list(eager) == ["0", "1", "2", "3"]
    for k in eager:
        torch.testing.assert_close(script[k].tensors, eager[k].tensors, rtol=1e-5, atol=1e-5)
        assert torch.equal(script[k].mask, eager[k].mask)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PositionEmbeddingSine(16, normalize=True),
        lambda: PositionEmbeddingSine(8),
        lambda: PositionEmbeddingLearned(16),
    ],
    ids=["sine-normalized", "sine", "learned"],
)
def test_script_position_embeddings(make):
    torch.manual_seed(0)
    module = make()
    scripted = torch.jit.script(module)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[0, 3:, :] = True
    mask[0, :, 4:] = True
    features = NestedTensor(torch.rand(2, 4, 5, 7), mask)
    with torch.no_grad():
        torch.testing.assert_close(scripted(features), module(features), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- ONNX


needs_onnx_exporter = pytest.mark.skipif(
    not torch_exports_onnx(), reason=f"ONNX export needs torch 2.10 or newer, this is {torch.__version__}"
)


def assert_onnx_export_matches_eager(model, path, extra_outputs: int = 0):
    """Export `model` (eval mode) to ONNX at `path` with dynamic batch, height and width, run it in onnxruntime
    at the exported size and at other ones, and compare OUTPUTS with eager PyTorch (within 1e-4). The graph's
    outputs are OUTPUTS followed by `extra_outputs` others."""
    import onnxruntime

    batch = torch.export.Dim("batch", min=1, max=16)
    height = torch.export.Dim("height", min=64, max=1344)
    width = torch.export.Dim("width", min=64, max=1344)
    program = torch.onnx.export(
        model,
        (torch.rand(2, 3, 64, 96),),
        dynamo=True,
        verbose=False,
        dynamic_shapes=({0: batch, 2: height, 3: width},),
        input_names=["images"],
        output_names=list(OUTPUTS),
    )
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names[: len(OUTPUTS)] == list(OUTPUTS) and len(names) == len(OUTPUTS) + extra_outputs
    g = torch.Generator().manual_seed(0)
    # The exported size, then other batch sizes, heights and widths than the one exported with.
    for shape in [(2, 3, 64, 96), (1, 3, 96, 64), (3, 3, 128, 100)]:
        images = torch.rand(*shape, generator=g)
        with torch.no_grad():
            eager = model(images)
        results = session.run(None, {"images": images.numpy()})
        for name, value in zip(OUTPUTS, results):
            assert value.shape == tuple(eager[name].shape)
            torch.testing.assert_close(torch.from_numpy(value), eager[name], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_onnx_exporter
def test_onnx_export_runs_in_onnxruntime_at_other_sizes(detection_model, tmp_path):
    assert_onnx_export_matches_eager(detection_model, tmp_path / "detr.onnx")


@pytest.mark.slow
@needs_onnx_exporter
def test_two_stage_onnx_export_runs_in_onnxruntime_at_other_sizes(tmp_path):
    """The synthetic detection defaults' query selection (the best distinct proposals, gathers) exports too."""
    model, _, _ = tiny_model(
        "--no_aux_loss",
        "--dec_layers",
        "1",
        "--two_stage",
        "--enc_layers",
        "0",
        "--feature_stride",
        "16",
        "--query_nms",
        "0.5",
    )
    # After the detections: the proposals' logits, boxes and anchors (enc_outputs).
    assert_onnx_export_matches_eager(model.eval(), tmp_path / "two_stage.onnx", extra_outputs=3)


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_torch_compile_matches_eager(detection_model):
    # fullgraph: the whole forward compiles as one graph, with no fallback to Python in the middle.
    compiled = torch.compile(detection_model, fullgraph=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, out = detection_model(images), compiled(images)
    for k in OUTPUTS:
        torch.testing.assert_close(out[k], eager[k], rtol=1e-4, atol=1e-4)
