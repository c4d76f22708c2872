"""Score a model with lm-evaluation-harness at several thinking budgets, and write what was found.

For each budget, `lm_eval.simple_evaluate` runs the tasks on the `nanokit` model (`harness.model`),
or on lm-eval's own `local-chat-completions` against a running server (`nanokit serve`,
trtllm-serve with the bundle's hook, any OpenAI-compatible endpoint), the budget in each request as
`chat_template_kwargs.thinking_budget`. The output folder, written at once:

    lm-eval/budget-N.json      lm-eval's own results, as it writes them (samples apart)
    lm-eval/samples-budget-N.jsonl   every scored request: prompt, response, filtered answer, score
    tasks/                     the task files as they ran (data paths resolved)
    results.json               one row per task, metric and budget, with the reasoning spent; per
                               budget the seconds it took (model loading included on the first);
                               the commit, device, runtime (the decoder), command and date (of
                               the start)
    results.md                 the same as a table
    score_vs_budget.png        score against budget, one line per task and metric
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TASKS = Path(__file__).parent / "tasks"


@dataclass
class Target:
    """What is scored: a checkpoint (through `nano`), or an OpenAI-compatible endpoint."""

    model: str | None = None
    endpoint: str | None = None
    served_name: str | None = None  # the endpoint's model name
    device: str | None = None
    dtype: str | None = None
    onnx: str | None = None
    batch_size: int = 16
    grace: int | None = None

    def label(self) -> str:
        if self.endpoint:
            return f"{self.endpoint} ({self.served_name})"
        return str(self.model) + (f" through ONNX {self.onnx}" if self.onnx else "")


def parse_budgets(text: str) -> list[int | None]:
    """"0,128,none" -> [0, 128, None]."""
    from .model import parse_budget

    budgets = [parse_budget(part.strip()) for part in text.split(",") if part.strip()]
    if not budgets:
        raise ValueError(f"no budgets in {text!r}; give e.g. 0,128,512,none")
    return budgets


def _name(budget: int | None) -> str:
    return "none" if budget is None else str(budget)


def materialize_tasks(folder: Path) -> Path:
    """The shipped tasks copied into `folder`, each `data_files` path made absolute."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted(p for p in TASKS.iterdir() if p.is_dir()):
        target = folder / source.name
        shutil.copytree(source, target, dirs_exist_ok=True)
        for config in target.glob("*.yaml"):
            task = yaml.safe_load(config.read_text())
            files = (task.get("dataset_kwargs") or {}).get("data_files")
            if isinstance(files, dict):
                task["dataset_kwargs"]["data_files"] = {k: str((target / v).resolve()) for k, v in files.items()}
                config.write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


def _model_for(target: Target, budget: int | None):
    """The lm-eval model and the per-request generation settings for one budget."""
    if target.endpoint:
        url = target.endpoint.rstrip("/")
        if not url.endswith("/chat/completions"):
            url += "/chat/completions"
        kwargs = {"thinking_budget": budget} if budget is not None else {}
        if target.grace is not None:
            kwargs["thinking_grace"] = target.grace
        gen = {"chat_template_kwargs": kwargs} if kwargs else {}
        import lm_eval.models  # noqa: F401  (registers lm-eval's own models, local-chat-completions among them)

        args = dict(model=target.served_name or "model", base_url=url, tokenizer_backend=None, tokenized_requests=False,
                    max_retries=1, num_concurrent=1)
        return "local-chat-completions", args, gen
    from .model import NanoLM

    model = NanoLM(pretrained=target.model, budget=budget, grace=target.grace, batch_size=target.batch_size,
                   device=target.device, dtype=target.dtype, onnx=target.onnx)
    return model, None, None


def evaluate(target: Target, tasks: list[str], budgets: list[int | None], out: str | os.PathLike,
             limit: int | None = None, include_paths: list[str] = (), overwrite: bool = False) -> dict:
    """Run every task at every budget; returns the summary written to out/results.json."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from nano.atomic import atomic_dir

    from . import model as _registers_nanokit  # noqa: F401

    if not tasks:
        raise ValueError("no tasks given; for example --tasks nanokit_arithmetic")
    if bool(target.model) == bool(target.endpoint):
        raise ValueError("give either a model folder or an endpoint, not both")
    rows, runs, runtime = [], {}, None
    began = provenance(target.device)  # the code as it was loaded: read before the run, not after
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        manager = TaskManager(include_path=[str(materialize_tasks(tmp / "tasks")), *map(str, include_paths)])
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown tasks: {', '.join(unknown)}; shipped: "
                             f"{', '.join(p.name for p in TASKS.iterdir() if p.is_dir())} (or give --include-path)")
        (tmp / "lm-eval").mkdir()
        for budget in budgets:
            start = time.perf_counter()
            model, model_args, gen_kwargs = _model_for(target, budget)
            result = lm_eval.simple_evaluate(
                model=model, model_args=model_args, tasks=tasks, limit=limit, task_manager=manager,
                log_samples=True, gen_kwargs=gen_kwargs, apply_chat_template=bool(target.endpoint),
                batch_size=1 if target.endpoint else None, bootstrap_iters=0 if limit and limit < 10 else 1000,
            )
            samples = result.pop("samples", {})
            name = _name(budget)
            (tmp / "lm-eval" / f"budget-{name}.json").write_text(
                json.dumps(result, indent=2, default=handle_non_serializable) + "\n")
            with open(tmp / "lm-eval" / f"samples-budget-{name}.jsonl", "w") as f:
                for task, entries in samples.items():
                    for entry in entries:
                        f.write(json.dumps({"task": task, **entry}, default=handle_non_serializable) + "\n")
            spent = model.stats.summary() if hasattr(model, "stats") else {}
            runtime = model.model.runtime_name() if hasattr(model, "stats") else None
            runs[name] = dict(samples={t: len(e) for t, e in samples.items()}, **spent,
                              seconds=round(time.perf_counter() - start, 1))
            rows.extend(_rows(result, budget, spent))
        summary = dict(target=target.label(), tasks=tasks, budgets=[_name(b) for b in budgets], limit=limit,
                       **began, runtime=runtime, runs=runs, rows=rows)
        summary["plot"] = "score_vs_budget.png" if plot(rows, tmp / "score_vs_budget.png", target.label()) else None
        (tmp / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "results.md").write_text(table(rows) + "\n")
    return summary


def _rows(result: dict, budget: int | None, spent: dict) -> list[dict]:
    rows = []
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(dict(task=task, metric=metric, filter=filter_name, budget=_name(budget), score=value,
                             stderr=stderr if isinstance(stderr, (int, float)) else None,
                             mean_reasoning_tokens=spent.get("mean_reasoning_tokens"),
                             budget_hit=spent.get("budget_hit")))
    return rows


def table(rows: list[dict]) -> str:
    head = "| task | metric | budget | score | stderr | mean reasoning tokens | budget hit |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        hit = "" if r["budget_hit"] is None else f"{r['budget_hit']:.1%}"
        tokens = "" if r["mean_reasoning_tokens"] is None else f"{r['mean_reasoning_tokens']:.1f}"
        lines.append(f"| {r['task']} | {r['metric']} ({r['filter']}) | {r['budget']} | {r['score']:.4f} | {stderr} "
                     f"| {tokens} | {hit} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Score against budget ("none" at the right); False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in dict.fromkeys((r["task"], r["metric"], r["filter"]) for r in rows):
        mine = {r["budget"]: r for r in rows if (r["task"], r["metric"], r["filter"]) == key}
        xs = [i for i, b in enumerate(budgets) if b in mine]
        ys = [mine[budgets[i]]["score"] for i in xs]
        errors = [mine[budgets[i]]["stderr"] or 0 for i in xs]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{key[0]}: {key[1]}")
    ax.set_xticks(range(len(budgets)), ["∞" if b == "none" else b for b in budgets])
    ax.set_xlabel("thinking budget (tokens; ∞: no limit)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def provenance(device: str | None) -> dict:
    """The commit, device, command and date of a run, read as it starts (a tree edited while a long
    run goes on would mark it +uncommitted though the code it loaded was the commit's)."""
    import torch

    from nano.provenance import commit, device_name

    where = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(commit=commit(), device=device_name(where), command=" ".join(shlex.quote(a) for a in ["nanokit", *sys.argv[1:]]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
