"""Tests of the paper's protocols: hub tasks, the paper preset, RewardBench scoring.

Offline and fast: small fixture files in each hub schema (tests/fixtures/hub/) go through the
same converters a download feeds (only the download is replaced), and the end-to-end runs
use the tiny random model of conftest.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bon_sr.bench import data, hub, paper, rewardbench
from bon_sr.bench.paper_figures import PAPER_PRESET, figures_for
from bon_sr.bench.tasks import BUILTIN_TASKS, load_task
from bon_sr.errors import ConfigError, InputError, MissingExtraError

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
SOURCE = f"fixtures:{FIXTURES}"
ROOT = Path(__file__).parent.parent



def fixture_rows(name):
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


# -- hub tasks --------------------------------------------------------------------------------

def test_every_builtin_task_has_one_hub_spec():
    assert set(BUILTIN_TASKS) <= set(hub.HUB_SPECS)
    assert set(PAPER_PRESET["tasks"]) <= set(BUILTIN_TASKS)
    assert hub.HUB_SPECS["gpqa-diamond"].gated and hub.HUB_SPECS["gpqa-diamond"].configs == ("gpqa_diamond",)
    assert len(hub.HUB_SPECS["mmlu-redux"].configs) == 57 == len(set(hub.MMLU_SUBJECTS))
    assert hub.HUB_SPECS["rewardbench"].split == "filtered"
    # No revision could be checked offline: none may claim to be verified while it says "main".
    assert all(s.verified or s.revision == "main" for s in hub.HUB_SPECS.values())


def test_fixture_tasks_in_hub_schema():
    math500 = load_task("math500", source=SOURCE)
    assert [p.answer for p in math500.problems] == ["2", "\\frac{3}{4}"]   # last \boxed{} of the solution
    gpqa = load_task("gpqa-diamond", source=SOURCE)
    first = gpqa.problems[0]
    assert first.id == "recA1b2C3d4E5f6G7h" and first.checker == "choice"
    # the gold letter points at the correct answer wherever the shuffle put it
    assert f"{first.answer}. Nitrogen" in first.prompt
    redux = load_task("mmlu-redux", source=SOURCE)
    # the wrong_groundtruth row is dropped; the id still counts it (abstract_algebra/1 is gone)
    assert [(p.id, p.answer) for p in redux.problems] == [("abstract_algebra/0", "C"), ("virology/0", "B")]
    oly = load_task("olympiadbench", source=SOURCE)
    assert [(p.id, p.answer, p.checker) for p in oly.problems] == [("1606", "3", "math"), ("1607", "-2, 2", "math")]
    amc = load_task("amc23", source=SOURCE)
    assert [p.answer for p in amc.problems] == ["27", "6"]                 # floats 27.0, 6.0 in the hub schema
    assert "\\boxed{}" in amc.problems[0].prompt and "reason step by step" in amc.problems[0].prompt
    assert len(load_task("amc23", source=SOURCE, limit=1).problems) == 1


def test_hub_route_runs_the_same_converters(monkeypatch):
    calls = []

    def fake_download(spec, config):
        calls.append((spec.repo, config, spec.split, spec.revision))
        # the hub serves one config at a time and knows nothing of "_config"
        return [{k: v for k, v in r.items() if k != "_config"}
                for r in fixture_rows(name_of[spec.repo]) if r.get("_config", config) == config]

    name_of = {hub.HUB_SPECS[n].repo: n for n in ("gpqa-diamond", "mmlu-redux", "olympiadbench", "amc23")}
    monkeypatch.setattr(hub, "download_rows", fake_download)
    monkeypatch.setattr(hub, "resolved_revision", lambda spec: None)
    for name in name_of.values():
        assert data.load_dataset_items(name, source="hub") == data.load_dataset_items(name, source=SOURCE), name
    assert ("Idavidrein/gpqa", "gpqa_diamond", "train", "main") in calls
    assert sum(1 for c in calls if c[0] == "edinburgh-dawg/mmlu-redux-2.0") == 57


def test_hub_only_tasks_refuse_the_package_source():
    with pytest.raises(ConfigError, match="'gpqa-diamond' is not in the offline data package; use --data-source hub"):
        data.load_dataset_items("gpqa-diamond")
    with pytest.raises(ConfigError, match="Unknown data source 'web'"):
        data.load_dataset_items("amc23", source="web")
    with pytest.raises(ConfigError, match="is not a directory"):
        data.load_dataset_items("amc23", source="fixtures:/nonexistent/dir")


def test_gated_dataset_says_how_to_get_access(monkeypatch):
    def refuse(spec, config):
        raise RuntimeError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. You must be authenticated.")

    monkeypatch.setattr(hub, "download_rows", refuse)
    with pytest.raises(InputError) as err:
        data.load_dataset_items("gpqa-diamond", source="hub")
    msg = str(err.value)
    for part in ("https://huggingface.co/datasets/Idavidrein/gpqa", "accept its terms", "huggingface-cli login",
                 "HF_TOKEN"):
        assert part in msg


def test_missing_datasets_names_an_extra_that_lists_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)     # makes `import datasets` fail
    with pytest.raises(MissingExtraError) as err:
        data.load_dataset_items("amc23", source="hub")
    assert "pip install 'bon-sr[bench]'" in str(err.value)
    # the installed distribution's metadata (pyproject's extras; tomllib is Python 3.11+ only)
    from importlib.metadata import requires

    extra = f'extra == "{err.value.extra}"'
    assert any(req.startswith("datasets") and extra in req for req in requires("bon-sr") or ())


def test_gpqa_option_order_is_seeded_by_the_record_id():
    order = data.gpqa_order("recA1b2C3d4E5f6G7h")
    assert sorted(order) == [0, 1, 2, 3] and order == data.gpqa_order("recA1b2C3d4E5f6G7h")
    # over many questions the correct answer (index 0) lands in every position
    positions = {data.gpqa_order(f"rec{i}").index(0) for i in range(40)}
    assert positions == {0, 1, 2, 3}


# -- RewardBench scoring -------------------------------------------------------------------------

def test_rewardbench_constants_match_the_official_counts():
    # 3,522 weighted pairs: math-prm's 447 pairs count 984 = 6 x 164 (the six code subsets)
    assert rewardbench.EXAMPLE_COUNTS["math-prm"] == sum(rewardbench.EXAMPLE_COUNTS[f"hep-{x}"]
                                                         for x in ("cpp", "go", "java", "js", "python", "rust"))
    assert rewardbench.FILTERED_PAIRS == 2985
    mapped = [s for subsets in rewardbench.SUBSET_MAPPING.values() for s in subsets]
    assert sorted(mapped) == sorted(rewardbench.EXAMPLE_COUNTS)


def test_rewardbench_weighting_by_hand():
    subsets = ["alpacaeval-easy", "alpacaeval-easy", "mt-bench-easy", "mt-bench-easy", "mt-bench-hard",
               "llmbar-natural", "xstest-should-refuse", "xstest-should-respond", "xstest-should-respond",
               "math-prm", "math-prm", "hep-python"]
    wins = [1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1]
    r = rewardbench.score(wins, subsets)
    # per subset: alpacaeval-easy 1, mt-bench-easy 1/2, mt-bench-hard 0, llmbar-natural 1,
    # xstest-should-refuse 1, xstest-should-respond 0, math-prm 1/2, hep-python 1
    assert r["subsets"]["mt-bench-easy"] == 0.5 and r["subsets"]["math-prm"] == 0.5
    # Chat      = (100 * 1 + 28 * 0.5) / (100 + 28)   = 114 / 128   = 0.890625
    # Chat Hard = (37 * 0 + 100 * 1) / (37 + 100)     = 100 / 137
    # Safety    = (154 * 1 + 250 * 0) / (154 + 250)   = 154 / 404
    # Reasoning = (984 * 0.5 + 164 * 1) / (984 + 164) = 656 / 1148 = 4 / 7
    #   (unweighted it would be (0.5 + 1) / 2 = 0.75: math-prm's weight of 984 matters)
    expected = {"Chat": 114 / 128, "Chat Hard": 100 / 137, "Safety": 154 / 404, "Reasoning": 4 / 7}
    assert r["sections"] == pytest.approx(expected)
    assert r["overall"] == pytest.approx(sum(expected.values()) / 4)
    assert r["accuracy"] == pytest.approx(7 / 12)       # 7 of the 12 pairs won
    # a section with no subset present is left out, and then there is no overall
    partial = rewardbench.score([1, 0], ["alpacaeval-easy", "math-prm"])
    assert set(partial["sections"]) == {"Chat", "Reasoning"} and partial["overall"] is None


def test_rewardbench_ties_and_missing_scores_lose():
    assert rewardbench.strict_win(2.0, 1.0) == 1.0
    assert rewardbench.strict_win(1.0, 1.0) == 0.0
    assert rewardbench.strict_win(float("nan"), 1.0) == 0.0 and rewardbench.strict_win(None, 1.0) == 0.0
    assert rewardbench.is_rewardbench(["math-prm", "hep-go"]) and not rewardbench.is_rewardbench(["math", "hep-go"])


def test_rewardbench_schema_file_loads_as_pairs():
    pairs = data.load_pairs(FIXTURES / "rewardbench.jsonl")
    assert pairs[0] == {"id": "30", "prompt": "Question 0?", "chosen": "Paris is the capital of France.",
                        "rejected": "Berlin.", "category": "alpacaeval-easy"}
    hub_pairs = data.load_rewardbench_hub(SOURCE)
    assert [p["category"] for p in hub_pairs] == [p["category"] for p in pairs]


# -- the paper preset's summary --------------------------------------------------------------------

def _fake_summary(task, acc):
    """A run_bench-shaped summary; acc: selector -> {n: accuracy}."""
    results = {n: {sel: {"accuracy": a[n]} for sel, a in acc.items()} for n in next(iter(acc.values()))}
    return {"task": task, "problems": 10, "n_samples": 16, "selectors": list(acc), "results": results,
            "config": {"max_new_tokens": 4096}}


def test_paper_summary_by_hand():
    summaries = {
        "math500": _fake_summary("math500", {"greedy": {"1": 0.80, "16": 0.80}, "sr-response": {"1": 0.7, "16": 0.90}}),
        "olympiadbench": _fake_summary("olympiadbench", {"greedy": {"1": 0.40, "16": 0.40},
                                                         "sr-response": {"1": 0.3, "16": 0.50}}),
    }
    s = paper.paper_summary(summaries, model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", settings={})
    assert s["n"] == [1, 16] and s["selectors"] == ["greedy", "sr-response"]
    # mean over tasks: greedy (0.8 + 0.4) / 2 = 0.6; sr@16 (0.9 + 0.5) / 2 = 0.7
    assert s["mean"]["sr-response"]["16"] == pytest.approx(0.7)
    g = s["gains_at_n_max"]["sr-response"]
    assert g["mean_points"] == pytest.approx(10.0)                          # 70% - 60%
    assert g["relative_pct_of_mean"] == pytest.approx(100 * 0.1 / 0.6)      # 16.67 %
    # per task: 10 / 80 = 12.5 %, 10 / 40 = 25 %; their mean 18.75 %
    assert g["mean_of_relative_pct"] == pytest.approx(18.75)
    rows = {r["what"].split(" (")[0]: r for r in s["paper"]["rows"]}
    assert s["paper"]["model"] == "deepseek-ai/deepseek-r1-distill-qwen-1.5b"
    # the paper: MATH500 82.8 -> 86.8 = +4.0 points, 100 * 4.0 / 82.8 = +4.83 %
    assert rows["math500: gain, points"]["paper"] == pytest.approx(4.0)
    assert rows["math500: gain, relative %"]["paper"] == pytest.approx(100 * 4.0 / 82.8)
    assert rows["math500: gain, points"]["ours"] == pytest.approx(10.0)
    assert rows["olympiadbench: greedy accuracy %"] == {"what": "olympiadbench: greedy accuracy %", "unit": "%",
                                                        "paper": 43.6, "ours": pytest.approx(40.0)}
    assert rows["stable rank vs greedy, mean over tasks, relative %"]["paper"] == 10.2


def test_paper_figures_match_the_paper_models_only():
    assert figures_for("Qwen/Qwen2.5-1.5B-Instruct")[0] == "qwen/qwen2.5-1.5b-instruct"
    assert figures_for("/models/qwen2.5-1.5b-instruct/")[0] == "qwen/qwen2.5-1.5b-instruct"
    assert figures_for("qwen2.5-coder-1.5b-instruct") is None
    assert figures_for("Qwen/Qwen3-8B")[1]["rewardbench"]["sr"] == 84.04
    assert figures_for("Qwen/Qwen2.5-1.5B-Instruct")[1]["rewardbench"]["sr"] == 75.95
    s = paper.paper_summary({"amc23": _fake_summary("amc23", {"greedy": {"16": 0.5}, "sr-response": {"16": 0.5}})},
                            model="smollm2-135m-instruct", settings={})
    assert s["paper"]["model"] is None and s["paper"]["rows"] == []


# -- end to end on the fixtures with the tiny model -----------------------------------------------

def test_bench_preset_paper_end_to_end(tmp_path, tiny_model_dir, one_thread):
    from click.testing import CliRunner

    from bon_sr.bench.cli import bench

    args = ["--preset", "paper", "--model", tiny_model_dir, "--backend", "hf", "--data-source", SOURCE,
            "--max-new-tokens", "4",
            "--dtype", "float32", "--bootstrap", "100", "--subsets", "4", "-o", str(tmp_path)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "paper.json").read_text())
    assert list(summary["tasks"]) == list(PAPER_PRESET["tasks"])
    assert summary["n"] == [1, 4, 8, 16]
    assert summary["settings"]["temperature"] == 0.7 and summary["settings"]["top_p"] == 0.9
    assert summary["settings"]["overridden"] == ["data_source", "max_new_tokens"]
    for task, t in summary["tasks"].items():
        assert t["n_samples"] == 16 and t["max_new_tokens"] == 4, task
        assert (tmp_path / f"{task}.md").is_file()
    for sel, by_n in summary["mean"].items():
        for n, value in by_n.items():
            assert value == pytest.approx(sum(t["accuracy"][sel][n] for t in summary["tasks"].values()) / 5)
    assert summary["data"]["gpqa-diamond"]["repo"] == "Idavidrein/gpqa"
    md = (tmp_path / "paper.md").read_text()
    assert "relative %" in md and "points" in md and "**mean**" in md
    assert "The paper reports no Best-of-N figures for" in md          # a random tiny model is not in the paper
    assert "Paper protocol, mean over 5 tasks at n=16" in result.output
    # a second run resumes from the cache: nothing is generated again
    again = CliRunner().invoke(bench, args)
    assert again.exit_code == 0 and again.output.count("(0 generated now)") == 5, again.output


def test_rank_eval_rewardbench_file_offline(tmp_path, tiny_model_dir, one_thread):
    from click.testing import CliRunner

    from bon_sr.bench.cli import rank_eval

    out = tmp_path / "rb"
    result = CliRunner().invoke(rank_eval, ["--rewardbench", "--pairs", str(FIXTURES / "rewardbench.jsonl"),
                                            "--model", tiny_model_dir, "--dtype", "float32", "--bootstrap", "100",
                                            "-o", str(out)])
    assert result.exit_code == 0, result.output
    s = json.loads((out / "rewardbench.json").read_text())
    assert s["pairs"] == 8 and not s["complete"]
    sr = s["results"]["sr-response"]
    assert set(sr["sections"]) == set(rewardbench.SECTIONS)
    assert sr["overall"] == pytest.approx(sum(sr["sections"].values()) / 4)
    # recomputed by hand from the score cache: strict wins per subset, then the weights
    cached = [json.loads(line) for line in (out / "cache" / "rank_eval.jsonl").read_text().splitlines()]
    wins = {r["category"]: float(r["chosen"]["sr_response"] > r["rejected"]["sr_response"]) for r in cached}
    assert sr["subsets"] == wins
    reasoning = (984 * wins["math-prm"] + 164 * wins["hep-python"]) / (984 + 164)
    assert sr["sections"]["Reasoning"] == pytest.approx(reasoning)
    assert "RewardBench" in result.output and "overall" in result.output
    assert "| Chat | Chat Hard | Safety | Reasoning | overall |" in (out / "rewardbench.md").read_text()
    # a pairs file of RewardBench subsets is scored the RewardBench way without the flag too
    (out / "rewardbench.json").unlink()
    again = CliRunner().invoke(rank_eval, ["--pairs", str(FIXTURES / "rewardbench.jsonl"), "--model", tiny_model_dir,
                                           "--dtype", "float32", "--bootstrap", "100", "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "rewardbench.json").read_text())["results"] == s["results"]


def test_cli_preset_and_source_errors(tmp_path):
    from click.testing import CliRunner

    from bon_sr.bench.cli import bench

    result = CliRunner().invoke(bench, ["-o", str(tmp_path)])
    assert result.exit_code != 0 and "--preset paper" in result.output
    result = CliRunner().invoke(bench, ["--task", "amc23", "--data-source", "web", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "Unknown data source 'web'" in result.output
    result = CliRunner().invoke(bench, ["--task", "amc23", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "not in the offline data package" in result.output

