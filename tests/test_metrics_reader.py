"""``launch.trainer.metrics.read_metrics``: the one reader of ``metrics.jsonl`` every consumer uses (the
plot, the studies, the throughput and GPU benches), with the one rule for resumed runs."""

from __future__ import annotations

import json

from launch.studies.compare import final_record
from launch.trainer.metrics import MetricsWriter, read_metrics


def _write(folder, records, append=False):
    writer = MetricsWriter(folder, append=append, tensorboard=False)
    for r in records:
        writer.write(r)
    writer.close()


def test_a_resumed_run_counts_each_step_once_and_the_later_record_wins(tmp_path):
    # run to step 4, killed; resumed from the step-2 checkpoint: steps 3 and 4 are logged again
    _write(tmp_path, [{"step": s, "loss": 10.0 - s} for s in range(1, 5)])
    _write(tmp_path, [{"step": s, "loss": 20.0 - s, **({"val_loss": 1.5} if s == 6 else {})} for s in range(3, 7)],
           append=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("\n")  # a blank line (an editor, a partial flush) is not a record
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [9.0, 8.0, 17.0, 16.0, 15.0, 14.0]
    assert read_metrics(tmp_path / "metrics.jsonl") == records  # a folder or its file
    assert final_record(tmp_path, 6) == {"step": 6, "loss": 14.0, "val_loss": 1.5}
    assert final_record(tmp_path, 7) is None and final_record(tmp_path / "missing", 6) is None


def test_the_plot_draws_each_step_once(tmp_path):
    from launch.trainer.plot import plot_runs

    _write(tmp_path, [{"step": s, "loss": 5.0, "tokens": 100 * s} for s in (1, 2, 3)])
    _write(tmp_path, [{"step": 3, "loss": 4.0, "tokens": 300, "val_loss": 4.5}], append=True)
    out = plot_runs([tmp_path], tmp_path / "loss.png")
    assert out.is_file() and out.stat().st_size > 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["loss"] == 4.0 and len(read_metrics(tmp_path)) == 3
