"""The COCO panoptic colour encoding of segment ids: id = R + 256 * G + 256^2 * B."""

import numpy as np


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> colours [H, W, 3] uint8."""
    id_map = np.asarray(id_map).astype(np.int64)
    return np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536 % 256], axis=-1).astype(np.uint8)


def rgb2id(color: np.ndarray) -> np.ndarray:
    """Colours [H, W, 3] -> segment ids [H, W] (int64)."""
    color = np.asarray(color).astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 65536 * color[..., 2]
