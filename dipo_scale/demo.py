"""`dipo-scale demo`: the whole chain on a tiny model, end to end, with the real engines.

    corpus ─▶ tokenizer ─▶ target + retrain models ─▶ prepare ─▶ unlearn (DiPO, NPO, GA;
    same step budget; Ray Train + DeepSpeed ZeRO-3) ─▶ evaluate all five ─▶ report.md,
    metrics.json, forget_vs_retain.png

With `--data DIR` the same chain runs on the user's own MUSE-layout directory.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dipo_scale.config import load_unlearn_config
from dipo_scale.files import atomic_write_json, atomic_write_text
from dipo_scale.models import TinyModelSettings

METHODS = ("dipo", "npo", "ga")
DEFAULT_NUM_DOCS = 20

# The unlearning settings the demo uses for every method (overridable with --set).
DEMO_UNLEARN = {
    "train": {"num_workers": 2, "steps": 30, "global_batch_size": 8, "micro_batch_size": 4,
              "lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0},
    "loss": {"retain": "gd", "gamma": 1.0, "lambda": 1.0},
    "dipo": {"alpha": 5.0, "beta": 0.1, "select": "topk", "k": 1},
    "npo": {"beta": 0.1},
    "eval": {"verbmem_max_new_tokens": 64, "knowmem_max_new_tokens": 32, "batch_size": 32},
}
MODEL_SETTINGS = TinyModelSettings()


def _fraction_targets(metrics: dict) -> list[str]:
    """The expectations of the spine issue, checked against the measured numbers."""
    t, d = metrics["target"], metrics["dipo"]
    checks = [
        ("verbmem_f ≤ ½ target", d["verbmem_f"] <= 0.5 * t["verbmem_f"]),
        ("knowmem_f ≤ ½ target", d["knowmem_f"] <= 0.5 * t["knowmem_f"]),
        ("knowmem_r ≥ 90% of target", d["knowmem_r"] >= 0.9 * t["knowmem_r"]),
    ]
    return [f"- {'met' if ok else 'NOT met'}: DiPO {name}" for name, ok in checks]


def _plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
    for ax, key, title in zip(axes, ("knowmem_f", "verbmem_f"), ("KnowMem on forget", "VerbMem on forget")):
        for name, m in metrics.items():
            ax.scatter(m["knowmem_r"], m[key], s=70, label=name, alpha=0.85)
        ax.set_xlabel("KnowMem on retain (higher is better)")
        ax.set_ylabel(f"{title} (lower is better)")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Forget knowledge vs retain knowledge per model")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _report(metrics: dict, timings: dict, runs: dict, data_desc: str, cfgs: dict) -> str:
    rows = "\n".join(
        f"| {name} | {m['verbmem_f']:.1f} | {m['knowmem_f']:.1f} | {m['knowmem_r']:.1f} |"
        for name, m in metrics.items())
    c = cfgs["dipo"]
    lines = [
        "# dipo-scale demo report", "",
        f"Data: {data_desc}.", "",
        "| model | VerbMem forget ↓ | KnowMem forget ↓ | KnowMem retain ↑ |",
        "|---|---|---|---|", rows, "",
        "![forget vs retain](forget_vs_retain.png)", "",
        "## What was run", "",
        f"- target: trained on forget + retain (documents and QA pairs); retrain: retain only.",
        f"- DiPO, NPO, GA: {c.train.steps} steps each, global batch {c.train.global_batch_size} forget "
        f"blocks (+ as many retain blocks, retain term `{c.loss.retain}`), lr {c.train.lr:g}, "
        f"{c.train.num_workers} Ray Train workers, DeepSpeed ZeRO-3 (`{c.train.ds_config}`).",
        f"- DiPO: α={c.dipo.alpha:g}, β={c.dipo.beta:g}, select={c.dipo.select}, k={c.dipo.k}; "
        f"NPO: β={cfgs['npo'].npo.beta:g}.",
        "- The forget set that is unlearned is the forget documents plus the forget QA pairs the "
        "target was trained on (TOFU-style); the gd retain term trains on retain documents and QA.",
        "",
        "## Expectations for DiPO", "", *_fraction_targets(metrics), "",
        "## Final training log line per method", "",
    ]
    for method, last in runs.items():
        lines.append(f"- {method}: " + ", ".join(f"{k}={v:.3f}" for k, v in last.items()
                                                  if isinstance(v, float)))
    lines += ["", "## Time per stage (seconds)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path, *, data_dir: str | None = None, overrides: list[str] | None = None,
             num_docs: int | None = None) -> dict:
    import ray
    import torch

    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.evaluate import evaluate_muse, load_model_and_tokenizer
    from dipo_scale.models import build_models
    from dipo_scale.prepare import prepare
    from dipo_scale.unlearn import run_unlearning

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    # Validate every method's config before any work starts.
    cfgs = {m: load_unlearn_config(None, overrides, base={**DEMO_UNLEARN, "method": m,
                                                          "out_dir": str(out / "runs" / m)})
            for m in METHODS}

    t = time.time()
    if data_dir is None:
        corpus_dir = out / "corpus"
        if not (corpus_dir / "world.json").is_file():
            generate_corpus(corpus_dir, num_docs=num_docs or DEFAULT_NUM_DOCS, seed=0)
        data_desc = f"embedded fictitious news corpus ({corpus_dir})"
    else:
        corpus_dir = Path(data_dir)
        data_desc = f"user directory {corpus_dir.resolve()}"
    data = load_muse_dir(corpus_dir)
    timings["corpus"] = time.time() - t

    t = time.time()
    paths = build_models(data, out / "models", MODEL_SETTINGS)
    timings["tokenizer + target + retrain models"] = time.time() - t

    t = time.time()
    tokenizer_dir = paths["tokenizer"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepare(data, tokenizer, out / "prepared", block_size=MODEL_SETTINGS.block_size, with_qa=True,
            layout="per_sequence")
    timings["prepare"] = time.time() - t

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    models = {"target": paths["target"], "retrain": paths["retrain"]}
    last_log = {}
    for method, cfg in cfgs.items():
        t = time.time()
        cfg = cfg.model_copy(update={
            "model": cfg.model.model_copy(update={"path": str(paths["target"])}),
            "data": cfg.data.model_copy(update={"prepared_dir": str(out / "prepared"),
                                                "block_size": MODEL_SETTINGS.block_size})})
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # the demo always unlearns afresh
        models[method] = run_unlearning(cfg)
        log_lines = (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()
        last_log[method] = json.loads(log_lines[-1])
        timings[f"unlearn {method}"] = time.time() - t

    t = time.time()
    ev = cfgs["dipo"].eval
    metrics = {}
    torch.manual_seed(0)
    for name, path in models.items():
        model, tok = load_model_and_tokenizer(str(path))
        metrics[name] = evaluate_muse(model, tok, data, verbmem_max_new_tokens=ev.verbmem_max_new_tokens,
                                      knowmem_max_new_tokens=ev.knowmem_max_new_tokens,
                                      batch_size=ev.batch_size, limit=ev.limit)
        print(f"{name}: " + ", ".join(f"{k}={v:.1f}" for k, v in metrics[name].items()))
    timings["evaluate 5 models"] = time.time() - t

    _plot(metrics, out / "forget_vs_retain.png")
    atomic_write_json(out / "metrics.json", {"models": metrics})
    atomic_write_text(out / "report.md", _report(metrics, timings, last_log, data_desc, cfgs))
    print(f"report: {out / 'report.md'}")
    return metrics
