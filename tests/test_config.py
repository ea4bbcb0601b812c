"""util/config.py: one function fills a namespace from elsewhere with main.py's defaults, so that nothing reads a flag
with a default of its own; the architecture table that checkpoint loading and the Hugging Face conversion share."""

import argparse
import ast
import re
import subprocess
import sys

import pytest
import torch

import main as main_py
from helpers import ORIGINAL_FLAGS, REPO_ROOT, tiny_args, tiny_model
from tools.detector import checkpoint_args, load_detector
from util import hf
from util.checkpoint import architecture_differences
from util.config import architecture_flags, complete_args
from util.flags import defines_the_network
from util.hf import HFFolderError, write_hf_folder


def test_complete_args_fills_what_is_missing_and_keeps_the_rest():
    given = argparse.Namespace(hidden_dim=32, lr=5e-5, not_a_flag="kept")
    args = complete_args(given)
    defaults = vars(main_py.get_args_parser().parse_args([]))
    assert (args.hidden_dim, args.lr, args.not_a_flag) == (32, 5e-5, "kept")
    assert {k: getattr(args, k) for k in defaults if k not in ("hidden_dim", "lr")} == {
        k: v for k, v in defaults.items() if k not in ("hidden_dim", "lr")
    }
    assert args.thing_classes is None  # set by main.py from panoptic data, not a flag
    assert vars(given) == {"hidden_dim": 32, "lr": 5e-5, "not_a_flag": "kept"}  # a copy: the given one is untouched


def test_the_architecture_flags_are_those_main_py_marks():
    flags = architecture_flags()
    assert flags == (
        "backbone", "feature_stride", "backbone_width", "dilation", "position_embedding", "backbone_norm",
        "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "nheads", "num_queries", "pre_norm",
        "num_classes", "masks", "two_stage", "learned_queries",
    )  # fmt: skip
    assert set(hf.HF_ARCHITECTURE_FLAGS) <= set(flags)


def add_a_new_architecture_flag(monkeypatch):
    """main.py's parser with one more flag that defines the network, --new_width (default 1): the one edit of
    the flags a change of the model makes. Returns the new get_args_parser."""

    def get_args_parser():
        parser = original()
        defines_the_network(parser.add_argument("--new_width", default=1, type=int))
        return parser

    original = main_py.get_args_parser
    monkeypatch.setattr(main_py, "get_args_parser", get_args_parser)
    assert architecture_flags()[-1] == "new_width"
    return get_args_parser


def test_a_checkpoint_saved_before_a_new_flag_loads_at_its_default(tmp_path, monkeypatch):
    saved = tiny_args()
    path = tmp_path / "checkpoint.pth"
    model = tiny_model()[0]
    torch.save({"model": model.state_dict(), "args": saved, "epoch": 0}, path)
    get_args_parser = add_a_new_architecture_flag(monkeypatch)
    assert not hasattr(saved, "new_width") and tiny_args().new_width == 1

    # The tools' loader: the model is rebuilt with the flag at its default, and the weights load.
    detector = load_detector(resume=str(path))
    assert all(torch.equal(detector.model.state_dict()[k], v) for k, v in model.state_dict().items())
    args = checkpoint_args(torch.load(path, weights_only=False), model.state_dict(), str(path))
    assert args.new_width == 1 and args.hidden_dim == saved.hidden_dim

    # --resume (main.py compares the checkpoint's flags with the run's): the checkpoint is a model at the default, so
    # the same run resumes, and one with another value is told what differs.
    run = get_args_parser().parse_args([])
    for name in architecture_flags()[:-1]:  # all but the new flag, which the checkpoint predates
        setattr(run, name, getattr(saved, name))
    assert architecture_differences(saved, run) == []
    run.new_width = 2
    assert architecture_differences(saved, run) == ["--new_width: checkpoint 1, this run 2"]


def test_a_new_architecture_flag_converts_to_the_hf_layout_at_its_default_only(tmp_path, monkeypatch):
    model, saved = tiny_model()[0], tiny_args()
    add_a_new_architecture_flag(monkeypatch)
    write_hf_folder({"model": model.state_dict(), "args": saved}, tmp_path / "old")  # saved before the flag
    assert (tmp_path / "old" / "config.json").is_file()
    args = tiny_args("--new_width", "2")
    with pytest.raises(HFFolderError, match="ckpt.pth was trained with --new_width 2: .* --new_width 1 converts"):
        write_hf_folder({"model": model.state_dict(), "args": args}, tmp_path / "new", "ckpt.pth")
    assert not (tmp_path / "new").exists()


# No flag is read with a default of its own ---------------------------------------------------------------------

# A namespace of flags: args, saved_args, model_args, bargs, ...
NAMESPACE = re.compile(r"(^|_|b)args$")


def namespace_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def flags_read_with_a_default(source: str) -> list:
    """(line, flag) of every getattr(NS, flag, default), hasattr(NS, flag), vars(NS).get(flag) and
    NS.__dict__.get(flag) in `source`, NS being a namespace of flags by its name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func, first = node.func, node.args[0]
        flag = node.args[1] if len(node.args) > 1 else None
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) == 3:
            target = first
        elif isinstance(func, ast.Name) and func.id == "hasattr":
            target = first
        elif isinstance(func, ast.Attribute) and func.attr == "get":
            inner = func.value
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "vars":
                target, flag = inner.args[0] if inner.args else None, first
            elif isinstance(inner, ast.Attribute) and inner.attr == "__dict__":
                target, flag = inner.value, first
            else:
                continue
        else:
            continue
        if NAMESPACE.search(namespace_name(target)):
            found.append((node.lineno, flag.value if isinstance(flag, ast.Constant) else ast.unparse(flag)))
    return sorted(found)


def test_the_search_finds_each_way_of_reading_a_flag_with_a_default():
    source = """
x = getattr(args, "a", 1)
y = getattr(saved_args, name, None) or hasattr(model_args, "b")
z = vars(args).get("c", 2), args.__dict__.get("d"), bargs.__dict__.get("e", 0)
fine = getattr(args, "f"), getattr(model, "g", None), args.h, setattr(args, "i", 3)
"""
    assert flags_read_with_a_default(source) == [(2, "a"), (3, "b"), (3, "name"), (4, "c"), (4, "d"), (4, "e")]


def test_no_flag_is_read_with_a_default_outside_util_config():
    found = []
    for path in sorted(REPO_ROOT.rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative.split("/")[0] in ("tests", "outputs") or relative.startswith(".") or "/." in relative:
            continue
        if relative == "util/config.py" or relative.startswith(".venv") or relative.startswith("data/"):
            continue
        for line, flag in flags_read_with_a_default(path.read_text()):
            found.append(f"{relative}:{line} reads {flag} with a default")
    assert found == []


def test_util_config_reads_main_py_only_when_asked_for():
    # Importing it imports nothing of the project (torch.hub loads hubconf.py, which imports util/, without main.py's
    # dependencies); its one import of main.py, inside parser_defaults, takes the parser alone.
    code = "import sys, util.config, hubconf; print('main' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    imports = [
        node
        for node in ast.walk(ast.parse((REPO_ROOT / "util" / "config.py").read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "main"
    ]
    assert [[alias.name for alias in node.names] for node in imports] == [["get_args_parser"]]


def test_docs_flags_names_every_flag_the_project_adds():
    docs = (REPO_ROOT / "docs" / "flags.md").read_text()
    named = set(re.findall(r"--[\w-]+", docs))
    by_dest = {}
    for action in main_py.get_args_parser()._actions:
        if action.option_strings and action.dest != "help":
            by_dest.setdefault(action.dest, set()).update(action.option_strings)
    missing = sorted(dest for dest, options in by_dest.items() if dest not in ORIGINAL_FLAGS and not options & named)
    assert missing == []
    assert set(ORIGINAL_FLAGS) <= set(by_dest)
