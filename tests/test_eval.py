"""`kvpolicy eval`: tasks, scoring, the runner's resumability, and the report's provenance.

The smoke run uses the real embedded model on a few short samples (about a minute)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import POLICIES
from kvpolicy import load_policy
from kvpolicy.eval import tasks as T
from kvpolicy.eval.ablation import matched_ablation
from kvpolicy.eval.report import relative_interval, render_report, summarize
from kvpolicy.eval.lines import load_lines
from kvpolicy.eval.prompts import EvalPolicy, baseline_policy
from kvpolicy.eval.runner import EvalConfig, run
from kvpolicy.engines.hf import load_model
from kvpolicy.models import resolve_model


@pytest.fixture(scope="module")
def smol():
    return load_model()


def test_token_f1_and_scores():
    assert T.token_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert T.token_f1("in Paris, France", "Paris") == pytest.approx(0.5)  # P 1/3, R 1
    assert T.token_f1("", "Paris") == 0.0
    sample = T.Sample("niah_multivalue", 0, "", "", ("111", "222", "333", "444"), 10)
    assert T.score(sample, "111 and 333") == 0.5
    single = T.Sample("niah_single", 0, "", "", ("1234567",), 10)
    assert T.score(single, "it is 1234567.") == 1.0 and T.score(single, "123456") == 0.0


@pytest.mark.parametrize("task", T.TASKS)
def test_samples_are_deterministic_and_about_the_asked_length(smol, task):
    _, tokenizer = smol
    first = T.make_samples(task, tokenizer, 600, 2, seed=1)
    assert first == T.make_samples(task, tokenizer, 600, 2, seed=1)
    assert first != T.make_samples(task, tokenizer, 600, 2, seed=2)
    for sample in first:
        length = len(tokenizer(sample.context)["input_ids"])
        assert 300 <= length <= 660, (task, length)
        if task.startswith("niah") or task == "vt":
            assert all(answer in sample.context for answer in sample.answers)


def _lines(policy, scores, ratio=4.0):
    """Scored lines: scores[task] = per-sample scores."""
    return [{"policy": policy, "task": task, "sample": i, "context": 100, "score": score,
             "measured_bytes": int(1000 / ratio) + i, "planned_bytes": int(1000 / ratio) + i,
             "baseline_bytes": 1000, "prompt_tokens": 100, "prefill_s": 0.0, "compress_s": 0.0}
            for task, values in scores.items() for i, score in enumerate(values)]


def test_the_interval_against_the_baseline_is_paired_and_can_exclude_the_baseline():
    base = _lines("baseline", {"niah_single": [1, 1, 0, 1, 0, 1, 1, 0], "squad": [0.5] * 8}, 1)
    same = _lines("same", {"niah_single": [1, 1, 0, 1, 0, 1, 1, 0], "squad": [0.5] * 8})
    assert relative_interval(same, base) == [1.0, 1.0]  # paired: no spread for equal scores
    lost = _lines("lost", {"niah_single": [0] * 8, "squad": [0.5] * 8})
    low, high = relative_interval(lost, base)
    assert high < 1 and low > 0  # loses every needle, keeps squad: strictly between
    assert relative_interval(lost, base) == [low, high]  # seeded
    one = _lines("one", {"niah_single": [1], "squad": [0.5]})
    assert relative_interval(one, base) is None  # one prompt per task: no interval
    rows = {row["policy"]: row for row in summarize(base + lost)["rows"]}
    assert rows["lost"]["of_baseline"] == pytest.approx(0.25 / 0.5625)
    assert rows["lost"]["of_baseline_interval"] == [low, high]
    assert rows["lost"]["lowest_ratio"] == 1000 / (250 + 7)  # the prompt that compressed least


def test_ablation_policies_are_matched_in_ratio():
    rows = matched_ablation(resolve_model("smollm2-135m"), 4096)
    assert [name for name, _, _ in rows] == ["quant_only_matched", "evict_only_matched",
                                             "hybrid_matched"]
    target = rows[0][2]
    assert all(abs(ratio / target - 1) < 0.02 for _, _, ratio in rows)


def test_smoke_run_resumes_and_reports_numbers_from_the_json(smol, tmp_path):
    model, tokenizer = smol
    kivi = load_policy(POLICIES / "kivi.kvp")
    config = EvalConfig(policies=[baseline_policy(), EvalPolicy("kivi", kivi, "kivi.kvp")],
                        tasks=["niah_single", "ppl"], contexts=[700], samples=2, seed=0,
                        out=tmp_path / "run")
    run(config, model, tokenizer, progress=False)
    lines_path = config.out / "samples.jsonl"
    lines = load_lines(lines_path)
    assert len(lines) == 2 * 2 * 2 and all("error" not in line for line in lines)

    # interrupt: keep three lines and half of a fourth, rerun, nothing done is redone
    kept = lines_path.read_text().splitlines()[:3]
    lines_path.write_text("\n".join(kept) + "\n" + kept[0][:40])
    (config.out / "results.json").unlink()
    run(config, model, tokenizer, progress=False)
    resumed = load_lines(lines_path)
    assert len(resumed) == 8 and resumed[:3] == lines[:3]

    results = json.loads((config.out / "results.json").read_text())
    report = (config.out / "report.md").read_text()
    assert report == render_report(results)
    assert (config.out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["policy"]: row for row in results["summary"]["rows"]}
    table_row = next(line for line in report.splitlines() if line.startswith("| kivi | "))
    shown_ratio = float(re.search(r"\| kivi \| ([0-9.]+)x", table_row).group(1))
    assert shown_ratio == round(rows["kivi"]["compression_ratio"], 2)
    assert all(line["measured_bytes"] == line["planned_bytes"] for line in resumed)
    # the baseline is far above chance (a random 7-digit guess), and its perplexity sane
    assert rows["baseline"]["tasks"]["niah_single"] >= 0.5
    assert 1 < rows["baseline"]["perplexity"] < 100
    assert "CPU" in report and "question-agnostic" in report


def test_the_paged_engine_runs_prompts_in_one_step_and_names_itself(smol, tmp_path):
    """--engine paged: each prompt in one step through the compressed store; bytes measured
    from the cache equal the page plan's; the report and results.json name the engine."""
    model, tokenizer = smol
    kivi = load_policy(POLICIES / "kivi.kvp")
    config = EvalConfig(policies=[baseline_policy(), EvalPolicy("kivi", kivi, "kivi.kvp")],
                        tasks=["niah_single"], contexts=[700], samples=2, out=tmp_path / "paged",
                        engine="paged", block_size=32, question_aware=True)
    out = run(config, model, tokenizer, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["engine"] == "paged" and results["config"]["block_size"] == 32
    assert "kvpolicy.engines.hf.paged" in results["hardware"]["engine"]
    lines = [line for line in results["results"] if line["policy"] == "kivi"]
    assert len(lines) == 2 and all(line["measured_bytes"] == line["planned_bytes"] for line in lines)
    assert all(line["measured_bytes"] < line["baseline_bytes"] * 2 for line in lines)
    assert "Engine **paged** (blocks of 32 tokens" in (out / "report.md").read_text()
    # resumable: a rerun measures only what is missing (a line of other settings does not count)
    path = out / "samples.jsonl"
    kept = [json.loads(t) for t in path.read_text().splitlines()]
    assert {(line["engine"], line["block_size"], line["seed"]) for line in kept} == {("paged", 32, 0)}
    stale = dict(kept[-1], block_size=64, output="stale")
    path.write_text("".join(json.dumps(line) + "\n" for line in kept[:-1] + [stale]) + '{"cut')
    run(config, model, tokenizer, progress=False)
    again = [json.loads(t) for t in path.read_text().splitlines()]
    assert again[:-1] == kept[:-1] and again[-1]["output"] != "stale"
    assert again[-1] == dict(kept[-1], prefill_s=again[-1]["prefill_s"])  # remeasured, same run


def test_the_served_engines_refuse_what_they_cannot_score(tmp_path):
    from conftest import run_cli
    done = run_cli("eval", "--engine", "paged", "--tasks", "ppl", str(POLICIES / "kivi.kvp"),
                   "--out", str(tmp_path / "x"))
    assert done.returncode == 1 and "generation tasks only, not ppl" in done.stderr
    done = run_cli("eval", "--engine", "paged", "--block-size", "48",
                   str(POLICIES / "kivi.kvp"), "--out", str(tmp_path / "y"))
    assert done.returncode == 1 and "not a multiple of the format's 32-token unit" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_reconstruct_policy_runs_its_passes_and_reports_their_cost(smol, tmp_path):
    model, tokenizer = smol
    policy = load_policy(POLICIES / "kivi.kvp")
    from dataclasses import replace
    from kvpolicy.lang.ir import Score
    ranked = replace(policy, name="recon", retain=0.5,
                     score=Score(method="reconstruct", pool="none", pool_kernel=1, gqa="max",
                                 chunk=256))
    config = EvalConfig(policies=[baseline_policy(), EvalPolicy("recon", ranked, "recon.kvp")],
                        tasks=["niah_single"], contexts=[700], samples=1, seed=0,
                        out=tmp_path / "run")
    run(config, model, tokenizer, progress=False)
    lines = {line["policy"]: line for line in load_lines(config.out / "samples.jsonl")}
    recon, baseline = lines["recon"], lines["baseline"]
    assert "error" not in recon and recon["measured_bytes"] == recon["planned_bytes"]
    assert recon["reconstruct_s"] > 0 and "reconstruct_s" not in baseline
    assert recon["ttft_s"] == pytest.approx(recon["prefill_s"] + recon["compress_s"]
                                            + recon["query_s"] + recon["reconstruct_s"])
    report = (config.out / "report.md").read_text()
    assert "**recon**: vLLM and the paged store cannot run it: score reconstruct" in report
