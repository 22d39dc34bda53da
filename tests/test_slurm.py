"""launch/slurm.sbatch without a cluster: ``scontrol``, ``scancel`` and ``srun`` are stand-ins on
PATH, and the test reads what the script hands ``srun``: the per-node process count it derived
from the variables Slurm sets for ``--gpus-per-node=N`` or ``--gres=gpu:N``, in its order of
preference; and on preemption, that the TERM the batch shell gets (``--signal=B:TERM@120``)
reaches the job step through ``scancel`` and that exit code 75 requeues the job."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo node0; echo node1 ;;
  "show job") echo "JobId=42 JobName=mano"; [ -n "${FAKE_TRES:-}" ] && echo "   TresPerNode=$FAKE_TRES MinCPUsNode=32" ;;
  "requeue "*) echo "$*" >> "$FAKE_DIR/scontrol" ;;
esac
"""
SRUN = """#!/usr/bin/env bash
echo "NPROC_PER_NODE=[$NPROC_PER_NODE] NNODES=$NNODES RDZV_ENDPOINT=$RDZV_ENDPOINT RDZV_ID=$RDZV_ID args: $*"
"""


def _sbatch(tmp_path, **env) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_ID": "42"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "configs/llama_1b.toml"],
                          cwd=ROOT, env=base | env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("env,nproc", [
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "8"}, "8"),                           # --gpus-per-node=8
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"),                      # --gpus-per-node=a100:2
    ({"SLURM_JOB_GPUS": "0,1,2"}, "3"),                            # --gres=gpu:3, older Slurm
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"}, "6"),
    ({"SLURM_TRES_PER_NODE": "gres/gpu:h100:8"}, "8"),
    ({"SLURM_TRES_PER_NODE": "gres/nvme:1,gres/gpu:3"}, "3"),      # other gres do not count
    ({"SLURM_GRES": "gpu"}, "1"),
    ({"FAKE_TRES": "gres:gpu:5"}, "5"),                            # only scontrol's job record
    ({"FAKE_TRES": "gres/gpu:a100:4(IDX:0-1,4-5)"}, "4"),
    ({"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "2"),  # the order of preference
    ({"NPROC_PER_NODE": "7", "SLURM_GPUS_ON_NODE": "2"}, "7"),     # the user's setting wins
    ({}, ""),                                                      # none: run.sh counts torch's devices
    ({"CUDA_VISIBLE_DEVICES": ""}, ""),
])
def test_sbatch_derives_gpus_per_node_from_every_request_form(tmp_path, env, nproc):
    out = _sbatch(tmp_path, **env)
    assert out == (f"NPROC_PER_NODE=[{nproc}] NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=42 "
                   "args: --kill-on-bad-exit=1 launch/run.sh --config configs/llama_1b.toml"), out


def test_sbatch_requests_gpus_as_gres():
    """``--gres=gpu:N`` on the command line replaces the script's own request of that form."""
    directives = [line for line in (ROOT / "launch" / "slurm.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "#SBATCH --gres=gpu:8" in directives
    assert not any("--gpus" in line for line in directives), directives


def test_sbatch_asks_for_the_signal_and_allows_requeue():
    directives = [line for line in (ROOT / "launch" / "slurm.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:TERM@120" in directives
    assert "#SBATCH --requeue" in directives and "#SBATCH --open-mode=append" in directives


# A job step that runs until SLURM signals it (the stand-in scancel does, as slurmstepd would),
# then exits as launch/run.sh does after a preemption checkpoint; or exits at once with $FAKE_EXIT.
SRUN_STEP = """#!/usr/bin/env bash
echo $$ > "$FAKE_DIR/srun.pid"
[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"
trap 'echo TERM >> "$FAKE_DIR/step_signals"; exit 75' TERM
for _ in $(seq 600); do sleep 0.1; done
exit 3
"""
SCANCEL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scancel"
kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
"""


def _sbatch_step(tmp_path, signal_it: bool, **env):
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN_STEP), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_ID": "42", "FAKE_DIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "configs/llama_1b.toml"],
                            cwd=ROOT, env=base | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_it:
        deadline = time.monotonic() + 30
        while not (tmp_path / "srun.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
    output = proc.communicate(timeout=60)[0]
    read = lambda name: (tmp_path / name).read_text() if (tmp_path / name).exists() else ""  # noqa: E731
    return proc.returncode, output, read("scancel"), read("scontrol"), read("step_signals")


def test_sbatch_passes_the_signal_to_the_step_and_requeues_on_75(tmp_path):
    code, output, scancel, scontrol, step = _sbatch_step(tmp_path, signal_it=True)
    assert code == 75, output
    assert scancel == "--signal=TERM 42\n" and step == "TERM\n", (scancel, step)
    assert scontrol == "requeue 42\n", scontrol
    assert "requeueing job 42" in output


@pytest.mark.parametrize("exit_code,requeued", [("75", True), ("1", False), ("0", False)])
def test_sbatch_requeues_only_on_the_preemption_code(tmp_path, exit_code, requeued):
    code, output, scancel, scontrol, _ = _sbatch_step(tmp_path, signal_it=False, FAKE_EXIT=exit_code)
    assert code == int(exit_code) and scancel == "", output
    assert scontrol == ("requeue 42\n" if requeued else ""), scontrol
