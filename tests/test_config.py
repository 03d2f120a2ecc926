"""Recipes, overrides and their one-line errors, through the API and through ``python train.py``."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import run_train
from distillprune.config import available_recipes, instantiate, load_recipe
from distillprune.errors import UserError
from distillprune.losses import JSD


def test_every_recipe_has_a_description_and_loads() -> None:
    recipes = available_recipes()
    assert {"logit_distill", "sft"} <= set(recipes)
    for name, desc in recipes.items():
        assert desc, f"{name} has no header description"
        cfg = load_recipe([f"recipe={name}"])
        assert cfg.recipe == name and "_target_" in cfg and cfg.output_dir is None


def test_overrides_set_values_with_types() -> None:
    cfg = load_recipe(
        [
            "recipe=logit_distill",
            "system.lr=1e-3",
            "trainer.max_steps=7",
            "student.keep_layers=[0,29]",
            "output_dir=/tmp/x",
            "system.kd_weight=1",
        ]
    )
    assert cfg.system.lr == 1e-3 and cfg.trainer.max_steps == 7 and list(cfg.student.keep_layers) == [0, 29]
    assert cfg.system.kd_weight == 1 and cfg.output_dir == "/tmp/x"


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("trainer.max_step=3", "unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'"),
        ("lossx.temperature=2", "unknown key 'lossx'; did you mean 'loss'"),
        ("trainer.max_steps=abc", "trainer.max_steps expects int, got 'abc'"),
        ("system.lr=fast", "system.lr expects float"),
        ("student.keep_layers=3", "student.keep_layers expects list"),
        ("trainer.max_steps=2.5", "trainer.max_steps expects int"),
        ("data=shakespeare", "data expects mapping, .*; set one of its keys, e.g. data.source=shakespeare"),
        ("loss.beta=0.5", "unknown key 'loss.beta'"),
        ("maxsteps", "is not key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(arg: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        load_recipe(["recipe=logit_distill", arg])
    assert "\n" not in str(err.value)


def test_unknown_recipe_lists_the_available_ones() -> None:
    with pytest.raises(UserError, match="unknown recipe 'nope'; available recipes: .*logit_distill.*sft"):
        load_recipe(["recipe=nope"])
    with pytest.raises(UserError, match="no recipe given"):
        load_recipe(["trainer.max_steps=3"])


def test_changing_a_target_changes_its_valid_keys() -> None:
    cfg = load_recipe(["recipe=logit_distill", "loss._target_=distillprune.losses.JSD", "loss.beta=0.25"])
    loss = instantiate(cfg.loss)
    assert isinstance(loss, JSD) and loss.beta == 0.25 and loss.temperature == cfg.loss.temperature == 1.0
    cfg = load_recipe(["recipe=logit_distill", "loss._target_=distillprune.losses.TVD"])
    assert set(cfg.loss) == {"_target_", "temperature"}  # the keys TVD also takes survive the switch


def test_null_and_empty_mapping_are_open() -> None:
    cfg = load_recipe(
        [
            "recipe=logit_distill",
            "student.config_overrides.num_hidden_layers=2",
            "logger.wandb.entity=me",
            "teacher=null",
        ]
    )
    assert cfg.student.config_overrides.num_hidden_layers == 2 and cfg.logger.wandb.entity == "me"
    assert cfg.teacher is None
    assert OmegaConf.is_struct(cfg)


def test_cli_lists_recipes_and_fails_in_one_line() -> None:
    listing = run_train()
    assert "logit_distill" in listing.stdout and "sft" in listing.stdout and "usage:" in listing.stdout
    assert "logit_distill" in run_train("--help").stdout
    for args, message in [
        (["recipe=nope"], "unknown recipe 'nope'"),
        (["recipe=sft", "trainer.max_step=3"], "did you mean 'trainer.max_steps'"),
        (["recipe=sft", "trainer.max_steps=x"], "expects int"),
        (
            ["recipe=sft", "teacher.name=no-such-model", "student.name=no-such-model"],
            "teacher.name=no-such-model: not a packaged alias",
        ),
        (["recipe=sft", "data.source=missing/corpus.txt"], "data.source=missing/corpus.txt: no such file or folder"),
        (
            ["recipe=logit_distill", "loss._target_=distillprune.losses.JSD", "loss.beta=1.5"],
            "loss.beta=1.5: must be a number in [0, 1]",
        ),
        (["recipe=logit_distill", "teacher=null"], "system.kd_weight > 0 needs a teacher"),
        (["recipe=sft", "resume=/nowhere/last.ckpt"], "no such checkpoint file"),
    ]:
        done = run_train(*args, check=False)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
        assert "Traceback" not in done.stderr
