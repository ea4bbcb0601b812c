"""Timing for tools/benchmark.py: synchronized wall-clock timing of several variants in interleaved rounds, and
the table of their ratios. Nothing here knows DETR; the tool supplies the functions to time."""

import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `function` takes, queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    functions: Dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> Dict[str, Dict[str, Any]]:
    """Time each function `repeats` times, after `warmup` untimed calls each (the first: allocation, oneDNN
    primitive creation, compilation), in rounds that call every function once: on a machine that others share,
    a burst of load then slows all of them alike instead of one. Returns per name {'best_s', 'median_s',
    'times_s', 'first_call_s'} ('best_s' is what ratios use: the least disturbed run)."""
    results: Dict[str, Dict[str, Any]] = {name: {"times_s": [], "first_call_s": None} for name in functions}
    for name, function in functions.items():
        for i in range(warmup):
            seconds = time_call(function, device)
            if i == 0:
                results[name]["first_call_s"] = seconds
    for _ in range(repeats):
        for name, function in functions.items():
            results[name]["times_s"].append(time_call(function, device))
    for result in results.values():
        times = sorted(result["times_s"])
        result["best_s"] = times[0]
        result["median_s"] = times[len(times) // 2]
    return results


def ratio_table(
    rows: Sequence[Dict[str, Any]], columns: Sequence[str], baseline: str, notes: Optional[Dict[str, str]] = None
) -> str:
    """A Markdown table: one line per row {'name', <column>: seconds or None}, each cell the row's speed as a
    multiple of the `baseline` row's in that column (2.00x: twice as fast), with the baseline's own seconds on its
    line; missing cells read as '-'. `notes` adds a last column."""
    base = next(row for row in rows if row["name"] == baseline)
    header = ["mode"] + list(columns) + (["note"] if notes else [])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["name"]]
        for column in columns:
            seconds, reference = row.get(column), base.get(column)
            if seconds is None or reference is None:
                cells.append("-")
            elif row["name"] == baseline:
                cells.append(f"{seconds:.3f} s")
            else:
                cells.append(f"{reference / seconds:.2f}x")
        if notes:
            cells.append(notes.get(row["name"], ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
