"""Tests of tools/benchmark.py (its tiny mode end to end, its model flags, its COCO evaluation data) and
util/benchmark.py (timing, table)."""

import contextlib
import importlib.util
import json

import numpy as np
import pytest
import torch

import main as main_py
from helpers import REPO_ROOT
from util import amp
from util.benchmark import ratio_table, time_interleaved


def load_tool():
    """tools/benchmark.py as a module (a script, so not importable by name)."""
    spec = importlib.util.spec_from_file_location("benchmark_tool", REPO_ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.mark.slow
def test_tiny_mode_writes_every_row_and_mode(tool, tmp_path, capsys):
    output = tmp_path / "benchmark.json"
    modes = ["exact", "fast", "channels_last", "amp", "amp+channels_last"]
    # bfloat16 asked for by name: the amp modes then differ from fp32 on every CPU kind (emulated where not native).
    with pytest.warns(UserWarning) if not amp.native_dtypes(torch.device("cpu")) else contextlib.nullcontext():
        tool.main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--modes",
                ",".join(modes),
                "--amp_dtype",
                "bfloat16",
                "--output",
                str(output),
            ]
        )
    results = json.loads(output.read_text())
    # The hardware is named: the CPU's model, torch's capability, native bfloat16 or not.
    hardware = results["hardware"]
    assert hardware["name"] == amp.cpu_name() and hardware["capability"] == torch.backends.cpu.get_cpu_capability()
    assert hardware["native_bfloat16"] == (torch.bfloat16 in amp.native_dtypes(torch.device("cpu")))
    assert results["amp_dtype"] == "bfloat16"
    assert f"torch capability {hardware['capability']}" in results["machine"]
    assert list(results["modes"]) == modes
    assert (
        results["modes"]["fast"]["main_py_flags"] == "--fast"
        and results["modes"]["exact"]["main_py_flags"] == "--exact"
    )
    for row in ("inference", "train"):
        for mode in modes:
            timing = results["rows"][row][mode]
            assert len(timing["times_s"]) == 1 and timing["best_s"] == min(timing["times_s"]) > 0
    assert "GPU" in results["rows"]["throughput"]["skipped"]
    # Same weights: the fast path within 1e-4 of the exact one but not equal to it; bfloat16 within its precision.
    diffs = {m: results["modes"][m]["inference_max_abs_diff"] for m in modes}
    assert diffs["exact"] == 0.0
    assert 0.0 < diffs["fast"] <= 1e-4 and 0.0 < diffs["channels_last"] <= 1e-4
    assert 1e-4 < diffs["amp"] < 0.5 and 1e-4 < diffs["amp+channels_last"] < 0.5
    coco = results["rows"]["coco_eval"]
    assert coco["num_images"] == 16 and coco["stats_equal"] and coco["pycocotools_s"] > 0
    pipeline = results["rows"]["pipeline"]
    assert pipeline["train_images_per_s"] > 0 and pipeline["val_images_per_s"] > 0
    # The printed table: the exact path in seconds, the others as multiples of its speed.
    printed = capsys.readouterr().out
    assert "| mode | inference | train step | note |" in printed
    assert f"| exact | {results['rows']['inference']['exact']['best_s']:.3f} s |" in printed
    ratio = results["rows"]["train"]["exact"]["best_s"] / results["rows"]["train"]["fast"]["best_s"]
    assert "| fast | " in printed and f" {ratio:.2f}x |" in printed
    assert results["table"] in printed


def test_unavailable_optional_mode_is_a_note_not_a_failure(tool, tmp_path, monkeypatch):
    def no_transformers(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'transformers'")

    monkeypatch.setattr(tool, "HuggingFaceMode", no_transformers)
    results = tool.main(
        ["--tiny", "--device", "cpu", "--modes", "hf", "--skip", "inference,throughput,train,coco_eval,pipeline"]
    )
    assert list(results["modes"]) == ["exact", "hf"]
    assert results["modes"]["hf"]["note"] == "skipped: ModuleNotFoundError: No module named 'transformers'"


class SimulatedDynamoError(RuntimeError):
    pass


SimulatedDynamoError.__module__ = "torch._dynamo.exc"


@pytest.mark.parametrize("outcome", ["compiled", "recompile_limit", "compile_fails"])
def test_the_compiled_rows_say_whether_the_compiled_graph_ran(tool, monkeypatch, capsys, outcome):
    """torch.compile stood in for by a twin that counts as dynamo would (a real compilation takes minutes here)."""
    import util.compile

    counts = {"frames_compiled": 0, "frames_failed": 0, "recompiles": 0, "recompile_limit_hits": 0}

    def stand_in_compile(model, **kwargs):
        def call(samples):
            if outcome == "compile_fails":
                raise SimulatedDynamoError("simulated failure")
            # A graph for the first call and each mode (eval, train): the second is a recompilation.
            mode = "train" if model.training else "eval"
            if mode not in compiled_for:
                counts["frames_compiled"] += 1
                counts["recompiles"] += len(compiled_for)
                compiled_for.add(mode)
            elif outcome == "recompile_limit" and mode == "train":
                counts["recompile_limit_hits"] += 1
            return model(samples)

        compiled_for = set()
        return call

    monkeypatch.setattr(util.compile.shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(util.compile.torch, "compile", stand_in_compile)
    monkeypatch.setattr(tool, "compile_counts", lambda: dict(counts))
    monkeypatch.setattr(util.compile, "compile_counts", lambda: dict(counts))
    results = tool.main(["--tiny", "--device", "cpu", "--modes", "compiled", "--skip", "throughput,coco_eval,pipeline"])
    inference, train = results["rows"]["inference"]["compiled"], results["rows"]["train"]["compiled"]
    assert "compiled_graph_ran" not in results["rows"]["inference"]["exact"]
    printed = capsys.readouterr().out
    if outcome == "compiled":
        assert inference["compiled_graph_ran"] and train["compiled_graph_ran"]
        assert (inference["recompiles"], train["recompiles"]) == (0, 1)
        assert "ran eagerly" not in results["table"]
    elif outcome == "recompile_limit":
        assert inference["compiled_graph_ran"] and not train["compiled_graph_ran"]
        assert train["recompile_limit_hits"] == 1  # the timed call, after the warm-up call that compiled
        assert train["eager_because"] == "1 call(s) hit the recompile limit"
        assert "ran eagerly in part: 1 call(s) hit the recompile limit" in results["table"]
        assert "--compile: torch.compile reached its recompile limit" in printed
    else:
        assert not inference["compiled_graph_ran"] and not train["compiled_graph_ran"]
        assert inference["eager_because"].startswith("torch.compile failed in the forward pass (SimulatedDynamoError")
        assert "EAGER: torch.compile failed in the forward pass" in printed


def test_unknown_mode_is_refused(tool):
    with pytest.raises(SystemExit, match="--modes: unknown \\['fastest'\\]"):
        tool.main(["--tiny", "--modes", "exact,fastest"])


def test_model_flags_are_main_py_defaults(tool):
    defaults = vars(main_py.get_args_parser().parse_args([]))
    bargs = tool.get_args_parser().parse_args(["--device", "cpu"])
    assert bargs.backbone == defaults["backbone"] == "resnet50"
    model = vars(tool.model_args(bargs))
    assert model.keys() == defaults.keys()
    differing = {k: (v, defaults[k]) for k, v in model.items() if defaults[k] != v}
    # Random weights, nothing downloaded, on the benchmark's device: the deliberate differences.
    assert differing == {"backbone_weights": ("none", "imagenet"), "device": ("cpu", "cuda")}
    tiny = vars(tool.model_args(tool.get_args_parser().parse_args(["--device", "cpu", "--tiny"])))
    assert {k for k in tiny if tiny[k] != model[k]} == set(tool.TINY_MODEL)
    # No copy of a main.py default is left in the tool: it reads them from main.py's parser.
    assert not hasattr(tool, "MODEL_DEFAULTS")


def test_synthetic_detections_and_the_coco_evaluation_timing(tool):
    coco_gt, predictions = tool.synthetic_coco_detections(num_images=60, dets_per_image=30, seed=1)
    assert all(len(p["scores"]) == 30 for p in predictions.values())
    assert not coco_gt.imgToAnns[50] and len(coco_gt.getCatIds()) == 80  # every 50th image has no objects
    areas = np.array([ann["area"] for ann in coco_gt.anns.values()])
    assert (areas < 32**2).any() and (areas > 96**2).any()

    timing = tool.time_coco_evaluation(num_images=40, dets_per_image=30, seed=2, repeats=2)
    assert timing["stats_equal"] and timing["max_abs_diff"] <= 1e-12
    assert timing["pycocotools_s"] > 0 and timing["evaluator_s"] > 0
    assert timing["speedup"] == pytest.approx(timing["pycocotools_s"] / timing["evaluator_s"])
    assert timing["cpu_speedup"] == pytest.approx(timing["pycocotools_cpu_s"] / timing["evaluator_cpu_s"])
    assert 0.05 < timing["pycocotools_stats"][0] < 0.95 and len(timing["evaluator_stats"]) == 12


def test_the_pipeline_row_compares_the_pil_path_with_torchvision_on_the_same_decisions(tool):
    pipeline = tool.benchmark_data_pipeline(3, seed=0)
    assert pipeline["image_sizes"] == ["480x640", "640x427", "640x480"] and pipeline["threads"] == 1
    assert pipeline["train_images_per_s"] > 0 and pipeline["val_images_per_s"] > 0
    decode, tensor = pipeline["decode"], pipeline["tensor_path"]
    assert decode["pil_images_per_s"] > 0 and decode["decode_jpeg_images_per_s"] > 0
    assert isinstance(decode["equal"], bool)
    # The tensor path draws the same random numbers: every image comes out of the same size as through PIL.
    assert tensor["same_sizes"]
    # Its pixels differ only where the two resizes round apart: by a level or two of 255, after normalization.
    assert 0 <= tensor["max_abs_diff"] <= 2.01 / 255 / min(0.229, 0.224, 0.225)
    assert pipeline["train_images_per_cpu_s"] > 0 and tensor["tensor_val_images_per_cpu_s"] > 0
    assert 0 <= tensor["differing_fraction"] < 0.05
    assert tensor["equal"] == (tensor["max_abs_diff"] == 0)


def test_tensor_transform_takes_the_pil_pipelines_decisions(tool):
    import random

    from PIL import Image

    from datasets.coco import make_coco_transforms
    from datasets.transforms import RandomPad

    image = torch.randint(0, 256, (3, 427, 640), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transforms = make_coco_transforms("train")
    sizes = set()
    for seed in range(8):
        random.seed(seed)
        torch.manual_seed(seed)
        expected = transforms(Image.fromarray(image.permute(1, 2, 0).numpy()), None)[0]
        random.seed(seed)
        torch.manual_seed(seed)
        assert tool.tensor_transform(transforms, image).shape == expected.shape, seed
        sizes.add(tuple(expected.shape))
    assert len(sizes) > 3  # decisions that differ from seed to seed, crops among them
    with pytest.raises(TypeError, match="no tensor form of RandomPad"):
        tool.tensor_transform(RandomPad(4), image)


def test_time_interleaved_runs_rounds_and_keeps_the_best(monkeypatch):
    import util.benchmark as timing

    calls = []
    fake_seconds = iter([5.0, 6.0, 3.0, 2.0, 1.0, 4.0])  # the warm-ups (a, b), then two rounds of (a, b)

    def fake_time_call(function, device):
        function()
        return next(fake_seconds)

    monkeypatch.setattr(timing, "time_call", fake_time_call)
    results = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), repeats=2
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert results["a"] == {"times_s": [3.0, 1.0], "first_call_s": 5.0, "best_s": 1.0, "median_s": 3.0}
    assert results["b"]["times_s"] == [2.0, 4.0] and results["b"]["best_s"] == 2.0


def test_ratio_table_gives_speed_as_multiples_of_the_baseline():
    rows = [{"name": "exact", "inference": 1.0, "train": 2.0}, {"name": "fast", "inference": 0.5, "train": None}]
    assert ratio_table(rows, ["inference", "train"], "exact", {"fast": "note"}).splitlines() == [
        "| mode | inference | train | note |",
        "| --- | --- | --- | --- |",
        "| exact | 1.000 s | 2.000 s |  |",
        "| fast | 2.00x | - | note |",
    ]
