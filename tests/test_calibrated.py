"""GPTQ and AWQ through llm-compressor, measured against round-to-nearest on the same grid: the folder holds
integers of the scheme asked for (weights / scale are integers in the scheme's range), transformers loads it, and
on the calibration text the calibrated model stays closer to the float model than round-to-nearest does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillprune.data import calibration_ids
from distillprune.errors import UserError
from distillprune.quant.calibrated import calibrated_folder
from distillprune.quant.model import load_compressed, quantize_model
from distillprune.quant.settings import Scheme, check_block

pytest.importorskip("llmcompressor")


def _logit_error(model: torch.nn.Module, other: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(ids).logits - other(ids).logits).pow(2).mean().item()  # over [n, T, V]


@pytest.mark.parametrize(
    "scheme",
    [Scheme(4, True, "group", 32, "gptq"), Scheme(4, False, "channel", 0, "gptq"), Scheme(4, True, "group", 32, "awq")],
    ids=lambda s: s.name,
)
def test_calibrated_folders_hold_the_scheme_and_beat_round_to_nearest(
    tiny_model_dir: Path, tmp_path: Path, scheme: Scheme
) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = calibration_ids(tok, "shakespeare", 16, 64, seed=0)  # [16, 64]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = calibrated_folder(model, tok, scheme, ids, tmp_path / scheme.name)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model itself is untouched
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (4, scheme.symmetric, scheme.granularity)
    assert len(config["config_groups"]["group_0"]["targets"]) == 4 * 7 and not (folder / "recipe.yaml").exists()
    loaded = load_compressed(folder).eval()
    stored = load_file(folder / "model.safetensors")
    lo, hi = scheme.levels()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        w = loaded.get_submodule(name).weight.detach()  # [out, in]
        scale = stored[f"{name}.weight_scale"].float()  # [out, in / group] or [out, 1]
        blocks = (w / scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)).unflatten(1, (scale.shape[1], -1))
        torch.testing.assert_close(blocks, blocks.round(), atol=1e-3, rtol=0)  # weight = (q - zero) * scale
        if scheme.symmetric:
            assert blocks.round().min() >= lo and blocks.round().max() <= hi
        else:  # q - zero spans at most the 2^bits levels in every block
            assert (blocks.amax(-1) - blocks.amin(-1)).max().round() <= hi - lo
    rtn = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    quantize_model(rtn, Scheme(scheme.bits, scheme.symmetric, scheme.granularity, scheme.group_size))
    calibrated, rounded = _logit_error(model, loaded, ids), _logit_error(model, rtn, ids)
    assert 0 < calibrated < rounded, (calibrated, rounded)


def test_calibration_is_checked_before_any_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="the calibration data is empty"):
        calibrated_folder(
            model, tok, Scheme(4, True, "group", 32, "gptq"), torch.zeros(0, 8, dtype=torch.long), tmp_path
        )
    with pytest.raises(UserError, match="group_size=48 does not divide"):
        calibrated_folder(
            model, tok, Scheme(4, True, "group", 48, "gptq"), torch.ones(2, 8, dtype=torch.long), tmp_path
        )
    with pytest.raises(UserError, match="not granularity=tensor"):
        Scheme(4, True, "tensor", 0, "awq")
    assert not list(tmp_path.iterdir())  # nothing written
    from omegaconf import OmegaConf

    block = OmegaConf.create(
        {"schemes": [{"bits": 4, "method": "gptq", "group_size": 32}], "gguf": {"types": [], "llama_cpp": "auto"}}
    )
    with pytest.raises(UserError, match="calibrates on data"):
        check_block(block, {}, {})
    block.calibration = {"source": "shakespeare", "samples": 8, "seq_len": 32}
    check_block(block, {}, {})
