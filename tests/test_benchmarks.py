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


def test_the_readme_summary_is_rewritten_from_the_results(tmp_path) -> None:
    import json

    from collect import BEGIN, END, HEADLINES, ORDER, write_readme_summary

    records = {p.stem: json.loads(p.read_text()) for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{BEGIN}\nstale line\n{END}\n\nafter\n")
    write_readme_summary(records, readme)
    text = readme.read_text()
    lines = text.split(BEGIN)[1].split(END)[0].strip().splitlines()
    assert "stale line" not in text and text.startswith("intro") and text.endswith("after\n")
    assert [line.split("`")[1] for line in lines] == [n for n in ORDER if n in HEADLINES and n in records]
    assert all(records[line.split("`")[1]]["date"][:10] in line for line in lines)
    write_readme_summary(records, readme)
    assert readme.read_text() == text  # rewriting changes nothing
    # the README itself holds the summary of the results it ships with
    shipped = (ROOT / "README.md").read_text().split(BEGIN)[1].split(END)[0].strip().splitlines()
    assert shipped == lines
    no_20 = {"rows": [{"ratio": 0.1, "speed": {}}, {"ratio": 0.5, "speed": {}}]}  # prune_speed.py --ratios 0.1,0.5
    assert HEADLINES["prune_speed"](no_20) == "no 20% row (ratios 0.1, 0.5)"
