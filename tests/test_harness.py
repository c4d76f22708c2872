"""`nanokit eval`: lm-evaluation-harness (0.4.13, the real package) over nano-tiny. Scores through the
harness equal the project's own evaluation (`nano.arithmetic.score`) problem by problem, at the same
budgets; loglikelihoods equal a plain forward; a running `nanokit serve` scores the same through
lm-eval's own local-chat-completions, the budget in each request."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install nanokit[eval])")

import nano  # noqa: E402
from harness.model import NanoLM, parse_budget  # noqa: E402
from harness.run import TASKS, Target, evaluate, parse_budgets  # noqa: E402
from nano.arithmetic import EVAL_SEED, sample, score  # noqa: E402
from nano.cli import main  # noqa: E402

LIMIT = 8
BUDGETS = [0, 16, None]


@pytest.fixture(scope="module")
def tiny():
    return nano.load("nano-tiny", device="cpu")


@pytest.fixture(scope="module")
def harness_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    summary = evaluate(Target(model="nano-tiny", device="cpu", batch_size=LIMIT), ["nanokit_arithmetic"], BUDGETS,
                       out, limit=LIMIT)
    return out, summary


def _right(out, budget) -> str:
    name = "none" if budget is None else str(budget)
    rows = [json.loads(line) for line in (out / "lm-eval" / f"samples-budget-{name}.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["doc_id"])
    return "".join("1" if r["exact_match"] else "0" for r in rows)


def test_the_task_file_holds_the_projects_evaluation_problems():
    rng = random.Random(EVAL_SEED)
    lines = (TASKS / "nanokit_arithmetic" / "problems.jsonl").read_text().splitlines()
    assert len(lines) == 1000
    for line in lines:
        p, row = sample(rng), json.loads(line)
        assert (row["question"], row["answer"]) == (p.question, str(p.value))


def test_scores_through_the_harness_equal_the_projects_own_evaluation(tiny, harness_run):
    out, summary = harness_run
    rng = random.Random(EVAL_SEED)
    problems = [sample(rng) for _ in range(LIMIT)]
    scores = {r["budget"]: r["score"] for r in summary["rows"]}
    for budget in BUDGETS:
        own = score(tiny, problems, budget, batch=LIMIT, max_new_tokens=4096, answer_room=None)
        assert _right(out, budget) == own["right"], budget
        assert scores["none" if budget is None else str(budget)] == pytest.approx(own["accuracy"])
        run = summary["runs"]["none" if budget is None else str(budget)]
        assert run["mean_reasoning_tokens"] == pytest.approx(own["mean_reasoning_tokens"], abs=0.01)
    assert scores["none"] > scores["0"]  # the curve has something to show


def test_the_run_folder_holds_lm_evals_results_a_table_and_a_plot(harness_run):
    out, summary = harness_run
    assert {p.name for p in out.iterdir()} >= {"lm-eval", "tasks", "results.json", "results.md", "score_vs_budget.png"}
    theirs = json.loads((out / "lm-eval" / "budget-16.json").read_text())
    assert "exact_match,boxed" in theirs["results"]["nanokit_arithmetic"]
    assert theirs["config"]["limit"] == LIMIT
    assert summary["commit"] and summary["device"] and summary["date"] and summary["budgets"] == ["0", "16", "none"]
    assert "| nanokit_arithmetic | exact_match (boxed) | 16 |" in (out / "results.md").read_text()


def test_chat_messages_from_lm_evals_template_reach_the_model_as_messages(tiny):
    lm = NanoLM(model=tiny, budget=8)
    as_text = lm._prompt("What is 2 + 3?")
    as_messages = lm._prompt(lm.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}]))
    assert as_messages == [{"role": "user", "content": "What is 2 + 3?"}]
    a, b = nano.generate(tiny, [as_text, as_messages], budget=8, max_new_tokens=64)
    assert a == b


def test_loglikelihoods_equal_a_plain_forward_one_request_at_a_time(tiny):
    lm = NanoLM(model=tiny, batch_size=3)
    pairs = [("What is 2 + 3?", " 5"), ("12 * 7 =", " 84 and more"), ("a", "bcdefgh ijk")]
    requests = [type("Request", (), {"args": pair})() for pair in pairs]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx = tiny.tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tiny.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([whole])
        with torch.no_grad():
            scores = F.log_softmax(tiny.model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
        targets = whole[len(ctx):]
        expected = sum(scores[len(ctx) - 1 + i, t].item() for i, t in enumerate(targets))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == all(scores[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(targets))
    text = "def f(x):\n    return x * 2\n"
    rolling = lm.loglikelihood_rolling([type("Request", (), {"args": (text,)})()], disable_tqdm=True)[0]
    ids = [tiny.tokenizer.eos_token_id] + tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        scores = F.log_softmax(tiny.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float(), dim=-1)
    assert rolling == pytest.approx(sum(scores[i, ids[i + 1]].item() for i in range(len(ids) - 1)), abs=1e-3)


def test_a_running_server_scores_the_same_through_local_chat_completions(tiny, harness_run, tmp_path):
    pytest.importorskip("uvicorn")
    from serving import running

    from demos.workstation.server import create_app

    out, _ = harness_run
    app = create_app(tiny, "nano-tiny", max_batch=4, default_max_tokens=4096)
    with running(app) as url:
        remote = evaluate(Target(endpoint=f"{url}/v1", served_name="nano-tiny"), ["nanokit_arithmetic"], [0, 16],
                          tmp_path / "remote", limit=4)
    for budget in (0, 16):
        assert _right(tmp_path / "remote", budget) == _right(out, budget)[:4]
    request = json.loads((tmp_path / "remote" / "lm-eval" / "budget-16.json").read_text())["config"]
    assert request["model"] == "local-chat-completions"
    assert remote["rows"][0]["budget"] == "0"


ONNX_LIMIT = 6


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    assert main(["export", "onnx", "--model", "nano-tiny", "--dtype", "fp32", "--out", str(out)]) == 0
    return out


def _samples(out, budget) -> list[dict]:
    name = "none" if budget is None else str(budget)
    rows = [json.loads(line) for line in (out / "lm-eval" / f"samples-budget-{name}.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def test_an_onnx_bundle_scores_as_the_torch_model_problem_by_problem(fp32_bundle, harness_run, tmp_path):
    """fp32 graphs on onnxruntime, one row at a time, against fp32 torch in batches of 8 (greedy), on
    the first 6 problems at budgets 0, 16 and none: the same answers, word for word, and scores."""
    torch_out, torch_summary = harness_run
    out = tmp_path / "onnx"
    assert main(["eval", "--model", "nano-tiny", "--onnx", str(fp32_bundle), "--device", "cpu", "--tasks",
                 "nanokit_arithmetic", "--budgets", "0,16,none", "--limit", str(ONNX_LIMIT), "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["target"] == f"nano-tiny through ONNX {fp32_bundle}"
    assert summary["runtime"].startswith("ONNX graphs on onnxruntime")
    for budget in BUDGETS:
        mine, theirs = _samples(out, budget), _samples(torch_out, budget)[:ONNX_LIMIT]
        assert [r["doc_id"] for r in mine] == list(range(ONNX_LIMIT))
        assert [r["resps"] for r in mine] == [r["resps"] for r in theirs], budget
        assert [r["exact_match"] for r in mine] == [r["exact_match"] for r in theirs], budget
    assert _right(out, None) != "0" * ONNX_LIMIT  # something right to agree on
    assert summary["runs"]["16"]["budget_hit"] == 1.0 and summary["runs"]["0"]["mean_reasoning_tokens"] == 0
    assert torch_summary["runtime"] and not torch_summary["runtime"].startswith("ONNX")


def test_an_onnx_bundle_scores_loglikelihoods_through_its_prefill_graph(fp32_bundle, tiny):
    from harness.model import use_bundle

    model = nano.load("nano-tiny", device="cpu")
    use_bundle(model, fp32_bundle)
    through_graph, through_torch = NanoLM(model=model, onnx=str(fp32_bundle)), NanoLM(model=tiny, batch_size=3)
    pairs = [("What is 2 + 3?", " 5"), ("12 * 7 =", " 84 and more"), ("a", "bcdefgh ijk")]
    requests = [type("Request", (), {"args": pair})() for pair in pairs]
    got = through_graph.loglikelihood(requests, disable_tqdm=True)
    expected = through_torch.loglikelihood(requests, disable_tqdm=True)
    for (logprob, greedy), (want, want_greedy) in zip(got, expected):
        assert logprob == pytest.approx(want, abs=1e-3) and greedy == want_greedy
    model.model.lm_head.weight.data.zero_()  # the torch weights take no part
    assert through_graph.loglikelihood(requests, disable_tqdm=True) == got


def test_a_bundle_from_another_model_is_refused(fp32_bundle, tmp_path):
    import shutil

    from harness.model import use_bundle

    other = tmp_path / "other"
    shutil.copytree(fp32_bundle, other, ignore=shutil.ignore_patterns("*.data", "*.onnx"))
    (other / "prefill" / "model.onnx").write_bytes(b"")
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] = 224
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="was exported from another model than .*config.json differs in hidden_size"):
        use_bundle(nano.load("nano-tiny", device="cpu"), other)
    with pytest.raises(ValueError, match="not an ONNX bundle"):
        use_bundle(nano.load("nano-tiny", device="cpu"), tmp_path)


def test_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="budget must be a whole number of tokens or 'none', got 'lots'"):
        parse_budgets("0,lots")
    with pytest.raises(ValueError, match="budget must be >= 0, got -3"):
        parse_budget("-3")
    with pytest.raises(ValueError, match="unknown model_args for nanokit: temprature"):
        NanoLM(pretrained="nano-tiny", temprature=0.5)
    assert main(["eval", "--model", "nano-tiny", "--tasks", "arithmatic", "--limit", "1", "--out",
                 str(tmp_path / "x")]) == 2
    assert "unknown tasks: arithmatic; shipped: nanokit_arithmetic" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
