"""Shared by the tests: tiny model configurations, the spec folder, and a guard against network access."""
import os
import socket
import urllib.request
from typing import List

import torch

import main as main_py

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_DIR = os.path.join(REPO_ROOT, "..", "shared", "spec")

# A DETR small enough for 2 shared CPU cores: ResNet-18, width 32, 1 encoder and 2 decoder layers, 5 queries.
TINY_FLAGS = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
              "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
              "--num_queries", "5", "--dropout", "0.0"]


def tiny_args(*extra: str):
    """main.py's parsed flags for the tiny model; `extra` flags are appended and override the defaults."""
    return main_py.get_args_parser().parse_args(TINY_FLAGS + list(extra))


def tiny_model(*extra: str, seed: int = 0):
    """(model, criterion, postprocessors) of build_model(tiny_args(*extra)), with a fixed seed."""
    from models import build_model
    torch.manual_seed(seed)
    return build_model(tiny_args(*extra))


class NetworkUsed(RuntimeError):
    pass


def block_network(monkeypatch, hub_cache: bool = False) -> List[str]:
    """Make every way out (sockets, urllib, torch.hub downloads) raise; returns the list of attempts made.

    With hub_cache, torch.hub.load_state_dict_from_url stays usable for files already in torch.hub's cache
    (it only downloads what is missing, and downloads are blocked)."""
    attempts: List[str] = []

    def refuse(what):
        def _refuse(*args, **kwargs):
            attempts.append(f"{what}{args[:2]}")
            raise NetworkUsed(f"test tried to use the network: {what}{args[:2]}")
        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urllib.request.urlopen"))
    monkeypatch.setattr(torch.hub, "urlopen", refuse("torch.hub.urlopen"), raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("torch.hub.download_url_to_file"))
    if not hub_cache:
        monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse("torch.hub.load_state_dict_from_url"))
    return attempts
