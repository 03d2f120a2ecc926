"""Quantization: round-to-nearest grids (``rtn``), whole models on them saved as compressed-tensors folders that
vLLM serves (``model``), and GGUF files for llama.cpp (``gguf``). Imports torch, transformers and ``errors``."""
