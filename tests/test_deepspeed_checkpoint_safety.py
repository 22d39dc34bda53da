"""DeepSpeed checkpoints saved by ``save_run``: complete or ignored, pruned to ``keep_last``,
read without running code they carry, and falling back past a bad newest tag.

One 2-rank ZeRO-2 run saves tags step-1..step-4 (``keep_last=2``), each followed by the
parameters it holds; the main process then damages the newest tags the ways a crash or an
attacker does (a missing ``COMPLETE`` marker; a payload in ``mp_rank_00_model_states.pt`` with
the manifest rewritten to match), and a second 2-rank run loads. Equality is asserted against
the parameters recorded at save time, never just "it loaded"."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import deepspeed  # noqa: F401  (installed by setup: missing must fail, not skip)

from tests.dist import run_distributed
from tests.test_deepspeed import GLOBAL_ROWS, MICRO, _full_params, _run_engine, _set_env, _train

pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]

STAGE = 2


class Payload:
    """Unpickling this writes ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _save_body(rank, world_size, ckpt_dir):
    from mano_dist.deepspeed.checkpoint import complete_tags, save_run

    _set_env(rank, world_size)
    engine = _run_engine(STAGE, None, world_size)
    accum = GLOBAL_ROWS // (MICRO * world_size)
    saved, tags_seen = {}, []
    for step in range(1, 5):
        _train(engine, rank, world_size, accum, 1, first_step=step - 1)
        save_run(engine, ckpt_dir, f"step-{step}", {"step": step}, keep_last=2)
        saved[step] = _full_params(engine, STAGE)
        tags_seen.append(complete_tags(ckpt_dir))
    return {"saved": saved, "tags": tags_seen}


def _load_body(rank, world_size, ckpt_dir, tag):
    from mano_dist.checkpoint.errors import CheckpointError
    from mano_dist.deepspeed.checkpoint import load_run

    _set_env(rank, world_size)
    engine = _run_engine(STAGE, None, world_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            path, client = load_run(engine, ckpt_dir, tag)
        except CheckpointError as e:
            return {"error": f"{type(e).__name__}: {e}"}
    return {"client": client, "params": _full_params(engine, STAGE), "global_steps": engine.global_steps,
            "warnings": [str(w.message) for w in caught if "Skipping" in str(w.message)]}


def _plant(tag_dir: Path, marker: Path) -> None:
    """A payload in the model-states file, and the manifest rewritten to match (an attacker who
    edits the JSON manifest too): only weights_only loading stands in the way."""
    from mano_dist.checkpoint import validate

    target = tag_dir / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, target)
    validate.write_manifest(tag_dir)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_marks_prunes_refuses_payloads_and_falls_back(tmp_path):
    ckpt = tmp_path / "ckpt"
    marker = tmp_path / "MARKER"
    run = run_distributed(_save_body, 2, tmp_path, str(ckpt))
    saved = run[0]["saved"]

    # complete, marked, pruned: keep_last=2 keeps the two newest complete tags
    assert run[0]["tags"] == [["step-1"], ["step-1", "step-2"], ["step-2", "step-3"], ["step-3", "step-4"]]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step-3", "step-4"]
    for tag in ("step-3", "step-4"):
        record = json.loads((ckpt / tag / "COMPLETE").read_text())
        assert record["tag"] == tag and record["global_steps"] == int(tag[-1])
        manifest = json.loads((ckpt / tag / "manifest.json").read_text())
        assert any(name.endswith("optim_states.pt") for name in json.dumps(manifest).split('"'))

    # step-4 loses its marker (a save that died before the end): auto resume takes step-3,
    # silently, since an unmarked tag was never a candidate
    (ckpt / "step-4" / "COMPLETE").unlink()
    got = run_distributed(_load_body, 2, tmp_path, str(ckpt), None)
    for r in got:
        assert r["client"]["step"] == 3 and r["global_steps"] == 3 and _equal(r["params"], saved[3])
        assert r["warnings"] == []

    # the incomplete tag named explicitly: refused on every rank, not loaded half-written
    got = run_distributed(_load_body, 2, tmp_path, str(ckpt), "step-4")
    assert all(r["error"].startswith("IncompleteCheckpointError") and "COMPLETE" in r["error"] for r in got)

    # step-3 now carries a payload: the explicit load refuses it on every rank, nothing runs
    _plant(ckpt / "step-3", marker)
    got = run_distributed(_load_body, 2, tmp_path, str(ckpt), "step-3")
    for r in got:
        assert r["error"].startswith("UnsafeCheckpointError"), r["error"]
        assert "mp_rank_00_model_states.pt" in r["error"] and "load only checkpoints you trust" in r["error"]
    assert not marker.exists()

    # auto resume with every complete tag bad: a clear error listing each, on every rank
    got = run_distributed(_load_body, 2, tmp_path, str(ckpt), None)
    assert all("No DeepSpeed checkpoint" in r["error"] and "'step-3'" in r["error"] for r in got)
    assert not marker.exists()

    # the offline consolidator refuses it too (exit 1, a one-line error, no output file)
    out = tmp_path / "consolidated.pt"
    cmd = [sys.executable, "-m", "mano_dist.deepspeed.checkpoint", str(ckpt), "step-3", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 1 and "weights_only loading refuses" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not marker.exists()


def _fallback_save_body(rank, world_size, ckpt_dir):
    from mano_dist.deepspeed.checkpoint import save_run

    _set_env(rank, world_size)
    engine = _run_engine(STAGE, None, world_size)
    accum = GLOBAL_ROWS // (MICRO * world_size)
    saved = {}
    for step in (1, 2):
        _train(engine, rank, world_size, accum, 1, first_step=step - 1)
        save_run(engine, ckpt_dir, f"step-{step}", {"step": step})
        saved[step] = _full_params(engine, STAGE)
    return saved


def test_auto_resume_skips_a_bad_newest_tag_with_a_warning(tmp_path):
    ckpt = tmp_path / "ckpt"
    marker = tmp_path / "MARKER"
    saved = run_distributed(_fallback_save_body, 2, tmp_path, str(ckpt))[0]
    _plant(ckpt / "step-2", marker)
    got = run_distributed(_load_body, 2, tmp_path, str(ckpt), None)
    for r in got:
        assert r["client"]["step"] == 1 and _equal(r["params"], saved[1])
        assert len(r["warnings"]) == 1 and "'step-2'" in r["warnings"][0] and "next older" in r["warnings"][0]
    assert not marker.exists()
    # a good tag still consolidates offline
    out = tmp_path / "consolidated.pt"
    from mano_dist.deepspeed.checkpoint import main

    assert main([str(ckpt), "step-1", str(out)]) == 0 and out.is_file()
