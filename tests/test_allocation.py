"""Non-uniform per-layer allocation of the pruning ratio and iterative pruning, against dense references: the
spread ratio still sums to the whole ratio with GQA-valid heads, a layer's measured sensitivity is the loss of
really pruning that layer alone, and two rounds without recovery are the one-shot model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, prune_overrides, run_train
from distillprune.errors import UserError
from distillprune.prune import apply, layer_widths, plan, score, select
from distillprune.prune.allocation import allocate, calibration_loss, layer_sensitivity
from distillprune.prune.surgery import cap_shares

IDS = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
LAYERS = list(range(6))


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer):
    folder = make_tiny_model(tmp_path_factory.mktemp("deep") / "llama6", tiny_tokenizer, num_hidden_layers=6)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_allocate_ranks_layers_and_averages_one() -> None:
    shares = allocate({0: 0.5, 1: 0.1, 2: 0.3, 3: 0.0}, spread=0.6)
    assert shares == pytest.approx({0: 0.4, 1: 1.2, 2: 0.8, 3: 1.6})  # most sensitive gives least
    assert sum(shares.values()) == pytest.approx(4.0)
    assert allocate({5: 1.0}, 0.5) == {5: 1.0} and set(allocate({1: 0.0, 2: 0.0}, 0.0).values()) == {1.0}
    with pytest.raises(UserError, match="spread"):
        allocate({0: 1.0, 1: 2.0}, 1.0)


@pytest.mark.parametrize("gqa", ["q_per_group", "kv_groups"])
def test_spread_allocation_sums_to_the_ratio_with_gqa_valid_heads(deep, gqa: str) -> None:
    model = copy.deepcopy(deep)
    total = sum(p.numel() for p in model.parameters())
    sensitivity = {0: 0.9, 1: 0.5, 2: 0.05, 3: 0.2, 4: 0.0, 5: 0.7}
    shares = allocate(sensitivity, spread=0.5)
    ratio = 0.25
    the_plan = plan(model, ratio, LAYERS, gqa, shares=shares)
    scores, _ = score(model, [{"input_ids": IDS}], "l2", LAYERS)
    apply(model, select(scores, the_plan, layer_widths(model), gqa, uniform=True))
    removed = total - sum(p.numel() for p in model.parameters())
    assert removed == the_plan.removed_params
    per_channel = 3 * model.config.hidden_size
    assert abs(removed - ratio * total) <= len(LAYERS) * per_channel / 2  # only channel rounding is left
    widths = layer_widths(model)
    size = {i: 2 * w.heads + 2 * w.kv_heads + 3 * w.intermediate / 16 for i, w in enumerate(widths)}  # ∝ params
    order = sorted(LAYERS, key=lambda i: -sensitivity[i])  # most sensitive first: keeps the most
    assert [size[i] for i in order] == sorted(size.values(), reverse=True)
    assert len(set(size.values())) > 2  # really non-uniform
    for w in widths:  # GQA-valid: whole KV groups, the same number of query heads in each
        assert w.kv_heads >= 1 and w.heads % w.kv_heads == 0
    # the uniform plan is what no shares give
    even = plan(deep, ratio, LAYERS, gqa, shares=dict.fromkeys(LAYERS, 1.0))
    assert plan(deep, ratio, LAYERS, gqa).channels == even.channels


def test_capped_shares_average_one_keep_their_order_and_pass_the_excess_on() -> None:
    shares = allocate({0: 0.9, 1: 0.5, 2: 0.05, 3: 0.2, 4: 0.0, 5: 0.7}, spread=0.5)
    assert cap_shares(shares, 2.0) == shares  # nothing over the cap: unchanged
    capped = cap_shares(shares, 1.2)
    assert sum(capped.values()) == pytest.approx(6.0) and max(capped.values()) == pytest.approx(1.2)
    # 4 and 2 (1.5, 1.3) are over the cap; passing their excess on lifts 3 (1.1) over it too
    assert capped[4] == capped[2] == capped[3] == pytest.approx(1.2)
    free = [0, 5, 1]  # the rest scale up by one factor: the excess in proportion to their shares
    factors = {i: capped[i] / shares[i] for i in free}
    assert len({round(f, 9) for f in factors.values()}) == 1 and factors[0] > 1
    assert [capped[i] for i in sorted(capped, key=lambda i: shares[i])] == sorted(capped.values())
    assert cap_shares(shares, 1.0) == pytest.approx(dict.fromkeys(shares, 1.0))  # a cap of 1 is uniform


@pytest.mark.parametrize("gqa", ["q_per_group", "kv_groups"])
def test_a_share_no_layer_can_give_is_capped_and_the_ratio_still_met(deep, gqa: str) -> None:
    """Two pruned layers of six at a ratio that asks each for most of its parameters: uniform can, 1.5x cannot."""
    model = copy.deepcopy(deep)
    total = sum(p.numel() for p in model.parameters())
    layers, ratio = [1, 4], 0.2
    uniform = plan(model, ratio, layers, gqa)
    assert uniform.removed_params == pytest.approx(ratio * total, rel=0.02)
    shares = allocate({1: 0.0, 4: 1.0}, spread=0.5)  # layer 1 least sensitive: asked for 1.5x
    the_plan = plan(model, ratio, layers, gqa, shares=shares)
    assert the_plan.shares[1] < 1.5 and the_plan.shares[1] + the_plan.shares[4] == pytest.approx(2.0)
    assert the_plan.shares[1] > the_plan.shares[4]  # still spread the sensitivity's way
    assert the_plan.removed_params == pytest.approx(ratio * total, rel=0.02)
    assert the_plan.channels[1] < uniform.channels[1] or the_plan.heads[1] < uniform.heads[1]
    scores, _ = score(model, [{"input_ids": IDS}], "l2", layers)
    apply(model, select(scores, the_plan, layer_widths(model), gqa, uniform=True))
    assert total - sum(p.numel() for p in model.parameters()) == the_plan.removed_params
    for w in layer_widths(model):
        assert w.kv_heads >= 1 and w.heads % w.kv_heads == 0 and w.intermediate >= 1
    with pytest.raises(UserError, match=r"cannot be met on layer \d \(share 1\.00\)"):  # uniform cannot either
        plan(deep, 0.3, layers, gqa, shares=shares)


def test_heads_only_spread_may_leave_the_most_sensitive_layers_whole(deep) -> None:
    """Head pruning alone: whole query heads per layer, so a small share rounds to none; the spread still plans."""
    total, c = sum(p.numel() for p in deep.parameters()), deep.config
    hd = c.hidden_size // c.num_attention_heads
    attention = 2 * hd * c.hidden_size * (c.num_attention_heads + c.num_key_value_heads)  # per layer
    ratio = 0.3 * len(LAYERS) * attention / total  # 30% of each layer's attention: one query head per group
    uniform = plan(deep, ratio, LAYERS, "q_per_group", parts=("heads",))
    shares = allocate({i: float(i) for i in LAYERS}, spread=0.9)  # layer 5 most sensitive
    spread = plan(deep, ratio, LAYERS, "q_per_group", parts=("heads",), shares=shares)
    assert spread.heads[5] == deep.config.num_attention_heads > spread.heads[0]  # layer 5 kept whole
    assert set(uniform.heads.values()) == {uniform.heads[0]} and len(set(spread.heads.values())) > 1
    assert abs(spread.removed_params - uniform.removed_params) <= 0.35 * uniform.removed_params


def test_sensitivity_is_the_loss_of_pruning_that_layer_alone(deep) -> None:
    model = copy.deepcopy(deep)
    batches = [{"input_ids": IDS[:2]}, {"input_ids": IDS[2:]}]
    scores, _ = score(model, batches, "taylor", LAYERS)
    uniform = plan(model, 0.3, LAYERS, "q_per_group")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = layer_sensitivity(model, batches, scores, uniform, "q_per_group")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every weight put back
    base = calibration_loss(model, batches)
    keep = select(scores, uniform, layer_widths(model), "q_per_group", uniform=True)
    for i in LAYERS:  # the reference: really cut only layer i out of a copy
        alone = apply(copy.deepcopy(model), {i: keep[i]})
        assert measured[i] == pytest.approx(calibration_loss(alone, batches) - base, abs=1e-5)
    assert len({round(v, 6) for v in measured.values()}) == len(LAYERS)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_two_rounds_without_recovery_are_one_shot_and_rounds_recover_between(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    base = [*prune_overrides(tiny_model_dir, tiny_text_file, tmp_path), "prune.importance=l2", "prune.ratio=0.3"]
    one = [*base, f"output_dir={tmp_path / 'one'}", "trainer.max_steps=0"]
    two = [*base, f"output_dir={tmp_path / 'two'}", "trainer.max_steps=0", "prune.rounds=2"]
    run_train("recipe=prune_lora", *one)
    run_train("recipe=prune_lora", *two)
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # l2 scores of survivors don't move
    rounds = json.loads((tmp_path / "two" / "metrics.json").read_text())["rounds"]
    assert [r["ratio"] for r in rounds] == [0.15, 0.3] and rounds[0]["params"] > rounds[1]["params"]
    # with recovery steps between rounds and the sensitivity allocation: each round trains its share, in its folder
    spread = [*base, f"output_dir={tmp_path / 'spread'}", "trainer.max_steps=4", "prune.rounds=2",
              "prune.importance=taylor", "prune.allocation.method=sensitivity", "prune.layers=0:4"]  # fmt: skip
    run_train("recipe=prune_lora", *spread)
    metrics = json.loads((tmp_path / "spread" / "metrics.json").read_text())
    assert [r["recovery_steps"] for r in metrics["rounds"]] == [2, 2] and "val_ppl_recovered" in metrics["rounds"][0]
    assert (tmp_path / "spread" / "round1" / "checkpoints").is_dir()
    assert sorted(metrics["layer_shares"]) == ["0", "1", "2", "3"]
    assert len({json.dumps(w) for w in metrics["widths"]}) > 1  # the layers got different widths
    removed = metrics["params"]["removed_fraction"]
    assert removed == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["prune.allocation.method=owl"], "prune.allocation.method 'owl' is unknown; choose uniform, sensitivity"),
        (["prune.allocation.method=sensitivity", "prune.uniform=false"], "choose one of the two"),
        (["prune.rounds=2", "trainer.max_steps=-1"], "prune.rounds=2 shares trainer.max_steps"),
        (["prune.rounds=0"], "prune.rounds=0: must be an integer >= 1"),
    ],
)
def test_bad_allocation_and_rounds_are_one_line_errors(tiny_model_dir, tiny_text_file, tmp_path, extra, message):
    done = run_train("recipe=prune_lora", *prune_overrides(tiny_model_dir, tiny_text_file, tmp_path), *extra,
                     check=False)  # fmt: skip
    assert done.returncode != 0 and message in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "metrics.json").exists()
