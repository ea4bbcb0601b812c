"""Tests of models/position_encoding.py: values at known positions, and independence from padding."""

import math

import pytest
import torch

from helpers import tiny_args
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding
from util.misc import NestedTensor


def unpadded(batch, h, w, channels=1):
    return NestedTensor(torch.zeros(batch, channels, h, w), torch.zeros(batch, h, w, dtype=torch.bool))


def padded_to(h, w, big_h, big_w):
    mask = torch.ones(1, big_h, big_w, dtype=torch.bool)
    mask[:, :h, :w] = False
    return NestedTensor(torch.zeros(1, 1, big_h, big_w), mask)


def expected_sine(y_pos, x_pos, num_pos_feats, temperature):
    """The encoding of one pixel written from the definition: channel pairs (2i, 2i+1) hold
    sin/cos(pos / temperature^(2i / num_pos_feats)); the first num_pos_feats channels encode y, the rest x."""
    values = []
    for pos in (y_pos, x_pos):
        for c in range(num_pos_feats):
            freq = temperature ** (2 * (c // 2) / num_pos_feats)
            values.append(math.sin(pos / freq) if c % 2 == 0 else math.cos(pos / freq))
    return torch.tensor(values)


def test_sine_unnormalized_values_at_known_positions():
    module = PositionEmbeddingSine(num_pos_feats=4, temperature=10000)
    pos = module(unpadded(2, 3, 5))
    assert pos.shape == (2, 8, 3, 5)
    for y, x in [(0, 0), (1, 3), (2, 4)]:
        # Positions count pixels from 1 (a cumulative sum of the unpadded mask).
        torch.testing.assert_close(pos[1, :, y, x], expected_sine(y + 1, x + 1, 4, 10000))
    # Spelled out for one pixel: channel 0 is sin(y), channel 2 is sin(y / 100) (10000^(2/4) = 100).
    assert pos[0, 0, 2, 1].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert pos[0, 2, 2, 1].item() == pytest.approx(math.sin(3.0 / 100), abs=1e-6)
    assert pos[0, 5, 2, 1].item() == pytest.approx(math.cos(2.0), abs=1e-6)


def test_sine_normalized_values_at_known_positions():
    h, w = 4, 6
    module = PositionEmbeddingSine(num_pos_feats=8, temperature=20, normalize=True)
    pos = module(unpadded(1, h, w))
    for y, x in [(0, 0), (3, 5), (1, 2)]:
        # Normalized positions run over (0, 2*pi]: (y + 1) / (h + eps) * 2*pi.
        y_norm = (y + 1) / (h + 1e-6) * 2 * math.pi
        x_norm = (x + 1) / (w + 1e-6) * 2 * math.pi
        torch.testing.assert_close(pos[0, :, y, x], expected_sine(y_norm, x_norm, 8, 20))
    # The last pixel sits at 2*pi on both axes: sin(2*pi) = 0 on the first channel of each half.
    assert pos[0, 0, h - 1, w - 1].item() == pytest.approx(0.0, abs=1e-5)
    assert pos[0, 8, h - 1, w - 1].item() == pytest.approx(0.0, abs=1e-5)


def test_sine_custom_scale():
    module = PositionEmbeddingSine(num_pos_feats=2, temperature=10000, normalize=True, scale=1.0)
    pos = module(unpadded(1, 2, 2))
    assert pos[0, 0, 0, 0].item() == pytest.approx(math.sin(0.5), abs=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(scale=1.0, normalize=False)


@pytest.mark.parametrize("normalize", [False, True])
def test_sine_padding_does_not_change_the_image_encoding(normalize):
    module = PositionEmbeddingSine(num_pos_feats=6, normalize=normalize)
    alone = module(unpadded(1, 3, 4))
    in_batch = module(padded_to(3, 4, 7, 9))
    torch.testing.assert_close(in_batch[:, :, :3, :4], alone)


def test_learned_embedding_concatenates_column_then_row():
    torch.manual_seed(0)
    module = PositionEmbeddingLearned(num_pos_feats=5)
    pos = module(unpadded(2, 3, 4, channels=7))
    assert pos.shape == (2, 10, 3, 4)
    for y in range(3):
        for x in range(4):
            torch.testing.assert_close(pos[1, :5, y, x], module.col_embed.weight[x])
            torch.testing.assert_close(pos[1, 5:, y, x], module.row_embed.weight[y])
    assert torch.equal(pos[0], pos[1])


def test_learned_embedding_is_trained_and_initialized_uniform():
    torch.manual_seed(0)
    module = PositionEmbeddingLearned(num_pos_feats=8)
    assert module.row_embed.weight.shape == module.col_embed.weight.shape == (50, 8)
    for w in (module.row_embed.weight.detach(), module.col_embed.weight.detach()):
        assert float(w.min()) >= 0.0 and float(w.max()) < 1.0
    module(unpadded(1, 2, 3)).sum().backward()
    # Only the rows/columns that were used receive a gradient.
    assert module.col_embed.weight.grad[:3].abs().sum() > 0 and module.col_embed.weight.grad[3:].abs().sum() == 0
    assert module.row_embed.weight.grad[:2].abs().sum() > 0 and module.row_embed.weight.grad[2:].abs().sum() == 0


def test_learned_embedding_rejects_feature_maps_over_50():
    with pytest.raises(ValueError, match="50x50"):
        PositionEmbeddingLearned(num_pos_feats=4)(unpadded(1, 51, 3))


@pytest.mark.parametrize(
    "name, cls",
    [
        ("sine", PositionEmbeddingSine),
        ("v2", PositionEmbeddingSine),
        ("learned", PositionEmbeddingLearned),
        ("v3", PositionEmbeddingLearned),
    ],
)
def test_build_position_encoding(name, cls):
    args = tiny_args("--hidden_dim", "48")
    args.position_embedding = name  # the flag's choices include all four
    module = build_position_encoding(args)
    assert type(module) is cls
    pos = module(unpadded(1, 2, 3))
    assert pos.shape == (1, 48, 2, 3)  # hidden_dim // 2 channels per axis
    if cls is PositionEmbeddingSine:
        assert module.normalize and module.scale == pytest.approx(2 * math.pi) and module.temperature == 10000


def test_build_position_encoding_rejects_unknown_names():
    args = tiny_args()
    args.position_embedding = "rotary"
    with pytest.raises(ValueError, match="rotary"):
        build_position_encoding(args)
