"""SLURM submission: rendered job scripts for several layouts, one-line errors before submitting, and real jobs on
a local two-node cluster (slurm/local/setup.sh; skipped with the reason where it cannot be installed): a 2-node
DDP training job, and a job requeued mid-run with ``scontrol requeue`` that ends where an uninterrupted one does."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, seq_overrides, tiny_overrides
from distillprune.slurm import main

SLURM_ROOT = Path(os.environ.get("DISTILLPRUNE_SLURM_ROOT", "/tmp/slurm"))


def submit(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m distillprune.slurm ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "distillprune.slurm", *args],
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The submit command in this process (fast: no interpreter start-up); the cluster tests run it as users do."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _dry(capsys: pytest.CaptureFixture, *args: str) -> str:
    code, out, err = _main(capsys, "recipe=logit_distill", "slurm.dry_run=true", *args)
    assert code == 0, err
    return out


def test_dry_run_layouts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gpus = _dry(capsys, "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.partition=a100", "slurm.time=2:00:00",
                "trainer.strategy=deepspeed_stage_3", "trainer.max_steps=10")  # fmt: skip
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=a100", "#SBATCH --time=2:00:00", "#SBATCH --signal=SIGUSR1@90",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append"):  # fmt: skip
        assert line + "\n" in gpus
    srun = gpus[gpus.index("srun ") :]
    for arg in ("recipe=logit_distill", "trainer.strategy=deepspeed_stage_3", "trainer.max_steps=10",
                "trainer.num_nodes=$SLURM_NNODES", "trainer.devices=8", "resume=auto", "-$SLURM_JOB_ID"):  # fmt: skip
        assert arg in srun
    assert "trainer.accelerator=cpu" not in srun

    setup = tmp_path / "env.sh"
    setup.write_text("module load cuda/12.4\nsource /opt/venv/bin/activate\n")
    cpus = _dry(capsys, "slurm.nodes=2", "slurm.tasks_per_node=3", "slurm.cpus_per_task=4", f"slurm.setup_file={setup}",
                "slurm.setup=[export HF_HOME=/scratch/hf]", f"output_dir={tmp_path / 'run'}")  # fmt: skip
    assert "#SBATCH --ntasks-per-node=3\n" in cpus and "#SBATCH --cpus-per-task=4\n" in cpus
    assert "--gpus-per-node" not in cpus
    srun = cpus[cpus.index("srun ") :]
    assert "trainer.devices=3" in srun and "trainer.accelerator=cpu" in srun and f"output_dir={tmp_path}/run" in srun
    lines = cpus.splitlines()
    assert lines.index("export HF_HOME=/scratch/hf") < lines.index("module load cuda/12.4") < cpus.count("\n")
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < lines.index("set -euo pipefail")

    one = _dry(capsys)  # defaults: 1 node, 1 CPU task
    assert "#SBATCH --nodes=1\n" in one and "trainer.devices=1" in one


BAD = {
    ("slurm.nodes=0",): "error: slurm.nodes=0: a job needs at least 1 node",
    ("slurm.node=2",): "error: unknown key 'slurm.node'; did you mean 'slurm.nodes'?",
    ("slurm.nodes=two",): "error: slurm.nodes expects int, got 'two'",
    ("trainer.max_stepz=5",): "error: unknown key 'trainer.max_stepz'; did you mean 'trainer.max_steps'",
    ("data.seq_len=0",): "error: data.seq_len=0: must be an integer >= 2",  # the run's own checks, before the queue
    ("data.source=/no/such.txt",): "error: data.source=/no/such.txt: no such file or folder",
}


@pytest.mark.parametrize("args", sorted(BAD))
def test_bad_input_is_one_line(args: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    code, _, err = _main(capsys, "recipe=logit_distill", "slurm.dry_run=true", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(BAD[args])


def test_missing_recipe_and_missing_sbatch(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = _main(capsys, "recipe=no_such_recipe", "slurm.nodes=2")
    assert code == 2 and err.startswith("error: unknown recipe 'no_such_recipe'; available recipes: ")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no SLURM client on it
    code, _, err = _main(capsys, "recipe=logit_distill", "slurm.nodes=2")
    assert code == 2
    assert (
        err.strip() == "error: sbatch is not installed (no SLURM client on PATH); slurm.dry_run=true prints the script"
    )


# ------------------------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="session")
def cluster() -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd launches jobs)")
    env = {**os.environ, "SLURM_ROOT": str(SLURM_ROOT), "SLURM_SMOKE": "0"}
    done = subprocess.run(["bash", str(ROOT / "slurm/local/setup.sh")], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        pytest.skip(f"SLURM could not be installed or started here: {reason}")
    started = "already running" not in done.stdout
    yield {"SLURM_CONF": str(SLURM_ROOT / "etc/slurm.conf")}
    if started:  # stop exactly what this session started
        subprocess.run(["bash", str(ROOT / "slurm/local/teardown.sh")], env=env, capture_output=True)


def _job_state(job: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env={**os.environ, **env}, capture_output=True,
                         text=True).stdout  # fmt: skip
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(job: str, env: dict[str, str], timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job, env)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.25)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {_job_state(job, env)}")


def _submit_job(cluster: dict, model: Path, text: Path, out: Path, steps: int, cwd: Path) -> str:
    args = [a for a in tiny_overrides(model, text, out, steps=steps) if not a.startswith("trainer.accelerator")]
    done = submit("recipe=logit_distill", "slurm.nodes=2", "slurm.tasks_per_node=1", "slurm.time=10",
                  *args, "checkpoint.every_n_steps=5", "trainer.val_check_interval=5", "system.warmup_steps=1",
                  "logger.wandb.mode=offline", cwd=cwd, env=cluster)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "log:" in done.stdout and "output:" in done.stdout
    return done.stdout.split("submitted job ")[1].split()[0]


def _last_loss(out: Path) -> tuple[int, float]:
    with open(out / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return int(rows[-1]["step"]), float(rows[-1]["train/loss"])


STEPS = 150


@pytest.fixture(scope="session")
def straight_job(cluster, tiny_model_dir: Path, tiny_text_file: Path, tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("slurm-straight")
    job = _submit_job(cluster, tiny_model_dir, tiny_text_file, cwd / "run", STEPS, cwd)
    state = _wait(job, cluster)
    log = (cwd / "runs/slurm" / f"distillprune-logit_distill-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    return cwd / "run", job


def test_two_node_ddp_job(straight_job: tuple[Path, str]) -> None:
    straight_job, job = straight_job
    metrics = json.loads((straight_job / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["world_size"] == 2  # both ranks trained, one per node
    assert metrics["student"]["val_loss"] < metrics["student_init"]["val_loss"]
    model = AutoModelForCausalLM.from_pretrained(straight_job / "final")
    assert model(torch.arange(4, 12)[None]).logits.isfinite().all()
    runs = list((straight_job / "wandb").glob("offline-run-*"))  # one W&B run, from rank 0, keyed by the job
    assert len(runs) == 1 and runs[0].name.endswith(f"-logit_distill-{job}")


def test_requeued_job_resumes_to_the_same_end(
    cluster, straight_job: tuple[Path, str], tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    straight_job, _ = straight_job
    out = tmp_path / "run"
    job = _submit_job(cluster, tiny_model_dir, tiny_text_file, out, STEPS, tmp_path)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step000010.ckpt").exists():  # mid-run: requeue it
        assert time.monotonic() < deadline, "the job never reached step 10"
        assert _job_state(job, cluster).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.05)
    subprocess.run(["scontrol", "requeue", job], env={**os.environ, **cluster}, check=True)
    state = _wait(job, cluster)
    log = (tmp_path / "runs/slurm" / f"distillprune-logit_distill-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert int(state["Restarts"]) == 1 and "(restart 1)" in log  # the same job ran twice, appending its log
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS

    step, loss = _last_loss(out)
    want_step, want_loss = _last_loss(straight_job)
    assert step == want_step == STEPS - 1 and loss == pytest.approx(want_loss, rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(straight_job / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=1e-6, msg=name)
    runs = sorted((out / "wandb").glob("offline-run-*"))  # both attempts log to the one W&B run of the job
    assert len(runs) == 2 and all(r.name.endswith(f"-logit_distill-{job}") for r in runs)


def test_gpus_the_partition_cannot_give(cluster) -> None:
    done = submit("recipe=logit_distill", "slurm.nodes=2", "slurm.gpus_per_node=2", env=cluster)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: slurm.gpus_per_node=2 but partition debug offers 0 GPU(s) per node; use at most 0 "
        "(slurm.gpus_per_node=0 runs on CPUs)"
    )
    done = submit("recipe=logit_distill", "slurm.nodes=3", env=cluster)
    assert done.stderr.strip().splitlines()[-1] == "error: slurm.nodes=3 but partition debug has 2 node(s)"


def test_pre_timeout_signal_checkpoints_and_requeues(
    cluster, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    # what SLURM sends 90 s before the time limit (--signal=SIGUSR1@90), sent now to every task of the job
    out = tmp_path / "run"
    job = _submit_job(cluster, tiny_model_dir, tiny_text_file, out, STEPS, tmp_path)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step000010.ckpt").exists():
        assert time.monotonic() < deadline, "the job never reached step 10"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], env={**os.environ, **cluster}, check=True)
    state = _wait(job, cluster)
    log = (tmp_path / "runs/slurm" / f"distillprune-logit_distill-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert int(state["Restarts"]) == 1 and "Requeued SLURM job" in log and "(restart 1)" in log
    assert list(out.glob("hpc_ckpt_*.ckpt"))  # written on the signal, resumed from by the requeued attempt
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS


def test_recipe_slurm_section_gives_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "cluster_kd.yaml"
    recipe.write_text(
        (ROOT / "recipes/logit_distill.yaml").read_text()
        + "\nslurm:\n  nodes: 2\n  gpus_per_node: 4\n  setup: [module load cuda/12.4]\n"
    )
    script = _dry(capsys, f"recipe={recipe}", "slurm.gpus_per_node=2")  # the command line wins
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=2\n" in script
    assert "module load cuda/12.4\n" in script and "trainer.devices=2" in script
    assert "slurm." not in script[script.index("srun ") :]  # job settings never reach train.py


def test_signal_during_teacher_generation_requeues_and_resumes_the_store(
    cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # the pre-timeout signal before training (here: while the teacher writes its answers) is not lost: the job
    # is requeued at once and the next attempt continues the fsynced store instead of starting over
    out, cache = tmp_path / "run", tmp_path / "gen"
    args = [a for a in seq_overrides(tiny_model_dir, out, cache) if not a.startswith(("prompts.n", "generate.max_"))]
    done = submit("recipe=seq_distill", "slurm.nodes=2", "slurm.tasks_per_node=1", "slurm.time=10", *args,
                  "prompts.n=240", "generate.max_new_tokens=48", "generate.batch_size=2", "reference_student=false",
                  "trainer.max_steps=2", "evaluate.speed.batch_sizes=[]", cwd=tmp_path, env=cluster)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    job = done.stdout.split("submitted job ")[1].split()[0]
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size for p in cache.glob("*/rows*.jsonl")):
        assert time.monotonic() < deadline, "generation never started"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], env={**os.environ, **cluster}, check=True)
    state = _wait(job, cluster)
    log = (tmp_path / "runs/slurm" / f"distillprune-seq_distill-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert int(state["Restarts"]) == 1 and "requeue signal outside training" in log
    rows = [json.loads(line)["id"] for p in next(cache.iterdir()).glob("rows*.jsonl") for line in p.open()]
    assert len(set(rows)) == 240 and json.loads((out / "metrics.json").read_text())["steps"] == 2
