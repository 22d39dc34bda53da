"""The studies' bookkeeping. Short study: finished runs are recognised, the best lr is picked per
optimizer, diverged runs are marked (not averaged in), and both plots are written. Token-scaling
study: the plan's budgets and priority order, lr-edge extensions, caching (a re-run trains only
what is missing, from its run folders or a committed records file), and the table, paired gaps, plots and JSONL from fake runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from launch.studies import runner, scaling
from launch.studies.compare import final_record, run_dir, summarize
from launch.studies.scaling import (SHORT_STUDY_BEST_LR, Run, budget_steps, edge_extensions, finished_runs, pick_next,
                            recent_secs_per_step, scaling_dir, scaling_plan, schedule_overrides, train_all)
from launch.studies.scaling_report import gap_pairs, paired_gap, read_jsonl, report, run_record, tables


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


OPTS = ["adamw", "muon", "mano-v2"]


def test_scaling_plan_puts_best_lr_runs_first_and_sweeps_the_largest_budget():
    steps = [budget_steps(b, 16 * 128) for b in (307200, 1e6, 3e6)]
    assert steps == [150, 488, 1465]  # 0.3M is the short study's 150 steps
    plan = scaling_plan(OPTS, steps, [0, 1], SHORT_STUDY_BEST_LR, sweep_seed=0, extras=["mano-v2-fb3e-3"])
    assert plan[-2:] == [Run("mano-v2-fb3e-3", 1e-2, s, 150) for s in (0, 1)]  # side questions: last, cheapest
    plan = plan[:-2]
    assert len(plan) == len(set(plan)) == 3 * 3 * 2 + 3 * 2
    assert sum(r.steps for r in plan) * 2048 == 43_843_584  # the "about 44M tokens"
    assert plan[:9] == [Run(o, SHORT_STUDY_BEST_LR[o], 0, n) for n in (1465, 488, 150) for o in OPTS]
    assert plan[9:12] == [Run(o, SHORT_STUDY_BEST_LR[o], 1, 150) for o in OPTS]  # then seed 1, cheapest first
    best_lr_runs = [r for r in plan if r.lr == SHORT_STUDY_BEST_LR[r.opt]]
    assert plan[:len(best_lr_runs)] == best_lr_runs  # every 2-seed best-lr run before any lr neighbour
    sweep = {(r.opt, r.lr) for r in plan[len(best_lr_runs):]}
    assert sweep == {("adamw", 1e-3), ("adamw", 1e-2), ("muon", 3e-3), ("muon", 3e-2),
                     ("mano-v2", 3e-3), ("mano-v2", 3e-2)}
    assert all(r.steps == 1465 and r.seed == 0 for r in plan[len(best_lr_runs):])
    # a full schedule per budget, not a truncation: warmup is 10 % of that budget's steps
    assert "optim.warmup_steps=49" in schedule_overrides(488) and "train.steps=488" in schedule_overrides(488)
    assert "optim.warmup_steps=15" in schedule_overrides(150)  # the short study's schedule


def test_edge_extension_steps_outward_only_when_the_best_lr_is_on_an_edge():
    def sweep(opt, losses):
        return {Run(opt, lr, 0, 100): v for lr, v in losses.items()}

    finals = {**sweep("adamw", {1e-3: 5.0, 3e-3: 5.2, 1e-2: 5.5}),     # best on the low edge
              **sweep("muon", {3e-3: 5.0, 1e-2: 4.8, 3e-2: 4.9}),      # inside: nothing to add
              **sweep("mano-v2", {3e-3: 6.0, 1e-2: 5.9, 3e-2: math.nan, 1e-1: 5.8})}  # high edge, one nan
    finals[Run("adamw", 3e-4, 1, 100)] = 4.0  # another seed is not part of the sweep
    assert edge_extensions(finals, OPTS, 100, 0) == [Run("adamw", 3e-4, 0, 100), Run("mano-v2", 3e-1, 0, 100)]
    assert edge_extensions(sweep("adamw", {1e-3: 5.0, 3e-3: 5.2}), OPTS, 100, 0) == []  # not a sweep yet


def _fake_run(out, run, val_losses, elapsed=None):
    folder = scaling_dir(out, run)
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for i, v in enumerate(val_losses, 1):
            step = run.steps * i // len(val_losses)
            f.write(json.dumps({"step": step, "loss": 9.0, "tokens": step * 2048, "val_loss": v}) + "\n")
    if elapsed:
        (folder / "elapsed_s").write_text(f"{elapsed}\n")


def test_cached_runs_are_not_retrained(tmp_path, monkeypatch):
    done, missing, unfinished = Run("adamw", 3e-3, 0, 4), Run("muon", 1e-2, 0, 4), Run("mano-v2", 1e-2, 0, 8)
    _fake_run(tmp_path, done, [6.0, 5.0])
    _fake_run(tmp_path, unfinished, [6.0])
    (scaling_dir(tmp_path, unfinished) / "metrics.jsonl").write_text(  # stopped at step 4 of 8
        json.dumps({"step": 4, "loss": 9.0, "tokens": 8192, "val_loss": 6.0}) + "\n")
    launched = []

    def fake_call(cmd, **kw):
        folder = cmd[cmd.index("--out-dir") + 1]
        launched.append(folder)
        steps = int(next(c for c in cmd if c.startswith("train.steps=")).split("=")[1])
        (Path(folder) / "metrics.jsonl").write_text(
            json.dumps({"step": steps, "loss": 9.0, "tokens": steps * 2048, "val_loss": 4.0}) + "\n")
        return 0

    monkeypatch.setattr(runner.subprocess, "call", fake_call)
    assert train_all("configs/llama_study.toml", tmp_path, [done, missing, unfinished], jobs=2) == []
    assert sorted(launched) == sorted(str(scaling_dir(tmp_path, r)) for r in (missing, unfinished))
    assert finished_runs(tmp_path) == sorted([done, missing, unfinished], key=lambda r: str(scaling_dir(tmp_path, r)))
    launched.clear()
    train_all("configs/llama_study.toml", tmp_path, [done, missing, unfinished], jobs=2)
    assert launched == []  # a re-run redoes nothing


def test_a_deadline_skips_runs_that_would_not_finish_and_keeps_the_priority_order(tmp_path, monkeypatch):
    big, small, tiny = Run("muon", 1e-2, 0, 1000), Run("adamw", 3e-3, 0, 300), Run("adamw", 3e-3, 1, 100)
    assert pick_next([big, small, tiny], seconds_left=None, secs_per_step=2.0) == big  # no deadline
    assert pick_next([big, small, tiny], seconds_left=700, secs_per_step=None) == big  # speed not measured yet
    assert pick_next([big, small, tiny], seconds_left=700, secs_per_step=2.0) == small
    assert pick_next([big, small, tiny], seconds_left=100, secs_per_step=2.0) is None
    # the speed is measured from the runs' own per-step records (tokens / step / tokens_per_s)
    _fake_run(tmp_path, Run("adamw", 3e-3, 0, 4), [6.0, 5.0])
    with open(scaling_dir(tmp_path, Run("adamw", 3e-3, 0, 4)) / "metrics.jsonl", "a") as f:
        for step in (5, 6, 7):
            f.write(json.dumps({"step": step, "loss": 9.0, "tokens": step * 2048, "tokens_per_s": 1024.0}) + "\n")
    assert recent_secs_per_step(tmp_path, margin=1.0) == pytest.approx(2.0)
    launched = []
    monkeypatch.setattr(runner.subprocess, "call", lambda cmd, **kw: launched.append(cmd) or 1)
    monkeypatch.setattr("launch.studies.scaling.recent_secs_per_step", lambda out: 2.0)
    unfinished = train_all("configs/llama_study.toml", tmp_path, [big, small, tiny], jobs=1, deadline=time.time() + 700)
    assert [c[c.index("--out-dir") + 1] for c in launched] == [str(scaling_dir(tmp_path, r)) for r in (small, tiny)]
    assert unfinished == [small, tiny, big]  # both failed (exit 1), the big one never started


def test_scaling_summary_pairs_gaps_by_seed_and_writes_records_and_plots(tmp_path):
    best = SHORT_STUDY_BEST_LR
    for steps, base in ((10, 6.0), (30, 5.0)):
        for seed in (0, 1):
            _fake_run(tmp_path, Run("adamw", best["adamw"], seed, steps), [9.0, base + 0.1 * seed], elapsed=60)
            _fake_run(tmp_path, Run("muon", best["muon"], seed, steps), [9.0, base - 0.5 + 0.1 * seed])
            # Mano: 0.2 behind AdamW at 10 steps, 0.05 behind at 30, for both seeds
            _fake_run(tmp_path, Run("mano-v2", best["mano-v2"], seed, steps),
                      [9.0, base + (0.2 if steps == 10 else 0.05) + 0.1 * seed])
    _fake_run(tmp_path, Run("mano-v2", 3e-2, 0, 30), [9.0, math.nan])  # a diverged lr neighbour
    for seed in (0, 1):  # an extra: Mano with its fallback at another lr, 0.1 / 0.2 below Mano (6.2, 6.3)
        _fake_run(tmp_path, Run("mano-v2-fb3e-3", 1e-2, seed, 10), [9.0, 6.2 + 0.1 * seed - 0.1 * (1 + seed)])
    runs = finished_runs(tmp_path)
    records = [run_record(scaling_dir(tmp_path, r), r.opt, r.lr, r.seed, r.steps) for r in runs]
    assert paired_gap(records, "mano-v2", 1e-2, "adamw", 3e-3, 30)["mean"] == pytest.approx(0.05)
    assert paired_gap(records, "mano-v2", 1e-2, "adamw", 3e-3, 30)["std"] == pytest.approx(0.0, abs=1e-12)
    assert paired_gap(records, "mano-v2", 1e-2, "muon", 1e-2, 10)["mean"] == pytest.approx(0.7)
    text = report(tmp_path, runs, OPTS, [10, 30], [0, 1], 2048, docs=tmp_path / "docs", extras=["mano-v2-fb3e-3"])
    rows = [line for line in text.splitlines() if line.startswith("| 0.06M")]
    assert rows == ["| 0.06M (30) | 5.050 ± 0.071 (n=2) | 4.550 ± 0.071 (n=2) | 5.100 ± 0.071 (n=2) "
                    "| +0.050 [+0.050, +0.050] (n=2) | +0.550 [+0.550, +0.550] (n=2) |"]
    assert "| mano-v2 | 0.01 (short-study best) | s0 5.050, s1 5.150 | 5.100 |\n| mano-v2 | 0.03 | s0 diverged | diverged |" in text
    assert "Run time: 4 runs, 4.0 min" in text
    assert "mano-v2 − adamw during the 0.06M runs (paired, at each evaluation): 0.03M +0.000, 0.06M +0.050" in text
    assert "| mano-v2-fb3e-3 (lr 0.01) | 0.02M (10) | 6.100 ± 0.000 (n=2) | -0.150 [-0.200, -0.100] (n=2) |" in text
    for folder in (tmp_path, tmp_path / "docs"):
        assert all((folder / n).stat().st_size > 0 for n in ("scaling_val_loss.png", "scaling_gap.png",
                                                             "scaling_lr.png", "scaling_curves.png",
                                                             "scaling_runs.jsonl"))
    saved = read_jsonl(tmp_path / "docs" / "scaling_runs.jsonl")
    assert len(saved) == 15 and [r for r in saved if r["lr"] == 3e-2][0]["val_loss"] is None  # JSON null, not NaN
    # the JSONL alone redraws the same table
    assert tables(saved, OPTS, [10, 30], best) == tables(records, OPTS, [10, 30], best)
    # with two Mano variants, each one's gap to each non-Mano optimizer (not to each other)
    assert gap_pairs(["adamw", "muon", "mano-v2", "mano-both"]) == [
        ("mano-v2", "adamw"), ("mano-v2", "muon"), ("mano-both", "adamw"), ("mano-both", "muon")]
    assert gap_pairs(["adamw", "muon"]) == []


def _record(run, val_loss, tokens_per_step=2048, fingerprint=None):
    return {"opt": run.opt, "lr": run.lr, "seed": run.seed, "steps": run.steps, "tokens": run.steps * tokens_per_step,
            "val_loss": val_loss, "curve": [[run.steps * tokens_per_step, val_loss]], "elapsed_s": 60.0,
            "fingerprint": fingerprint or f"fp{run.seed}"}


def test_a_records_file_counts_as_done_and_joins_the_report(tmp_path, monkeypatch):
    """A fresh checkout has no run folders, only the committed JSONL: ``--records`` makes the study
    train just what that file lacks (edge extensions included) and report both together."""
    known_small, known_big = Run("adamw", 3e-3, 0, 2), Run("muon", 1e-2, 0, 4)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(_record(known_small, 4.0)) + "\n" + json.dumps(_record(known_big, 4.5)) + "\n")
    launched = []

    def fake_call(cmd, **kw):  # loss grows with the distance from lr 3e-3: Muon's best is its low edge
        folder = cmd[cmd.index("--out-dir") + 1]
        sets = dict(c.split("=", 1) for c in cmd if "=" in c)
        steps, lr = int(sets["train.steps"]), float(sets["optim.lr"])
        launched.append((sets["optim.name"], lr, steps))
        (Path(folder) / "metrics.jsonl").write_text(json.dumps(
            {"step": steps, "loss": 9.0, "tokens": steps * 2048, "val_loss": 4.0 + abs(math.log10(lr / 3e-3))}) + "\n")
        return 0

    monkeypatch.setattr(runner.subprocess, "call", fake_call)
    monkeypatch.setattr("launch.data.loader.cache_tokens", lambda *a, **k: None)
    monkeypatch.setattr("launch.studies.scaling.study_fingerprint", lambda config, seed: f"fp{seed}")
    argv = ["--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs"), "--optimizers", "adamw", "muon",
            "--extras", "--budgets", "4096", "8192", "--seeds", "0", "--jobs", "1", "--records", str(records)]
    assert scaling.main(argv) == 0
    assert sorted(launched) == sorted([("adamw", 3e-3, 4), ("muon", 1e-2, 2), ("adamw", 1e-3, 4), ("adamw", 1e-2, 4),
                                       ("muon", 3e-3, 4), ("muon", 3e-2, 4),
                                       ("muon", 1e-3, 4)])  # Muon's best (3e-3) was its lowest: one more
    saved = {(r["opt"], r["lr"], r["steps"]): r["val_loss"] for r in read_jsonl(tmp_path / "docs" / "scaling_runs.jsonl")}
    assert len(saved) == 9 and saved[("adamw", 3e-3, 2)] == 4.0 and saved[("muon", 1e-2, 4)] == 4.5
    assert read_jsonl(tmp_path / "docs" / "scaling_runs.jsonl")[0]["fingerprint"] == "fp0"  # stamped, recorded
    launched.clear()
    assert scaling.main(argv) == 0 and launched == []  # the folders now hold the rest

    # a run folder from another starting point (other init or data code) is trained again
    (scaling_dir(tmp_path / "out", Run("adamw", 1e-3, 0, 4)) / "fingerprint").write_text("old\n")
    assert scaling.main(argv) == 0 and launched == [("adamw", 1e-3, 4)]
    records.write_text(json.dumps(_record(known_small, 4.0, fingerprint="old")) + "\n")
    with pytest.raises(SystemExit, match="started from fingerprint old, this checkout builds fp0"):
        scaling.main(argv)
    records.write_text(json.dumps(_record(known_small, 4.0, tokens_per_step=1024)) + "\n")
    with pytest.raises(SystemExit, match="not 2048 per step"):
        scaling.main(argv)
    with pytest.raises(SystemExit, match="no such file"):
        scaling.main(argv[:-1] + [str(tmp_path / "missing.jsonl")])


def test_the_fingerprint_follows_the_initial_weights_and_data_not_the_optimizer(tmp_path):
    """Records from a checkout whose init differed (the lean-init change moved every initial
    weight) must not pass for this checkout's: the fingerprint is what tells them apart."""
    config = Path("configs/llama_study.toml").read_text()
    assert "init_std" not in config
    other_init = tmp_path / "init.toml"
    other_init.write_text(config.replace("[model]", "[model]\ninit_std = 0.03", 1))
    other_optim = tmp_path / "optim.toml"
    other_optim.write_text(config.replace('name = "mano"', 'name = "adamw"').replace("lr = 3e-3", "lr = 1e-2"))
    base = scaling.study_fingerprint("configs/llama_study.toml", 0)
    assert scaling.study_fingerprint("configs/llama_study.toml", 0) == base  # reproducible
    assert scaling.study_fingerprint("configs/llama_study.toml", 1) != base  # per seed
    assert scaling.study_fingerprint(str(other_init), 0) != base
    assert scaling.study_fingerprint(str(other_optim), 0) == base


def test_update_rms_recovers_each_optimizers_step_size():
    """``launch.studies.update_rms`` measures u in W <- W (1 - lr wd) - lr u: Mano's is 0.2 by its
    equations (0.2 sqrt(n) times a unit-norm row or column per slice), AdamW's first step is
    m/sqrt(v) = sign(g) (RMS 1), through the trainer-callback bookkeeping with an lr that changes
    every step (the meter must pair each step with the lr it used, not the next one)."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from launch.studies.update_rms import UpdateMeter, summary_rows, update_rms
    from mano_dist import Mano, mano_param_groups

    torch.manual_seed(0)
    w, g = torch.randn(6, 9), torch.randn(6, 9)
    adam = torch.optim.AdamW([p := nn.Parameter(w.clone())], lr=0.01, weight_decay=0.1, eps=1e-12)
    p.grad = g
    adam.step()
    assert update_rms(w, p.detach(), 0.01, 0.1) == pytest.approx(1.0, rel=1e-5)  # fp32 weights

    model = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 12, bias=False), nn.Linear(12, 8, bias=False),
                          nn.Linear(8, 32, bias=False))
    opt = Mano(mano_param_groups(model), lr=0.02, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the lr halves, thirds, ...
    trainer = SimpleNamespace(engine=SimpleNamespace(module=model, lr=None))
    meter = UpdateMeter(weight_decay=0.1)
    for step in range(1, 5):
        model(torch.randint(0, 32, (4, 5))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        trainer.engine.lr = sched.get_last_lr()[0]
        meter(trainer, step)
    assert [s["step"] for s in meter.steps] == [2, 3, 4]
    assert [s["lr"] for s in meter.steps] == pytest.approx([0.01, 0.02 / 3, 0.005])
    assert sorted(meter.steps[0]["rms"]) == ["1.weight", "2.weight"]  # the hidden matrices only
    for s in meter.steps:
        assert list(s["rms"].values()) == pytest.approx([0.2, 0.2], rel=1e-5)
    # the printed row: 0.2 everywhere; the step taken is the mean lr (0.0072) x 0.2
    assert summary_rows([{"opt": "mano-v2", "peak_lr": 0.02, **s} for s in meter.steps]) == [
        "| mano-v2 | 0.02 | 0.200 | 0.200 | 0.200 | 0.200 | 0.200 | 0.200-0.200 | 1.44e-03 |"]
