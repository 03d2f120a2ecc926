"""The names that named settings may take, in one light module (no torch), so that a run's first stage
(``validate``) checks them in a fraction of a second. A library module that implements a setting takes its names
from here, or (``prune/``, which imports nothing of the package but ``errors``) holds its own copy;
``tests/test_validate.py`` checks that the two agree."""

from __future__ import annotations

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload", "fsdp")  # fmt: skip  # or a DeepSpeed .json
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSS_IMPLS = ("auto", "dense", "chunked", "fused_linear")
STUDENT_INIT = ("pretrained", "layer_drop", "config")
IMPORTANCE = ("random", "l1", "l2", "taylor", "taylor_vector", "taylor2", "activation")
AGGREGATIONS = ("sum", "mean", "max", "prod")
GQA_MODES = ("kv_groups", "q_per_group")
ALLOCATIONS = ("uniform", "sensitivity")  # prune.allocation.METHODS
DEPTH_IMPORTANCE = ("cosine", "ppl")
PRUNE_PARTS = ("heads", "channels")
PRUNABLE = ("gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3")  # prune.groups.FAMILIES, sorted
SEQ_STAGES = ("generate", "train", "evaluate")
LOGIT_STAGES = ("teacher_logits", "train")  # logit_distill: the offline teacher store, then training from it
SERVER_APIS = ("prompt_logprobs", "llama_cpp_python")  # a served teacher's request shape (distillprune.served)
ZERO_SHOT_TASKS = ("shakespeare_cloze", "kjv_cloze", "shakespeare_or_bible")
ICL_TASKS = ("capitalise", "verse_book", "last_word", "shakespeare_or_bible")  # incontext.PACKAGED
WANDB_MODES = ("auto", "online", "offline", "disabled")
