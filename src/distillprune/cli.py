"""``python train.py recipe=NAME key=value ...``: load the recipe and run its ``_target_``; bad input is one line."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from distillprune.config import default_output_dir, load_recipe, locate, recipe_listing
from distillprune.errors import UserError
from distillprune.validate import validate


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input)."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(recipe_listing())
        return 0
    try:  # the cheap checks, before the heavy libraries are even imported
        cfg = load_recipe(argv)
        if cfg.output_dir is None:
            cfg.output_dir = default_output_dir(cfg.recipe)
            if from_command_line:  # ranks that a launcher starts later re-run this command: the same folder
                sys.argv.append(f"output_dir={cfg.output_dir}")
        validate(cfg)
    except UserError as err:
        return _fail(err)
    os.environ.pop("DISTILLPRUNE_DEFER_REGISTRATION", None)  # launched ranks and tools register as usual
    import distillprune.prune.modeling  # noqa: F401 - the registration that train.py deferred past validation

    _quiet_libraries()
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        from distillprune.checkpoint import requeue_on_signal_now
        from distillprune.ranks import start

        requeue_on_signal_now()  # under SLURM: the pre-timeout signal is honoured from the first second
        start(cfg)  # several ranks: all of them running, the process group open, before any work
        locate(cfg._target_)(cfg)
        _leave_if_not_rank_zero()
    except (UserError, MisconfigurationException) as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("interrupted; resume with resume=auto and the same output_dir", file=sys.stderr)
        return 130
    return 0


def _leave_if_not_rank_zero() -> None:
    """A rank other than 0 whose work is done exits at once, skipping interpreter teardown: rank 0 writes every
    result, and a C++ thread of the collective libraries left joinable at teardown aborts the process now and
    then ("terminate called without an active exception"), which would stop the other ranks."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _fail(err: Exception) -> int:
    print(f"error: {(str(err).strip().splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
    return 2


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen teacher, by design
