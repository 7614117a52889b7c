"""The benchmark runs end to end (smoke mode) and its token-identity check holds: it exits non-zero when our
generations differ from transformers'. Timings are not asserted: speed is reported by the benchmark, not tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_generation_benchmark_quick_run(tmp_path):
    out = tmp_path / "generation.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_generation.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| tiny-opt" in proc.stdout and "ratio" in proc.stdout
    result = json.loads(out.read_text())
    assert result, "the benchmark wrote no results"


@pytest.mark.slow
def test_training_benchmark_quick_run(tmp_path):
    out = tmp_path / "training.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert all(entry["fp32_cache_loss_identical"] for entry in result["results"])


@pytest.mark.slow
def test_towers_real_width_check_quick_run(tmp_path):
    """The bring-your-own-towers check (SigLIP + Qwen2 through stage1.py, stage2.py and the CLI) at tiny widths: it
    exits non-zero when a phase fails, a step is skipped as non-finite or the encoder gives other than 729 tokens."""
    out = tmp_path / "towers.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "check_towers_real_width.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| stage 1 (1 step) |" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["phase"].split(" (")[0] for r in results[:3]] == ["stage 1", "stage 2", "stage 2, chat template"]
    assert all(r["peak_rss_mib"] > 0 and r["trained_parameters"] > 0 for r in results[:3])
    assert results[0]["image_tokens"] == 729 and results[0]["queries"] == 32
