"""DETR in detectron2: the meta-architecture Detr (registered on import), its config keys and data mapper."""

from .config import add_detr_config
from .dataset_mapper import DetrDatasetMapper
from .detr import Detr

__all__ = ["add_detr_config", "Detr", "DetrDatasetMapper"]
