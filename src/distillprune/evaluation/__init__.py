"""Evaluation: ``metrics`` (perplexity, counts, agreement scores), ``speed`` (generation speed and memory),
``zeroshot`` (lm-eval on the packaged tasks), ``suite`` (models side by side) and ``report`` (report.md, plots)."""
