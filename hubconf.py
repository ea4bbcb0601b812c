"""torch.hub entry points: `torch.hub.load('<this repo or a local clone>', 'detr_resnet50', pretrained=True)`.

`pretrained` is False (random weights, nothing downloaded, no ImageNet backbone either), True (the published
checkpoint, its hash checked) or the path of a local copy of that checkpoint.
"""

from typing import Union

from models.backbone import Backbone, Joiner
from models.detr import DETR, PostProcess
from models.position_encoding import PositionEmbeddingSine
from models.segmentation import DETRsegm, PostProcessPanoptic
from models.transformer import Transformer
from util.checkpoint import load_checkpoint, load_state_dict_checked, model_state_from
from util.misc import coco_panoptic_is_thing_map

dependencies = ["torch", "torchvision"]

URLS = {
    "detr_resnet50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_resnet50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_resnet101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_resnet101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
    "detr_resnet50_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth",
    "detr_resnet50_dc5_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-panoptic-da08f1b1.pth",
    "detr_resnet101_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r101-panoptic-40021d53.pth",
}


def _make_detr(backbone_name: str, dilation: bool = False, num_classes: int = 91, mask: bool = False):
    hidden_dim = 256
    # No ImageNet weights: a published checkpoint overwrites them, and pretrained=False must stay offline.
    backbone = Backbone(
        backbone_name, train_backbone=True, return_interm_layers=mask, dilation=dilation, weights="none"
    )
    joiner = Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
    joiner.num_channels = backbone.num_channels
    transformer = Transformer(d_model=hidden_dim, return_intermediate_dec=True)
    detr = DETR(joiner, transformer, num_classes=num_classes, num_queries=100)
    if mask:
        return DETRsegm(detr)
    return detr


def _load_pretrained(model, entry: str, pretrained: Union[bool, str]) -> None:
    if pretrained is False or pretrained is None:
        return
    source = URLS[entry] if pretrained is True else str(pretrained)
    checkpoint = load_checkpoint(source, check_hash=pretrained is True)
    load_state_dict_checked(model, model_state_from(checkpoint, source), source)


def _detection(entry, backbone_name, dilation, pretrained, num_classes, return_postprocessor):
    model = _make_detr(backbone_name, dilation=dilation, num_classes=num_classes)
    _load_pretrained(model, entry, pretrained)
    return (model, PostProcess()) if return_postprocessor else model


def _panoptic(entry, backbone_name, dilation, pretrained, num_classes, threshold, return_postprocessor):
    model = _make_detr(backbone_name, dilation=dilation, num_classes=num_classes, mask=True)
    _load_pretrained(model, entry, pretrained)
    if return_postprocessor:
        return model, PostProcessPanoptic(coco_panoptic_is_thing_map(), threshold=threshold)
    return model


def detr_resnet50(pretrained: Union[bool, str] = False, num_classes: int = 91, return_postprocessor: bool = False):
    """DETR R50: 42.0 box AP on COCO val5k."""
    return _detection("detr_resnet50", "resnet50", False, pretrained, num_classes, return_postprocessor)


def detr_resnet50_dc5(pretrained: Union[bool, str] = False, num_classes: int = 91, return_postprocessor: bool = False):
    """DETR-DC5 R50 (dilated last stage): 43.3 box AP on COCO val5k."""
    return _detection("detr_resnet50_dc5", "resnet50", True, pretrained, num_classes, return_postprocessor)


def detr_resnet101(pretrained: Union[bool, str] = False, num_classes: int = 91, return_postprocessor: bool = False):
    """DETR R101: 43.5 box AP on COCO val5k."""
    return _detection("detr_resnet101", "resnet101", False, pretrained, num_classes, return_postprocessor)


def detr_resnet101_dc5(pretrained: Union[bool, str] = False, num_classes: int = 91, return_postprocessor: bool = False):
    """DETR-DC5 R101: 44.9 box AP on COCO val5k."""
    return _detection("detr_resnet101_dc5", "resnet101", True, pretrained, num_classes, return_postprocessor)


def detr_resnet50_panoptic(
    pretrained: Union[bool, str] = False,
    num_classes: int = 250,
    threshold: float = 0.85,
    return_postprocessor: bool = False,
):
    """Panoptic DETR R50: 43.4 PQ on COCO panoptic val5k."""
    return _panoptic(
        "detr_resnet50_panoptic", "resnet50", False, pretrained, num_classes, threshold, return_postprocessor
    )


def detr_resnet50_dc5_panoptic(
    pretrained: Union[bool, str] = False,
    num_classes: int = 250,
    threshold: float = 0.85,
    return_postprocessor: bool = False,
):
    """Panoptic DETR-DC5 R50: 44.6 PQ on COCO panoptic val5k."""
    return _panoptic(
        "detr_resnet50_dc5_panoptic", "resnet50", True, pretrained, num_classes, threshold, return_postprocessor
    )


def detr_resnet101_panoptic(
    pretrained: Union[bool, str] = False,
    num_classes: int = 250,
    threshold: float = 0.85,
    return_postprocessor: bool = False,
):
    """Panoptic DETR R101: 45.1 PQ on COCO panoptic val5k."""
    return _panoptic(
        "detr_resnet101_panoptic", "resnet101", False, pretrained, num_classes, threshold, return_postprocessor
    )
