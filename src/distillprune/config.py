"""Recipes: complete OmegaConf YAML files in ``recipes/``, with ``key=value`` overrides on the command line.

A recipe is closed (struct mode): an override may only set keys that the recipe has, to a value of the type the
recipe gives, with two openings: a key whose recipe value is ``null`` takes any type, and a key whose recipe
value is an empty mapping ``{}`` takes any sub-keys. ``_target_`` names a callable by its dotted path; it is the
only indirection (``instantiate``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from distillprune.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def available_recipes(recipes_dir: Path = RECIPES_DIR) -> dict[str, str]:
    """Recipe names with their one-line descriptions (the first line of each file's header comment)."""
    out = {}
    for path in sorted(recipes_dir.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        desc = first.lstrip("# ").split(": ", 1)[-1] if first.startswith("#") else ""
        out[path.stem] = desc
    return out


def recipe_listing(recipes_dir: Path = RECIPES_DIR) -> str:
    """The help text: usage and every recipe with its description."""
    lines = ["usage: python train.py recipe=NAME [key=value ...]", "", "recipes:"]
    recipes = available_recipes(recipes_dir)
    width = max((len(n) for n in recipes), default=0)
    lines += [f"  {name.ljust(width)}  {desc}" for name, desc in recipes.items()]
    return "\n".join(lines)


def default_output_dir(recipe: str) -> str:
    """``runs/<recipe>-<id>``, the same for every process of one launch: the SLURM job id (every task and every
    requeued attempt), torchrun's rendezvous id (every node of a multi-node launch), else a timestamp."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"runs/{recipe}-{job}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"runs/{recipe}-{run_id}"
    return f"runs/{recipe}-{datetime.now():%Y%m%d-%H%M%S}"


def load_recipe(argv: list[str], recipes_dir: Path = RECIPES_DIR) -> DictConfig:
    """Parse ``recipe=NAME key=value ...`` into a closed, validated config with ``recipe`` and ``output_dir`` set."""
    pairs = []
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"argument '{arg}' is not key=value (e.g. recipe=logit_distill trainer.max_steps=10)")
        key, value = arg.split("=", 1)
        pairs.append((key.strip(), value))
    recipe = [v for k, v in pairs if k == "recipe"]
    if not recipe:
        raise UserError("no recipe given; " + _choices(recipes_dir))
    name = recipe[-1]
    path = Path(name) if name.endswith((".yaml", ".yml")) else recipes_dir / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown recipe '{name}'; " + _choices(recipes_dir))
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if "output_dir" not in cfg:
        cfg.output_dir = None
    if "resume" not in cfg:
        cfg.resume = None
    cfg.recipe = path.stem
    OmegaConf.set_struct(cfg, True)
    for key, raw in pairs:
        if key != "recipe":
            apply_override(cfg, key, raw)
    return cfg


def apply_override(cfg: DictConfig, key: str, raw: str) -> None:
    """Set dotted ``key`` from its command-line text, checking that the key exists and the type fits."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): keep the text, the type check decides
    if value is not None and not isinstance(value, (list, dict)) and _is_str_key(cfg, key):
        value = raw  # a text setting keeps its text: YAML 1.1 would read "1:3" as 63 and "no" as False
    set_value(cfg, key, value)


def _is_str_key(cfg: DictConfig, key: str) -> bool:
    node = OmegaConf.select(cfg, key, default=None)
    return isinstance(node, str)


def set_value(cfg: DictConfig, key: str, value: Any) -> None:
    """Set dotted ``key`` to a parsed value; a mapping sets its sub-keys one by one (each checked)."""
    parent, leaf = _parent_of(cfg, key)
    current = parent[leaf] if leaf in parent else _default(_target_params(parent).get(leaf))
    if isinstance(value, dict) and isinstance(current, DictConfig) and len(current):
        for sub, sub_value in value.items():
            set_value(cfg, f"{key}.{sub}", sub_value)
        return
    if isinstance(value, str) and _kind(current) in (int, float):
        value = _number(value, _kind(current))
    _check_type(key, current, value)
    with _open(parent):
        parent[leaf] = value
        if leaf == "_target_":
            accepted = _target_params(parent)
            for stale in [k for k in parent if k != "_target_" and accepted and k not in accepted]:
                del parent[stale]


def instantiate(node: DictConfig | dict, /, **kwargs: Any) -> Any:
    """Call the ``_target_`` of ``node`` with its other keys (as plain containers) and ``kwargs`` (which win)."""
    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    params = {k: v for k, v in params.items() if k not in kwargs}
    target = params.pop("_target_", None)
    if target is None:
        raise UserError(f"no _target_ in {params}")
    func = locate(target)
    try:
        inspect.signature(func).bind(**params, **kwargs)
    except TypeError as err:
        raise UserError(f"{target}: {err}") from None
    try:
        return func(**params, **kwargs)
    except ValueError as err:  # constructors reject bad settings with ValueError: that is the user's input
        raise UserError(f"{target}: {err}") from None


def locate(dotted: str) -> Any:
    """Import ``package.module.attr`` and return the attribute."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"_target_ '{dotted}' cannot be imported") from None


def _choices(recipes_dir: Path) -> str:
    names = ", ".join(available_recipes(recipes_dir)) or "(none)"
    return f"available recipes: {names}"


def _parent_of(cfg: DictConfig, key: str) -> tuple[DictConfig, str]:
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        done = ".".join(parts[:depth])
        if isinstance(node, ListConfig):
            raise UserError(f"'{done}' is a list; set it whole, e.g. {done}=[1,2,3]")
        if not isinstance(node, DictConfig):
            raise UserError(f"'{done}' is a {type(node).__name__}, it has no key '{part}'")
        if part not in node and not _is_open(node) and part not in _target_params(node):
            raise UserError(_unknown_key(node, done, part))
        if depth == len(parts) - 1:
            return node, part
        if part not in node:
            with _open(node):
                node[part] = {}
        node = node._get_node(part)
    raise AssertionError("unreachable")


def _is_open(node: DictConfig) -> bool:
    return len(node) == 0


def _target_params(node: DictConfig) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a node's ``_target_``: the keys such a node may take."""
    if "_target_" not in node:
        return {}
    try:
        params = inspect.signature(locate(node._target_)).parameters
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p for k, p in params.items() if p.kind in kinds}


def _open(node: DictConfig) -> Any:
    return open_dict(node)


def _unknown_key(node: DictConfig, prefix: str, part: str) -> str:
    full = lambda k: f"{prefix}.{k}" if prefix else k
    valid = list(dict.fromkeys([str(k) for k in node] + list(_target_params(node))))
    near = difflib.get_close_matches(part, valid, n=3, cutoff=0.5)
    if near:
        return f"unknown key '{full(part)}'; did you mean {' or '.join(repr(full(k)) for k in near)}?"
    return f"unknown key '{full(part)}'; valid keys here: {', '.join(full(k) for k in valid)}"


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}


def _kind(value: Any) -> type | None:
    if value is None:
        return None
    if isinstance(value, (ListConfig, list, tuple)):
        return list
    if isinstance(value, (DictConfig, dict)):
        return dict
    return type(value)


def _default(param: inspect.Parameter | None) -> Any:
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def _number(text: str, want: type) -> Any:
    try:  # YAML 1.1 reads 1e-4 as a string
        number = float(text)
    except ValueError:
        return text
    return int(number) if want is int and number.is_integer() and "." not in text else number


def _check_type(key: str, current: Any, value: Any) -> None:
    want, got = _kind(current), _kind(value)
    if want is None or got is None:  # a null in the recipe takes anything; null turns a key off
        return
    if want is got or (want is float and got is int):
        return
    keys = [k for k in current if not str(k).startswith("_")] if want is dict else []  # a group of keys
    hint = f"; set one of its keys, e.g. {key}.{keys[0]}={value}" if keys else ""
    raise UserError(
        f"{key} expects {_TYPE_NAMES.get(want, want.__name__)}, got {value!r} ({_TYPE_NAMES.get(got, got.__name__)})"
        + hint
    )
