"""Submit a recipe to a SLURM cluster: ``python -m distillprune.slurm recipe=NAME slurm.nodes=2 ...``.

The ``slurm.*`` keys describe the job (below); every other ``key=value`` is a recipe override, checked here
before anything is submitted and passed through to ``train.py``. The job script (``slurm/job.sbatch.template``)
runs one task per device with ``srun``; Lightning's SLURMEnvironment reads the ranks, and on the pre-timeout
signal (``--signal=SIGUSR1@<signal_s>``) checkpoints and requeues the job. A requeued job (also after
``scontrol requeue`` or a node failure) runs the same command in the same ``output_dir`` (named after the job id)
with ``resume=auto``, so it continues from its newest checkpoint. ``slurm.dry_run=true`` prints the script.
"""

from __future__ import annotations

import difflib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from distillprune.config import load_recipe
from distillprune.errors import UserError
from distillprune.validate import check_choices, check_files, check_ranges

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "slurm" / "job.sbatch.template"


@dataclass
class SlurmOptions:
    """The job: ``nodes`` × (``gpus_per_node`` GPUs, or ``tasks_per_node`` CPU processes when it is 0)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job with tasks_per_node processes per node
    tasks_per_node: int = 1  # CPU jobs only; a GPU job runs one task per GPU
    cpus_per_task: int = 0  # 0: let SLURM decide
    partition: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    mem: str | None = None  # e.g. 64G per node
    job_name: str | None = None  # default distillprune-<recipe>
    signal_s: int = 90  # SIGUSR1 this many seconds before the time limit: checkpoint and requeue
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, source venv ...)
    setup_file: str | None = None  # a file of such lines, inserted after ``setup``
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. ["--constraint=a100"]
    dry_run: bool = False


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, else sbatch's)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        script, job = prepare(argv)
        if job is None:
            print(script, end="")
            return 0
        return submit(script, job)
    except UserError as err:
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2


@dataclass
class _Job:
    name: str
    logs: Path
    runs: Path
    recipe: str


def prepare(argv: list[str]) -> tuple[str, _Job | None]:
    """The rendered job script, and the job to submit (None for a dry run). Everything is checked first."""
    slurm_args = [a for a in argv if a.startswith("slurm.")]
    recipe_args = [a for a in argv if not a.startswith("slurm.")]
    cfg = load_recipe(recipe_args)  # unknown recipe or key, wrong type: an error before anything is submitted
    check_ranges(cfg)  # and the cheap checks of the run's first stage: no bad input waits in the queue
    check_choices(cfg)
    check_files(cfg)
    section = cfg.get("slurm")  # a recipe may carry the job's defaults
    options = _options(OmegaConf.to_container(section) if section is not None else {}, slurm_args)
    if options.nodes < 1:
        raise UserError(f"slurm.nodes={options.nodes}: a job needs at least 1 node")
    if options.gpus_per_node < 0 or options.tasks_per_node < 1:
        raise UserError("slurm.gpus_per_node must be >= 0 and slurm.tasks_per_node >= 1")
    if not options.dry_run:
        if shutil.which("sbatch") is None:
            raise UserError("sbatch is not installed (no SLURM client on PATH); slurm.dry_run=true prints the script")
        _check_partition(options)
    name = options.job_name or f"distillprune-{cfg.recipe}"
    cwd = Path.cwd()
    job = _Job(name=name, logs=cwd / "runs" / "slurm", runs=cwd / "runs", recipe=cfg.recipe)
    script = render(options, recipe_args, job)
    return script, None if options.dry_run else job


def render(options: SlurmOptions, recipe_args: list[str], job: _Job) -> str:
    """Fill the job template: #SBATCH lines, set-up lines and the ``srun python train.py`` command."""
    gpu = options.gpus_per_node > 0
    tasks = options.gpus_per_node if gpu else options.tasks_per_node
    directives = {
        "job-name": job.name,
        "nodes": options.nodes,
        "ntasks-per-node": tasks,  # Lightning wants one task per device
        "gpus-per-node": options.gpus_per_node if gpu else None,
        "cpus-per-task": options.cpus_per_task or None,
        "partition": options.partition,
        "account": options.account,
        "mem": options.mem,
        "time": options.time,
        "output": job.logs / "%x-%j.out",  # requeued attempts append to the same log
        "open-mode": "append",
        "signal": f"SIGUSR1@{options.signal_s}",
        "requeue": "",
    }
    lines = [f"#SBATCH --{k}={v}" if v != "" else f"#SBATCH --{k}" for k, v in directives.items() if v is not None]
    lines += [f"#SBATCH {a}" for a in options.sbatch_args]
    setup = list(options.setup)
    if options.setup_file:
        path = Path(options.setup_file).expanduser()
        if not path.is_file():
            raise UserError(f"slurm.setup_file={options.setup_file}: no such file")
        setup += path.read_text().splitlines()
    recipe = [a for a in recipe_args if a.startswith("recipe=")][-1].split("=", 1)[1]
    overrides = [a for a in recipe_args if not a.startswith(("recipe=", "output_dir=", "resume="))]
    output_dir = next((a.split("=", 1)[1] for a in recipe_args if a.startswith("output_dir=")), None)
    out = shlex.quote(str(Path(output_dir).resolve())) if output_dir else f'"{job.runs}/{recipe}-$SLURM_JOB_ID"'
    command = [
        shlex.quote(sys.executable), shlex.quote(str(ROOT / "train.py")), shlex.quote(f"recipe={recipe}"),
        *(shlex.quote(a) for a in overrides),
        "trainer.num_nodes=$SLURM_NNODES", f"trainer.devices={tasks}",
        *([] if gpu else ["trainer.accelerator=cpu"]),
        f"output_dir={out}", "resume=auto",
    ]  # fmt: skip
    return TEMPLATE.read_text().format(
        directives="\n".join(lines),
        setup="\n".join(setup) or "# (no set-up lines: slurm.setup or slurm.setup_file)",
        workdir=shlex.quote(str(Path.cwd())),
        logs=shlex.quote(str(job.logs)),
        command=" \\\n    ".join(command),
    )


def submit(script: str, job: _Job) -> int:
    """``sbatch`` the script; print the job id, its log and its output folder."""
    job.logs.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: sbatch failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}", file=sys.stderr)
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}")
    print(f"log:    {job.logs / f'{job.name}-{job_id}.out'}")
    print(f"output: {job.runs / f'{job.recipe}-{job_id}'} (unless output_dir was given)")
    return 0


def _options(recipe_section: Any, args: list[str]) -> SlurmOptions:
    known = {f.name: f for f in fields(SlurmOptions)}
    values = dict(recipe_section)
    for arg in args:
        if "=" not in arg:
            raise UserError(f"argument '{arg}' is not key=value")
        key, raw = arg.split("=", 1)
        key = key.removeprefix("slurm.")
        # text settings keep their text: YAML 1.1 reads a time such as 2:00:00 as the number 7200
        values[key] = raw if key in _TEXT else yaml.safe_load(raw) if raw.strip() else ""
    options = SlurmOptions()
    for key, value in values.items():
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean 'slurm.{near[0]}'?" if near else f"valid keys: {', '.join(known)}"
            raise UserError(f"unknown key 'slurm.{key}'; {hint}")
        default = getattr(options, key)
        if key in _TEXT and value is not None:
            value = str(value)
        expected = type(default) if default is not None else str
        if value is not None and not isinstance(value, expected):
            raise UserError(f"slurm.{key} expects {expected.__name__}, got {value!r}")
        setattr(options, key, value)
    return options


_TEXT = ("partition", "account", "mem", "job_name", "setup_file", "time")


def _check_partition(options: SlurmOptions) -> None:
    """Against ``sinfo``: the partition exists, has enough nodes, and its nodes have the GPUs asked for."""
    cmd = ["sinfo", "-h", "-o", "%P|%D|%G"] + (["-p", options.partition] if options.partition else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sinfo failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    rows = [line.split("|") for line in done.stdout.split() if line.count("|") == 2]
    if options.partition:
        rows = [r for r in rows if r[0].rstrip("*") == options.partition]
    else:
        rows = [r for r in rows if r[0].endswith("*")] or rows  # the default partition
    if not rows:
        raise UserError(f"slurm.partition={options.partition}: no such partition (see sinfo)")
    part = rows[0][0].rstrip("*")
    nodes = sum(int(r[1]) for r in rows)
    if options.nodes > nodes:
        raise UserError(f"slurm.nodes={options.nodes} but partition {part} has {nodes} node(s)")
    gpus = max(_gpus_in_gres(r[2]) for r in rows)
    if options.gpus_per_node > gpus:
        raise UserError(
            f"slurm.gpus_per_node={options.gpus_per_node} but partition {part} offers {gpus} GPU(s) per node; "
            f"use at most {gpus}" + (" (slurm.gpus_per_node=0 runs on CPUs)" if gpus == 0 else "")
        )


def _gpus_in_gres(gres: str) -> int:
    """GPUs per node from a gres string such as ``gpu:8``, ``gpu:a100:4(S:0-1)`` or ``(null)``."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
