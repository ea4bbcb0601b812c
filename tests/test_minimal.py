"""docs/detr_minimal.py: the one-page DETR has DETR's output shapes, is deterministic in eval mode, and its
command runs on an image from docs/, where it lives."""

import contextlib
import importlib.util
import io
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "docs" / "detr_minimal.py"
# docs/ is no package: load the file itself, as `python docs/detr_minimal.py` runs it.
_spec = importlib.util.spec_from_file_location("detr_minimal", SCRIPT)
detr_minimal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(detr_minimal)
MinimalDETR = detr_minimal.MinimalDETR


def small_model(**kwargs):
    torch.manual_seed(0)
    return MinimalDETR(
        num_classes=5, hidden_dim=32, nheads=2, num_encoder_layers=1, num_decoder_layers=1, num_queries=8, **kwargs
    )


def test_output_shapes_and_ranges():
    model = small_model().eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outputs = model(images)
    assert outputs["pred_logits"].shape == (2, 8, 6)  # 5 classes + "no object"
    assert outputs["pred_boxes"].shape == (2, 8, 4)
    assert ((outputs["pred_boxes"] > 0) & (outputs["pred_boxes"] < 1)).all()


def test_positions_say_row_and_column():
    model = small_model()
    positions = model.positions(2, 3).detach()  # a 2 x 3 grid, row-major as features.flatten(2) orders it
    assert positions.shape == (6, 32)
    cell = 1 * 3 + 2  # row 1, column 2
    assert torch.equal(positions[cell], torch.cat([model.col_embed[2], model.row_embed[1]]).detach())


def test_eval_is_deterministic_and_train_is_not():
    model = small_model()
    images = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        first, second = model(images), model(images)
    assert torch.equal(first["pred_logits"], second["pred_logits"])
    assert torch.equal(first["pred_boxes"], second["pred_boxes"])
    model.train()  # dropout 0.1 in the transformer
    with torch.no_grad():
        noisy = model(images)
    assert not torch.equal(first["pred_logits"], noisy["pred_logits"])


def test_top_predictions_in_pixels():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 2] = 10.0  # query 1: class 2, sure
    logits[0, 0, 0] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.2], [0.5, 0.5, 1.0, 1.0]]])
    top = detr_minimal.top_predictions({"pred_logits": logits, "pred_boxes": boxes}, width=200, height=100, k=2)
    score, label, box = top[0]
    assert label == 2 and score > 0.99
    assert np.allclose(box, (0, 40, 100, 60))
    assert top[1][1] == 0


def test_command_runs_with_saved_weights(tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(image)
    torch.manual_seed(0)
    weights = tmp_path / "minimal.pth"
    torch.save(MinimalDETR().state_dict(), weights)
    argv = [str(image), "--weights", str(weights), "--size", "64", "--top", "3"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        detr_minimal.main(argv)
    lines = printed.getvalue().splitlines()
    assert "80x48, 100 queries; the top 3" in lines[0]
    assert len(lines) == 4 and all(line.strip().startswith("score") for line in lines[1:])
    # The command as a reader runs it, from another folder: the same weights and image, the same predictions.
    command = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert command.returncode == 0, command.stderr
    assert command.stdout == printed.getvalue()
