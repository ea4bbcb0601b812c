"""DETR models: build_model(args) -> (model, criterion, postprocessors)."""
from .detr import build


def build_model(args):
    """The model, its loss and its post-processors, from the parsed main.py flags."""
    return build(args)
