"""tools/export_onnx.py: the exported file has a dynamic batch, height and width, and onnxruntime agrees with PyTorch
within 1e-4 on images of sizes the export never saw; the synthetic demo's checkpoints export too."""

import contextlib
import io
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tool_checkpoints import demo_checkpoint, run_tool, tiny_checkpoint
from tools import export_onnx
from tools.detector import load_detector

pytestmark = [
    pytest.mark.slow,  # the dynamo exporter takes ~20 s even for the tiny model
    pytest.mark.skipif(
        not export_onnx.torch_exports_onnx(),
        reason=f"ONNX export needs torch 2.10 or newer, this is {torch.__version__}",
    ),
]


@pytest.fixture(scope="module")
def exported(synthetic_root, tmp_path_factory):
    """(checkpoint, ONNX file, what tools/export_onnx.py printed), exported once for the module by the command
    run from the repository root, checked on two images of other sizes than the export example (2 x 3 x 224 x 288)."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = tiny_checkpoint(folder / "tiny.pth", synthetic_root)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (70, 50), "b.jpg": (64, 160)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    output = folder / "tiny.onnx"
    command = run_tool(
        "export_onnx.py", "--resume", checkpoint, "--output", output, "--check", folder / "a.png", folder / "b.jpg"
    )
    assert command.returncode == 0, command.stdout + command.stderr
    return checkpoint, output, command.stdout


def test_onnx_agrees_with_pytorch(exported):
    checkpoint, output, printed = exported
    worst = float(re.search(r"largest difference (\S+),", printed).group(1))
    assert 0 <= worst <= 1e-4
    # The checked batches were the two images at the sizes the synthetic preprocessing gives them.
    assert "batch [1, 3, 89, 64]" in printed and "batch [1, 3, 64, 160]" in printed

    # Batch, height and width are free: a batch of 3 at yet another size, against PyTorch here.
    module = export_onnx.detection_module(load_detector(resume=str(checkpoint)).model)
    batch = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    assert export_onnx.largest_difference(module, output, [batch]) <= 1e-4

    import onnx

    graph_input = onnx.load(str(output)).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "images" and len(dims) == 4
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # symbolic: batch, height, width
    assert dims[1].dim_value == 3


def test_exit_status_says_whether_the_difference_is_tolerated(exported, monkeypatch):
    checkpoint, output, _ = exported
    # Skip the slow export: reuse the file, then check it against a tolerance nothing meets.
    monkeypatch.setattr(export_onnx, "export", lambda module, path: shutil.copy(output, path))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        status = export_onnx.main(
            ["--resume", str(checkpoint), "--output", str(output.with_name("again.onnx")), "--tolerance", "0"]
        )
    assert status == 1 and "ABOVE the tolerance" in printed.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_onnx.main(["--resume", str(checkpoint), "--output", str(output.with_name("again.onnx"))]) == 0


@pytest.mark.parametrize("width", ["1", "0.5"])  # the demo's ResNet-18 where bfloat16 is native, and elsewhere
def test_demo_checkpoint_exports(tmp_path, width):
    checkpoint = demo_checkpoint(tmp_path / "demo.pth", tmp_path / "no_dataset", "--backbone_width", width)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    output = tmp_path / "demo.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        status = export_onnx.main(
            ["--resume", str(checkpoint), "--output", str(output), "--check", str(tmp_path / "a.png")]
        )
    assert status == 0, printed.getvalue()
    assert 0 <= float(re.search(r"largest difference (\S+),", printed.getvalue()).group(1)) <= 1e-4
    assert "batch [1, 3, 170, 128]" in printed.getvalue()  # the synthetic preprocessing: shorter side 128

    import onnxruntime

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": np.zeros((2, 3, 128, 160), dtype=np.float32)})
    assert logits.shape == (2, 20, 7) and boxes.shape == (2, 20, 4)  # 20 queries, 6 classes and "no object"


def test_bad_inputs(tmp_path):
    with pytest.raises(SystemExit, match="not an entry point"):
        export_onnx.main(["--hub", "detr_r50", "--output", str(tmp_path / "x.onnx")])
    with pytest.raises(SystemExit, match="does not exist"):
        export_onnx.main(["--resume", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "x.onnx")])


def test_torch_versions_the_exporter_needs():
    assert export_onnx.torch_exports_onnx("2.10.0")
    assert export_onnx.torch_exports_onnx("2.14.1+cu130")
    assert export_onnx.torch_exports_onnx("3.0.0")
    assert not export_onnx.torch_exports_onnx("2.9.1+cpu")
    assert not export_onnx.torch_exports_onnx("2.4.1")
