"""The pruning recipes' stages: calibrate -> prune -> evaluate -> recover (LoRA or KD from the dense model) ->
export; ``prune_lora``, ``prune_distill`` and ``prune_magnitude`` run them.

``prune_lora`` trains LoRA adapters (peft) on the pruned model, merges them and exports a plain HF folder.
``prune_distill`` fine-tunes the pruned model with logit KD, the unpruned model as its teacher. Both write
``metrics.json`` with parameter counts, validation perplexity (dense / pruned / recovered), generation tokens/s
(dense / pruned), per-layer widths, the pruning time and the peak memory of scoring.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillprune import self_data
from distillprune.config import instantiate
from distillprune.data import calibration_ids
from distillprune.distill import frozen
from distillprune.errors import UserError
from distillprune.evaluation import speed
from distillprune.evaluation.metrics import count_params, perplexity
from distillprune.evaluation.suite import evaluate_stage
from distillprune.hardware import resolve_dtype, run_device
from distillprune.models import DTYPES, export, load_model, load_tokenizer, shared_vocab_size
from distillprune.prune.allocation import allocate, layer_sensitivity
from distillprune.prune.depth import block_importance, candidates, choose, remove_layers
from distillprune.prune.groups import family_of, layer_widths
from distillprune.prune.importance import score
from distillprune.prune.kv_merge import check as check_merge
from distillprune.prune.kv_merge import kv_bytes_per_token, merge_kv_heads
from distillprune.prune.magnitude import check_sparsity, finalize, magnitude_prune, sparsity_of
from distillprune.prune.surgery import Plan, apply, plan, select
from distillprune.ranks import barrier, rank_and_world
from distillprune.recipes.common import divergence, prepare_output_dir, train, write_metrics

log = logging.getLogger(__name__)


def magnitude_and_recover(cfg: DictConfig) -> dict[str, Any]:
    """Unstructured magnitude pruning to ``prune.sparsity``, KD recovery from the dense model with the masks
    fixed, export; reports the (absent) speed-up honestly by measuring it."""
    loss = divergence(cfg)  # cheap checks first
    run = _setup(cfg, check=lambda model, layers: check_sparsity(cfg.prune.sparsity))
    dense, metrics = _frozen_teacher(copy.deepcopy(run.model)), run.metrics
    t0 = time.perf_counter()
    metrics["sparsity"] = round(magnitude_prune(run.model, cfg.prune.sparsity, run.layers), 4)
    metrics["prune_s"] = round(time.perf_counter() - t0, 1)
    _measure(run, "pruned")
    metrics["speedup"] = "none: unstructured zeros run through the same dense kernels"
    model, loggers = distill_recovery(cfg, run.model, dense, loss, run.data, run.out)
    control = dense_control(cfg, distill_recovery, loss, run.tokenizer)
    if model is None:  # not global rank 0: the training is this rank's whole share
        return {}
    finalize(model)
    # speed of the exported model: masks folded into plain weights, the same shapes and kernels as dense (the
    # measurement after pruning ran with the mask reparametrisation attached, which only adds work)
    metrics["tokens_per_s"]["pruned"] = generation_speed(model, run.tokenizer)
    metrics["sparsity_after_recovery"] = round(sparsity_of(model, run.layers), 4)
    metrics["params"]["pruned"] = metrics["params"]["dense"]  # same shapes; zeros are still parameters
    return _finish(cfg, run, (model, loggers), {"dense": cfg.model}, control)


def prune_and_recover(cfg: DictConfig, recover: Callable[..., Any], pruner: Pruner | None = None) -> dict[str, Any]:
    """Calibrate and prune once (rank 0) with ``pruner`` (width: heads and channels, the default; ``Depth``;
    ``MergeKV``), measure, then ``recover`` (``lora_recovery`` or ``distill_recovery``), evaluate and export."""
    pruner = pruner or Width()
    loss = divergence(cfg) if recover is distill_recovery else None  # the dense model is the teacher
    run = _setup(cfg, check=lambda model, layers: pruner.check(cfg, model, layers))
    model, metrics = run.model, run.metrics
    lead = rank_and_world()[0] == 0
    # the dense model is kept only where it is used: as the KD teacher (frozen: bf16 on a GPU), or for the sweep
    dense = copy.deepcopy(model) if recover is distill_recovery or (lead and pruner.needs_dense(cfg)) else None
    rounds, teacher, recovery_s = pruner.rounds(cfg), None, 0.0
    steps = round_steps(int(cfg.trainer.max_steps), rounds)
    if lead:  # pruned once; the other ranks load the result
        metrics["widths_dense"] = [w.as_dict() for w in layer_widths(model)]
        metrics["kv_bytes_per_token"] = {"dense": kv_bytes_per_token(model)}
        prune_s = 0.0
        for k in range(rounds):
            if k:  # iterative: recover the previous round's model for its share of the steps, then prune further
                teacher = teacher or (_frozen_teacher(dense) if recover is distill_recovery else None)
                t0 = time.perf_counter()
                model = run.model = recover(_round_config(cfg, steps[k - 1]), model, teacher, loss, run.data,
                                            run.out / f"round{k}")[0]  # fmt: skip
                recovery_s += time.perf_counter() - t0
                metrics["rounds"][-1]["val_ppl_recovered"] = perplexity(model, run.data.val_dataloader())["val_ppl"]
            t0 = time.perf_counter()
            metrics |= pruner.prune(cfg, run, dense)
            prune_s += time.perf_counter() - t0
            if rounds > 1:
                ppl = perplexity(model, run.data.val_dataloader())["val_ppl"]
                metrics.setdefault("rounds", []).append({
                    "ratio": round(cfg.prune.ratio * (k + 1) / rounds, 4), "params": count_params(model),
                    "recovery_steps": steps[k], "val_ppl_pruned": ppl,
                })  # fmt: skip
        metrics["prune_s"] = round(prune_s, 1)
        metrics["params"]["pruned"] = count_params(model)
        metrics["params"]["removed_fraction"] = round(1 - metrics["params"]["pruned"] / metrics["params"]["dense"], 4)
        metrics["widths"] = [w.as_dict() for w in layer_widths(model)]
        metrics["kv_bytes_per_token"]["pruned"] = kv_bytes_per_token(model)
        if len(metrics["widths"]) != len(metrics["widths_dense"]):  # depth: the per-layer plot compares nothing
            metrics.pop("widths_dense")
        _measure(run, "pruned")
        export(model, run.tokenizer, run.out / "pruned")
    barrier("pruning on rank 0")
    # the same random state on every rank from here: LoRA adapters are initialised per rank, and FSDP2 shards each
    # rank's own values (nothing is broadcast), so rank 0's extra work above must not leave it a different state
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if not lead:
        log.info("loading the model that rank 0 pruned from %s", run.out / "pruned")
        model = load_model(**{**cfg.model, "name": str(run.out / "pruned")}, device=run.model.device).eval()
    teacher = teacher or (_frozen_teacher(dense) if recover is distill_recovery else None)
    t0 = time.perf_counter()
    recovered = recover(_round_config(cfg, steps[-1]), model, teacher, loss, run.data, run.out)
    metrics["recovery_s"] = round(time.perf_counter() - t0 + recovery_s, 1)  # the training alone, every round
    del teacher
    control = dense_control(cfg, recover, loss, run.tokenizer)
    return _finish(cfg, run, recovered, {"dense": cfg.model, "pruned": run.out / "pruned"}, control)


def round_steps(total: int, rounds: int) -> list[int]:
    """The recovery steps after each of ``rounds`` pruning rounds: equal shares of ``total``, the rest last
    (validate refuses several rounds without trainer.max_steps)."""
    share = max(total, 0) // rounds
    return [share] * (rounds - 1) + [total - share * (rounds - 1)]


def _round_config(cfg: DictConfig, steps: int) -> DictConfig:
    """``cfg`` with one round's recovery steps; an earlier round's own folder resumes from its own checkpoints."""
    if steps == cfg.trainer.max_steps:
        return cfg
    own = copy.deepcopy(cfg)
    own.trainer.max_steps = steps
    own.resume = "auto" if cfg.get("resume") not in (None, "", "never") else None
    return own


def dense_control(
    cfg: DictConfig, recover: Callable[..., Any], loss: Any, tok: PreTrainedTokenizerBase
) -> PreTrainedModel | None:
    """With ``control: true``, the dense model given the same recovery as the pruned one (what ``prune.ratio=0``
    gives: the same data, steps, schedule and seed, the dense model as its own KD teacher): the baseline that a
    recovered model is fairly compared with, since recovery on one corpus also improves an unpruned model on it.
    It trains in ``output_dir/control`` (its own checkpoints and logs: a requeued job resumes it); on several
    ranks it is skipped with a warning for now."""
    if not cfg.get("control"):
        return None
    if (world := rank_and_world()[1]) > 1:  # a second fit in a multi-rank process hung in testing
        log.warning("control: skipped on %d ranks (run it with trainer.devices=1)", world)
        return None
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = run_device(str(cfg.trainer.accelerator))
    model = load_model(**cfg.model, device=device).eval()
    teacher = _frozen_teacher(load_model(**cfg.model, device=device).eval()) if recover is not lora_recovery else None
    data = instantiate(cfg.data, tokenizer=tok, seed=cfg.seed)  # a fresh position
    data.setup("fit")
    out = Path(cfg.output_dir) / "control"
    out.mkdir(parents=True, exist_ok=True)
    log.info("dense control: the unpruned model through the same recovery, in %s", out)
    own = cfg.copy()  # a resumed run resumes its control from the control's own newest checkpoint
    own.resume = "auto" if cfg.get("resume") not in (None, "", "never") else None
    return recover(own, model, teacher, loss, data, out)[0]


class Pruner:
    """How a pruning recipe shrinks the model: ``check`` the request on the loaded model before any work (its
    result is ``run.checked``), then ``prune`` ``run.model`` in place and return what it adds to the metrics."""

    def check(self, cfg: DictConfig, model: PreTrainedModel, layers: list[int]) -> Any:
        raise NotImplementedError

    def prune(self, cfg: DictConfig, run: _Run, dense: PreTrainedModel | None) -> dict[str, Any]:
        raise NotImplementedError

    def needs_dense(self, cfg: DictConfig) -> bool:
        return False

    def rounds(self, cfg: DictConfig) -> int:
        return 1


class Width(Pruner):
    """LLM-Pruner: attention heads (GQA-aware) and MLP channels by importance on calibration data (``prune``), in
    ``prune.rounds`` rounds; every round's widths are planned on the dense model, spread over the layers by
    ``prune.allocation``."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []  # one per round, from the dense model; filled by the first round
        self.done = 0  # rounds pruned so far

    def rounds(self, cfg: DictConfig) -> int:
        return int(cfg.prune.get("rounds", 1))

    def check(self, cfg: DictConfig, model: PreTrainedModel, layers: list[int]) -> Any:
        p = cfg.prune  # the allocation and rounds settings were checked with the other settings (validate)
        return plan(model, p.ratio, layers, p.gqa, p.round_to, tuple(p.parts))

    def prune(self, cfg: DictConfig, run: _Run, dense: PreTrainedModel | None) -> dict[str, Any]:
        p = cfg.prune
        batches = calibration(cfg, p.calibration, run.tokenizer)
        scores, peak_mb = score(run.model, batches, p.importance, run.layers, p.aggregation, cfg.seed)
        out: dict[str, Any] = {"peak_mem_mb": round(peak_mb, 1)}
        if not self.plans:  # the dense model: plan every round's widths on it
            shares = None
            allocation = p.get("allocation") or {"method": "uniform"}
            if allocation["method"] == "sensitivity" and p.ratio > 0:  # ratio 0 removes nothing to spread
                sensitivity = layer_sensitivity(run.model, batches, scores, run.checked, p.gqa)
                shares = allocate(sensitivity, float(allocation["spread"]))
                out["layer_sensitivity"] = {str(i): round(v, 5) for i, v in sensitivity.items()}
            n = self.rounds(cfg)
            self.plans = [plan(run.model, p.ratio * (k + 1) / n, run.layers, p.gqa, p.round_to, tuple(p.parts), shares)
                          for k in range(n)]  # fmt: skip
            if shares:  # what the full ratio's plan gives, after capping the shares no layer can give
                out["layer_shares"] = {str(i): round(v, 4) for i, v in self.plans[-1].shares.items()}
            if p.sweep:
                out["sweep"] = sweep(cfg, dense, scores, run, shares)
        the_plan = self.plans[self.done]
        self.done += 1
        apply(run.model, select(scores, the_plan, layer_widths(run.model), p.gqa, p.uniform, p.round_to))
        return out

    def needs_dense(self, cfg: DictConfig) -> bool:
        return bool(cfg.prune.sweep)


class Depth(Pruner):
    """Whole decoder layers by block importance on calibration data (``depth``)."""

    def check(self, cfg: DictConfig, model: PreTrainedModel, layers: list[int]) -> Any:
        d = cfg.depth
        return candidates(model.config.num_hidden_layers, d.remove, d.keep_first, d.keep_last)

    def prune(self, cfg: DictConfig, run: _Run, dense: PreTrainedModel | None) -> dict[str, Any]:
        d = cfg.depth
        scores = block_importance(run.model, calibration(cfg, d.calibration, run.tokenizer), d.importance)
        drop = choose(scores, d.remove, run.checked)
        remove_layers(run.model, drop)
        return {"removed_layers": drop, "block_importance": [round(float(s), 6) for s in scores]}


class MergeKV(Pruner):
    """Mean-pooled KV heads: MHA -> GQA -> MQA (``merge``)."""

    def check(self, cfg: DictConfig, model: PreTrainedModel, layers: list[int]) -> Any:
        check_merge(model, cfg.merge.kv_heads)

    def prune(self, cfg: DictConfig, run: _Run, dense: PreTrainedModel | None) -> dict[str, Any]:
        merge_kv_heads(run.model, cfg.merge.kv_heads)
        return {}


def sweep(
    cfg: DictConfig, dense: PreTrainedModel, scores: Any, run: _Run, shares: dict[int, float] | None
) -> list[dict[str, float]]:
    """Prune copies of the dense model to each ratio of ``prune.sweep`` with the scores and layer shares already
    computed (no recovery); the validation perplexity and batch-1 generation speed of each, the dense model as
    ratio 0."""
    p = cfg.prune
    rows = [{"ratio": 0.0, "params": count_params(dense), "removed_fraction": 0.0,
             "ppl": run.metrics["val_ppl"]["dense"], "tokens_per_s": run.metrics["tokens_per_s"]["dense"]}]  # fmt: skip
    for ratio in sorted(float(r) for r in p.sweep):
        model = copy.deepcopy(dense)
        checked = plan(model, ratio, run.layers, p.gqa, p.round_to, tuple(p.parts), shares)
        apply(model, select(scores, checked, layer_widths(model), p.gqa, p.uniform, p.round_to))
        rows.append({
            "ratio": ratio,
            "params": count_params(model),
            "removed_fraction": round(1 - count_params(model) / rows[0]["params"], 4),
            "ppl": perplexity(model, run.data.val_dataloader())["val_ppl"],
            "tokens_per_s": generation_speed(model, run.tokenizer),
        })  # fmt: skip
        del model
    return rows


@dataclass
class _Run:
    out: Path
    model: PreTrainedModel
    layers: list[int]
    checked: Any  # what the recipe's check returned (the structured plan)
    tokenizer: PreTrainedTokenizerBase
    data: L.LightningDataModule
    metrics: dict[str, Any]
    start: float


def _setup(cfg: DictConfig, check: Callable[[PreTrainedModel, list[int]], Any]) -> _Run:
    """Load the model, check the request before any work, load the data, measure the dense model."""
    start = time.perf_counter()
    out = prepare_output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = load_model(**cfg.model, device=run_device(str(cfg.trainer.accelerator))).eval()
    family_of(model)  # unsupported architectures fail here
    layers = _layers(str(cfg.prune.layers), model.config.num_hidden_layers) if "prune" in cfg else []
    checked = check(model, layers)
    tok = load_tokenizer(cfg.model.name)
    written = self_data.resolve(cfg, model, tok, out) if "self_data" in cfg else {}  # data.source part `self`
    data = instantiate(cfg.data, tokenizer=tok, seed=cfg.seed)
    data.setup("fit")
    metrics: dict[str, Any] = {"params": {"dense": count_params(model)}, "val_ppl": {}, "tokens_per_s": {}}
    metrics |= {"self_data": written} if written else {}
    run = _Run(out, model, layers, checked, tok, data, metrics, start)
    _measure(run, "dense")
    return run


def _measure(run: _Run, stage: str) -> None:
    if rank_and_world()[0] != 0:  # measured once; the other ranks only train
        return
    run.metrics["val_ppl"][stage] = perplexity(run.model, run.data.val_dataloader())["val_ppl"]
    run.metrics["tokens_per_s"][stage] = generation_speed(run.model, run.tokenizer)


def _finish(
    cfg: DictConfig,
    run: _Run,
    recovered: tuple[PreTrainedModel | None, list[Logger]],
    before: dict[str, DictConfig | Path],
    control: PreTrainedModel | None = None,
) -> dict[str, Any]:
    """Measure and export the recovered model, then evaluate it beside the models of ``before``, loaded again
    (a model node, or an exported folder: training may have sharded the copies in memory), and the dense
    ``control`` when there is one, and write the report."""
    model, loggers = recovered
    if model is None:  # not global rank 0: the training is this rank's whole share
        return {}
    run.metrics["val_ppl"]["recovered"] = perplexity(model, run.data.val_dataloader())["val_ppl"]
    export(model, run.tokenizer, run.out / "final")
    device = next(model.parameters()).device
    spec = lambda v: {**cfg.model, "name": str(v)} if isinstance(v, Path) else v
    models = {k: load_model(**spec(v), device=device).eval() for k, v in before.items()}
    if control is not None:
        run.metrics["val_ppl"]["control"] = perplexity(control, run.data.val_dataloader())["val_ppl"]
        models["control"] = control.eval()
    evaluate_stage(cfg, {**models, "recovered": model}, run.tokenizer, run.out, run.metrics, loggers)
    run.metrics.update(wall_s=round(time.perf_counter() - run.start, 1), output_dir=str(run.out))
    write_metrics(run.metrics, run.out)
    return run.metrics


def lora_recovery(cfg, model, dense, loss, data, out) -> tuple[PreTrainedModel | None, list[Logger]]:  # noqa: ANN001
    """Train LoRA adapters on the pruned model with CE and merge them: the recovered model and its loggers."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    loggers = []
    if cfg.trainer.max_steps > 0:
        trainer, _, _, peft_model = train(
            cfg, peft_model, None, None, data, out, system_overrides={"kd_weight": 0.0, "lmbda": 0.0}
        )
        loggers = trainer.loggers
    return (peft_model.merge_and_unload() if peft_model is not None else None), loggers


def distill_recovery(cfg, model, dense, loss, data, out) -> tuple[PreTrainedModel | None, list[Logger]]:  # noqa: ANN001
    """Fine-tune the pruned model with logit KD from the dense one: the recovered model and its loggers."""
    vocab = shared_vocab_size(dense, model, data.tokenizer, data.tokenizer)
    if cfg.trainer.max_steps == 0:
        return model, []
    trainer, _, _, model = train(cfg, model, dense, loss, data, out, system_overrides={"vocab_size": vocab})
    return model, trainer.loggers


def _frozen_teacher(dense: PreTrainedModel) -> PreTrainedModel:
    """The unpruned model as a KD teacher: frozen, in the frozen-model dtype (bfloat16 on a GPU)."""
    return frozen(dense.to(DTYPES[resolve_dtype("auto", dense.device, "teacher")]))


def _layers(spec: str, n: int) -> list[int]:
    """``all``, a slice such as ``3:27``, or a comma list such as ``0,5,9``."""
    try:
        if spec == "all":
            return list(range(n))
        if ":" in spec:
            a, b = spec.split(":")
            return list(range(n))[int(a or 0) : int(b) if b else n]
        return sorted({int(i) for i in str(spec).split(",")})
    except ValueError:
        raise UserError(f"prune.layers '{spec}': use all, a slice like 3:27, or indices like 0,5,9") from None


def calibration(cfg: DictConfig, c: DictConfig, tok) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
    """Batches of ``c.samples`` calibration windows of ``c.seq_len`` tokens from ``c.source``."""
    ids = calibration_ids(tok, c.source, c.samples, c.seq_len, cfg.seed)  # [n, seq_len]
    return [{"input_ids": ids[i : i + c.batch_size]} for i in range(0, len(ids), c.batch_size)]


def generation_speed(model: PreTrainedModel, tok, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy generation tokens/s at batch 1 with the KV cache after a fixed prompt (median of ``repeats``)."""
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids  # [1, P]
    ids = ids.to(next(model.parameters()).device)
    return speed.generation_speed(model, ids, [1], new_tokens, repeats, tok.pad_token_id)["1"]["tokens_per_s"]
