"""The timing method the benchmarks share: interleaved rounds (AB BA AB ...), medians, spreads, and the verdict
that a speed-up smaller than the spread is noise."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import effect, interleaved, machine  # noqa: E402


def test_runs_interleave_and_reverse_every_other_round() -> None:
    order: list[str] = []
    rates = {"dense": iter([10.0, 12.0, 11.0, 30.0]), "pruned": iter([20.0, 22.0, 21.0, 20.0])}

    def run(name: str):
        return lambda: order.append(name) or next(rates[name])

    timed = interleaved({"dense": run("dense"), "pruned": run("pruned")}, rounds=4)
    assert order == ["dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense"]
    assert timed["dense"]["median"] == 11.5 and timed["dense"]["values"] == [10.0, 12.0, 11.0, 30.0]
    assert timed["dense"]["spread"] == (30.0 - 10.0) / 11.5
    assert timed["pruned"]["median"] == 20.5 and timed["pruned"]["min"] == 20.0


def test_an_effect_smaller_than_the_spread_is_flagged() -> None:
    steady = {"median": 10.0, "spread": 0.02}
    assert effect(steady, {"median": 15.0, "spread": 0.03}) == {"ratio": 1.5, "noisy": False}
    assert effect(steady, {"median": 10.5, "spread": 0.2})["noisy"]  # 5% faster, 20% spread: not an effect


def test_every_result_records_the_library_versions() -> None:
    from importlib.metadata import version

    found = machine()  # every benchmark result's "machine"; recipes write the same under metrics.json "versions"
    assert found["transformers"] == version("transformers") and found["lightning"] == version("lightning")
    assert found["torch"] and found["python"] and "trl" in found and "peft" in found
