"""Positional encodings of the backbone's feature map: fixed sine/cosine, or learned row/column embeddings."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """The sine/cosine encoding of "Attention is all you need", extended to 2-D images.

    Half of the channels encode y, half encode x. Positions are counted over the unpadded pixels only (a
    cumulative sum of the inverted padding mask), so padding a batch does not move the encoding of an image.
    """

    def __init__(
        self, num_pos_feats: int = 64, temperature: int = 10000, normalize: bool = False, scale: Optional[float] = None
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        mask = tensor_list.mask
        assert mask is not None
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # Divide by the image's own extent (the last cumsum value), so positions span [0, scale].
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave: even channels take sin, odd channels cos, of the same frequency.
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embeddings for up to 50 rows and 50 columns, concatenated as (x, y)."""

    def __init__(self, num_pos_feats: int = 256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(f"PositionEmbeddingLearned covers feature maps up to 50x50, got {h}x{w}")
        cols = self.col_embed(torch.arange(w, device=x.device))  # [W, F]
        rows = self.row_embed(torch.arange(h, device=x.device))  # [H, F]
        pos = torch.cat(
            [cols.unsqueeze(0).expand(h, w, cols.shape[-1]), rows.unsqueeze(1).expand(h, w, rows.shape[-1])], dim=-1
        )
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(args) -> nn.Module:
    """The encoding chosen by --position_embedding, with hidden_dim // 2 channels per axis."""
    n_steps = args.hidden_dim // 2
    if args.position_embedding in ("v2", "sine"):
        return PositionEmbeddingSine(n_steps, normalize=True)
    if args.position_embedding in ("v3", "learned"):
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(f"--position_embedding must be 'sine' or 'learned', got {args.position_embedding!r}")
