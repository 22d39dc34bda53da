"""The study's bookkeeping: finished runs are recognised, the best lr is picked per optimizer,
diverged runs are marked (not averaged in), and both plots are written."""

from __future__ import annotations

import json
import math

from launch.compare import final_record, run_dir, summarize


def _write(out, opt, lr, seed, final, steps=4):
    folder = run_dir(out, opt, lr, seed)
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            rec = {"step": step, "loss": 9.0, "tokens": step * 100}
            if step % 2 == 0:
                rec["val_loss"] = final + (steps - step)
            f.write(json.dumps(rec) + "\n")


def test_summary_picks_best_lr_and_marks_divergence(tmp_path):
    for seed in (0, 1):
        _write(tmp_path, "adamw", 1e-3, seed, 5.0 + seed * 0.2)
        _write(tmp_path, "adamw", 1e-2, seed, math.nan if seed else 4.0)
        _write(tmp_path, "mano-v2", 1e-3, seed, 4.6)
        _write(tmp_path, "mano-v2", 1e-2, seed, 4.4 + seed * 0.2)
    assert final_record(run_dir(tmp_path, "adamw", 1e-3, 0), 4)["val_loss"] == 5.0
    assert final_record(run_dir(tmp_path, "adamw", 1e-3, 0), 8) is None  # unfinished
    text = summarize(tmp_path, ["adamw", "mano-v2"], [1e-3, 1e-2], [0, 1], 4)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "optimizer" not in line]
    assert rows[0].startswith("| mano-v2 | 4.600 ± 0.000 | 4.500 ± 0.141 | 4.500 |")
    assert rows[1] == "| adamw | 5.100 ± 0.141 | 1 diverged | 5.100 |"
    assert (tmp_path / "val_loss.png").stat().st_size > 0 and (tmp_path / "lr_sweep.png").stat().st_size > 0


def test_summary_reports_the_total_run_time(tmp_path):
    for seed, secs in ((0, 60.0), (1, 90.0)):
        _write(tmp_path, "adamw", 1e-3, seed, 5.0)
        (run_dir(tmp_path, "adamw", 1e-3, seed) / "elapsed_s").write_text(f"{secs}\n")
    text = summarize(tmp_path, ["adamw"], [1e-3], [0, 1], 4, wall=30.0)
    assert "Run time: 2 runs, 75 s each on average, 2.5 min in total" in text
    assert "This invocation's wall time: 0.5 min." in text
