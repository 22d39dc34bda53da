"""``python -m mano_dist.bench gpu`` without a GPU: ``--device cpu --quick`` runs parts 2 and 3
(step times, ops and host reads) for real and skips the trainer with its reason; the trainer
part's arithmetic and report are checked on records shaped like the trainer's. The figures that
matter need CUDA (docs/benchmarks.md); this keeps the script from rotting until someone runs it.
About 20-45 s here, most of it compiling the fused Mano step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("mano_fused", "mano_eager", "adamw_fused", "muon")


def test_quick_cpu_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "-m", "mano_dist.bench", "gpu", "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {"environment", "args", "train", "step", "syncs"} <= set(results)
    assert "needs CUDA" in results["train"]["skipped"]
    step, syncs = results["step"]["optimizers"], results["syncs"]["optimizers"]
    assert set(step) == set(syncs) == set(OPTIMIZERS)
    for name in OPTIMIZERS:
        assert step[name]["ms"] > 0 and step[name]["vs_adamw_fused"] > 0, (name, step[name])
        assert syncs[name]["ops_per_step"] > 0, (name, syncs[name])
        assert syncs[name]["host_reads_per_step"] >= 0
        assert syncs[name]["sync_warnings_per_step"] is None  # CUDA's sync debug mode only
    assert step["adamw_fused"]["vs_adamw_fused"] == 1.0
    assert results["step"]["matrices"] == 7 and results["step"]["elements"] > 0
    text = (out / "results.txt").read_text()
    assert "step ms" in text and all(name in text for name in OPTIMIZERS)


def test_trainer_part_reads_the_peaks_and_reports_the_ratios(monkeypatch, tmp_path):
    """Part 1 on records as the trainer writes them (launch/trainer/metrics.py cuda_memory_gib), with the
    trainer and the dry run stubbed: the peaks are the highest logged, the ratios are to the
    traced peak, and the report shows them."""
    from mano_dist.bench import gpu

    records = [{"step": 1, "mem_allocated_gib": 5.0, "mem_reserved_gib": 6.0, "mem_device_used_gib": 7.0},
               {"step": 2, "mem_allocated_gib": 8.0, "mem_reserved_gib": 9.0, "mem_device_used_gib": 10.5}]
    monkeypatch.setattr(gpu, "run_trainer", lambda config, overrides, run_dir, log, timeout: records)
    monkeypatch.setattr(gpu, "predicted_peak", lambda config, overrides: {"traced_peak_gib": 4.0, "reserve_gib": 3.0})
    args = gpu.parse_args(["--set", "data.prepared=/data", "--out", str(tmp_path)])
    t = gpu.part_train(args, torch.device("cuda"))  # no CUDA call is made with the stubs
    assert t["real"]["mem_allocated_gib"] == 8.0 and t["real"]["mem_reserved_gib"] == 9.0
    assert t["allocated_vs_traced"] == 2.0 and t["reserved_vs_traced"] == 2.25
    assert t["device_used_vs_traced_plus_reserve"] == 1.5
    assert "train.steps=30" in t["overrides"] and t["overrides"][-1] == "data.prepared=/data"
    lines = gpu.table({"environment": {"device": "cuda", "gpu": "a GPU", "torch": "x", "date": "d"}, "train": t})
    assert any("allocated / traced 2.000" in line for line in lines), lines


def test_missing_memory_keys_and_missing_cuda_say_why():
    from mano_dist.bench import gpu

    with pytest.raises(RuntimeError, match="does not log CUDA memory"):
        gpu.real_peaks([{"step": 1, "loss": 2.0}])
    assert "skipped" in gpu._soft(lambda: gpu.part_train(gpu.parse_args([]), torch.device("cpu")))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            gpu.main(["--out", "/nonexistent"])
