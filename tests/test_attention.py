"""tools/attention.py: the attention weights captured by the hooks, and the two pictures."""

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tool_checkpoints import run_tool, tiny_checkpoint
from tools import attention
from tools.detector import load_detector


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory):
    return tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny.pth", synthetic_root, box=(0.5, 0.5, 0.4, 0.4), label=3
    )


def test_hooks_capture_the_last_layers_attention(checkpoint):
    detector = load_detector(resume=str(checkpoint))
    model = detector.model
    image = torch.randn(3, 64, 96)  # a 2 x 3 feature map at stride 32
    maps = attention.capture_attention(model, image)
    assert maps.decoder.shape == (8, 2, 3)  # 8 queries
    assert maps.encoder.shape == (2, 3, 2, 3)
    # Softmax weights: each query's (each cell's) attention sums to one over the feature map.
    assert torch.allclose(maps.decoder.sum((1, 2)), torch.ones(8), atol=1e-5)
    assert torch.allclose(maps.encoder.sum((2, 3)), torch.ones(2, 3), atol=1e-5)
    # Hooks leave the outputs alone and are gone afterwards.
    with torch.no_grad():
        plain = model([image])
    assert torch.equal(plain["pred_boxes"], maps.outputs["pred_boxes"])
    layer = model.transformer.decoder.layers[-1].multihead_attn
    assert not layer._forward_hooks and not model.transformer.encoder.layers[-1].self_attn._forward_hooks

    # Keys that ignore the image (zero key projection) make every query attend uniformly: 1/6 per cell.
    d = model.transformer.d_model
    with torch.no_grad():
        layer.in_proj_weight[d : 2 * d] = 0
        layer.in_proj_bias[d : 2 * d] = 0
    uniform = attention.capture_attention(model, image)
    assert torch.allclose(uniform.decoder, torch.full((8, 2, 3), 1 / 6), atol=1e-6)


def test_feature_cell_of_a_pixel():
    # A 64 x 96 image over a 2 x 3 feature map: cells of 32 x 32 pixels.
    assert attention.feature_cell((0, 0), (64, 96), (2, 3)) == (0, 0)
    assert attention.feature_cell((40, 10), (64, 96), (2, 3)) == (0, 1)
    assert attention.feature_cell((95.9, 63.9), (64, 96), (2, 3)) == (1, 2)
    assert attention.feature_cell((96, 64), (64, 96), (2, 3)) == (1, 2)  # the far border stays inside


def test_default_points_are_box_centres_one_per_cell():
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 24.0, 24.0], [60.0, 30.0, 90.0, 60.0]])
    # The first two centres, (10, 10) and (14, 14), lie in one 32 x 32 cell: only the first is kept.
    assert attention.default_points(boxes, 96, 64, (2, 3)) == [(10.0, 10.0), (75.0, 45.0)]
    assert len(attention.default_points(torch.zeros(0, 4), 96, 64, (2, 3))) == 4


def test_command_writes_both_pictures(checkpoint, tmp_path):
    image = tmp_path / "shapes.png"
    pixels = np.zeros((80, 120, 3), np.uint8)
    pixels[20:60, 30:90] = (240, 200, 40)
    Image.fromarray(pixels).save(image)
    out = tmp_path / "out"
    # As a user runs it, from the repository root.
    command = run_tool(
        "attention.py",
        image,
        "--resume",
        checkpoint,
        "--output_dir",
        out,
        "--points",
        "10,10",
        "100,70",
        "--device",
        "cpu",
    )
    assert command.returncode == 0, command.stderr
    assert "8 object(s)" in command.stdout  # every query of the fixed model scores 0.9975
    for name in ("shapes_decoder_attention.png", "shapes_encoder_attention.png"):
        picture = np.asarray(Image.open(out / name).convert("RGB"))
        assert picture.shape[0] > 200 and picture.shape[1] > 400
        assert picture.std() > 10  # not a blank canvas
    # 8 queries: two rows of four panels; 2 points plus the image: one row of three.
    decoder = Image.open(out / "shapes_decoder_attention.png")
    encoder = Image.open(out / "shapes_encoder_attention.png")
    assert decoder.height > 1.5 * encoder.height


def test_bad_inputs(checkpoint, tmp_path):
    image = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    with pytest.raises(SystemExit, match="outside"):
        attention.main([str(image), "--resume", str(checkpoint), "--points", "60,10"])
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="cannot read image"):
        attention.main([str(tmp_path / "broken.png"), "--resume", str(checkpoint)])
    with pytest.raises(SystemExit, match="not an entry point"):
        attention.main([str(image), "--hub", "detr_resnet5"])


def test_two_stage_model_without_encoder_layers(synthetic_root, tmp_path):
    """The synthetic detection defaults (--two_stage --enc_layers 0): the decoder's attention is captured and
    drawn; there is no encoder attention, which the command says instead of failing."""
    checkpoint = tiny_checkpoint(
        tmp_path / "two_stage.pth", synthetic_root, "--two_stage", "--enc_layers", "0", "--feature_stride", "16"
    )
    detector = load_detector(resume=str(checkpoint))
    maps = attention.capture_attention(detector.model, torch.randn(3, 64, 96))  # 4 x 6 at stride 16
    assert maps.encoder is None
    assert maps.decoder.shape == (8, 4, 6)
    assert torch.allclose(maps.decoder.sum((1, 2)), torch.ones(8), atol=1e-5)
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 96, 3), 128, np.uint8)).save(image)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        status = attention.main(
            [
                str(image),
                "--resume",
                str(checkpoint),
                "--output_dir",
                str(tmp_path / "out"),
                "--threshold",
                "0",
                "--device",
                "cpu",
            ]
        )
    assert status == 0
    assert "no encoder picture" in printed.getvalue()
    assert (tmp_path / "out" / "grey_decoder_attention.png").exists()
    assert not (tmp_path / "out" / "grey_encoder_attention.png").exists()
