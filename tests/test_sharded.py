"""Sharded loading's parts in one process: the meta-device skeleton (no parameter memory, tied weights, the
kept layers' names in the files) and its one-line errors. Two-rank training through it is in test_strategies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from distillprune import sharded
from distillprune.errors import UserError
from distillprune.evaluation.metrics import count_params


def test_skeleton_holds_no_parameters_and_names_each_tensor_in_the_files(tiny_model_dir: Path) -> None:
    model = sharded.skeleton(str(tiny_model_dir), keep_layers=[0, 3])
    assert all(p.is_meta for p in model.parameters())
    assert sharded.resident_numel(model) == 0 and count_params(model) > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as from_pretrained ties them
    assert not model.model.rotary_emb.inv_freq.is_meta  # buffers are computed, not read
    assert model.config.num_hidden_layers == 2 and model.generation_config.eos_token_id is not None
    names = sharded.weights_source(model).names
    assert names["model.layers.1.mlp.up_proj.weight"] == "model.layers.3.mlp.up_proj.weight"
    assert names["model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    with sharded.weights_source(model).open() as read:  # only the rows asked for are read
        rows = read("model.layers.1.mlp.up_proj.weight", slice(2, 5))
    want = load_file(tiny_model_dir / "model.safetensors")["model.layers.3.mlp.up_proj.weight"][2:5]
    torch.testing.assert_close(rows, want, rtol=0, atol=0)


def test_a_checkpoint_that_cannot_be_read_in_shards_is_a_one_line_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model_dir, renamed)
    state = load_file(renamed / "model.safetensors")
    state["model.norm.gamma"] = state.pop("model.norm.weight")  # an old name that transformers would convert
    save_file(state, renamed / "model.safetensors")
    with pytest.raises(UserError, match=r"no tensor 'model.norm.weight' .*\(use trainer.strategy=deepspeed_stage_2"):
        sharded.skeleton(str(renamed))
    (renamed / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no safetensors weights"):
        sharded.skeleton(str(renamed))


def test_one_rank_or_a_replicating_strategy_loads_whole() -> None:
    for strategy in ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"):  # one process here
        assert sharded.loading(OmegaConf.create({"trainer": {"strategy": strategy}})) == "whole"
