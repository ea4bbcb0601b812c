"""tools/gpu_check.py: every stage runs to its end on the CPU (--tiny), each timed apart and reported in one JSON
entry; a stage that fails or runs out of time does not stop the others, and the whole check keeps to its budget."""

import importlib.util
import json

import pytest

from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", REPO_ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_stage_runs_to_its_end_on_the_cpu(tool, tmp_path):
    assert tool.main(["--device", "cpu", "--tiny", "--output_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = results["stages"]
    assert list(stages) == [*tool.STAGES, "memory"]
    for name, stage in stages.items():
        assert stage["ok"], (name, stage.get("error"))
        assert name == "memory" or stage["seconds"] > 0
    assert "torch " in stages["environment"]["figures"]["line"]
    inference = stages["inference"]["figures"]
    for mode in ("fp32", "bf16", "fp16", "fast"):
        assert inference[mode]["ms_per_image_b2"] > 0 and inference[mode]["ms_per_image_b8"] > 0, mode
    assert inference["fp32"]["max_box_difference_from_fp32"] == 0.0
    assert 0 < inference["fast"]["max_box_difference_from_fp32"] <= 1e-4
    for dtype in ("bfloat16", "float16"):
        train = stages[f"train_{dtype}"]["figures"]
        assert train["steps"] == 12 and train["loss_last"] < train["loss_first"]
        assert train["skipped_steps"] == 0 if dtype == "bfloat16" else train["skipped_steps"] < train["steps"]
    assert stages["torchrun"]["figures"]["logged_epochs"] == [0, 1]
    assert stages["torchrun"]["figures"]["backend"] == "gloo"
    compiled = stages["compiled"]["figures"]
    assert compiled["fallback"] is None and compiled["recompile_limit_hits"] == 0 and compiled["ms_per_image_b8"] > 0
    memory = stages["memory"]["figures"]["peak_memory_mb"]
    assert set(memory) == set(tool.STAGES) and all(mb > 0 for mb in memory.values())


def test_a_stage_out_of_time_is_ended_and_the_next_still_runs(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tool.TIME_LIMITS, "environment", 0.01)
    monkeypatch.setitem(tool.TIME_LIMITS, "inference", 0.01)
    argv = ["--device", "cpu", "--tiny", "--output_dir", str(tmp_path), "--stages", "environment,inference"]
    assert tool.main(argv) == 1
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert list(stages) == ["environment", "inference", "memory"]
    for name in ("environment", "inference"):
        assert not stages[name]["ok"] and stages[name]["error"] == "timed out after 0 s", name
    assert stages["memory"] == {"ok": False, "seconds": 0.0, "error": "no stage reported its memory"}
    assert "[inference] FAILED: timed out" in capsys.readouterr().out


def test_a_spent_budget_leaves_the_remaining_stages_unrun(tool, tmp_path):
    assert tool.main(["--device", "cpu", "--tiny", "--output_dir", str(tmp_path), "--budget_s", "0"]) == 1
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert [stages[name]["error"] for name in tool.STAGES] == ["not run: the 0 s budget was spent"] * len(tool.STAGES)


def test_an_unknown_stage_is_refused(tool, tmp_path):
    with pytest.raises(SystemExit, match="--stages: unknown \\['warp'\\]"):
        tool.main(["--device", "cpu", "--output_dir", str(tmp_path), "--stages", "environment,warp"])
