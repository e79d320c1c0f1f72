"""`dipo-scale demo`: the whole chain on a tiny model, end to end, with the real engines.

    corpus ─▶ tokenizer ─▶ target + retrain models ─▶ prepare ─▶ unlearn (DiPO, NPO, GA;
    same step budget; Ray Train + DeepSpeed ZeRO-3) ─▶ evaluate all five ─▶ report.md,
    metrics.json, criteria.png, tradeoff.png

With `--data DIR` the same chain runs on the user's own MUSE-layout directory, or on a
TOFU-layout one (`--forget forget01 --retain retain99`): the TOFU protocol in miniature. The
target learns the forget and retain QA pairs, the retrain model (TOFU's retain model) the retain
pairs only; both also learn real_authors / world_facts, the stand-in for what a pretrained model
knows. The forget QA pairs are unlearned and every model gets TOFU's forget quality (against the
retrain model's truth ratios) and model utility.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dipo_scale.cluster import init_ray
from dipo_scale.config import load_unlearn_config
from dipo_scale.data.muse import MuseData, is_hub_name
from dipo_scale.data.tofu import TofuData, is_tofu_dir, qa_pairs_as_muse
from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_write_json, atomic_write_text, check_output_dir, mark_output_dir
from dipo_scale.models import TinyModelSettings
from dipo_scale.progress import Progress
from dipo_scale.report import CI, write_report

METHODS = ("dipo", "npo", "ga")
# The generated corpus: 40 forget and 40 holdout documents, so that the membership attack's AUC
# (and PrivLeak) rests on 40 x 40 pairs, and 20 retain documents (the holdout documents cost no
# training, the others are what the target and retrain models learn within the demo's budget);
# --num-docs N splits N documents by the generator's fractions.
DEFAULT_CORPUS = {"num_docs": 100, "forget_docs": 40, "holdout_docs": 40}

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
DEFAULT_TOFU_FORGET = "forget10"
# TOFU metrics shown in report.md (metrics.json also has the nine model-utility components).
TOFU_REPORT_KEYS = ("knowmem_f", "knowmem_r", "mia_auc", "privleak", "forget_quality", "model_utility",
                    "forget_truth_ratio", "forget_prob")


def _fraction_targets(metrics: dict) -> list[str]:
    """The expectations of the spine issue, checked against the measured numbers."""
    t, d = metrics["target"], metrics["dipo"]
    checks = [
        ("verbmem_f ≤ ½ target", d["verbmem_f"] <= 0.5 * t["verbmem_f"]),
        ("knowmem_f ≤ ½ target", d["knowmem_f"] <= 0.5 * t["knowmem_f"]),
        ("knowmem_r ≥ 90% of target", d["knowmem_r"] >= 0.9 * t["knowmem_r"]),
    ]
    return [f"{'met' if ok else 'NOT met'}: DiPO {name}" for name, ok in checks]


def _notes(about_data: list[str], about_eval: list[str], timings: dict, runs: dict,
           cfgs: dict) -> list[str]:
    """What was run (the data, the unlearning, the evaluation), the last log line and the time per stage."""
    c = cfgs["dipo"]
    names = ", ".join("DiPO" if m == "dipo" else m.upper() for m in cfgs)
    notes = [
        *about_data,
        f"{names}: {c.train.steps} steps each, global batch {c.train.global_batch_size} forget "
        f"blocks (+ as many retain blocks, retain term `{c.loss.retain}`), lr {c.train.lr:g}, "
        f"{c.train.num_workers} Ray Train workers, DeepSpeed ZeRO-3 (`{c.ds_config_name}`).",
        f"DiPO: α={c.dipo.alpha:g}, β={c.dipo.beta:g}, select={c.dipo.select}, k={c.dipo.k}"
        + (f"; NPO: β={cfgs['npo'].npo.beta:g}." if "npo" in cfgs else "."),
        *about_eval,
    ]
    for method, last in runs.items():
        notes.append(f"last training step of {method}: " + ", ".join(
            f"{k}={v:.3f}" for k, v in last.items() if isinstance(v, float)))
    notes.append("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return notes


# --- TOFU ------------------------------------------------------------------------------------------
def is_tofu_source(data_dir: str | None) -> bool:
    """Whether the demo's --data is TOFU-layout: a directory of locuslab/TOFU-named files, or a
    hub name like locuslab/TOFU."""
    if data_dir is None:
        return False
    path = Path(data_dir)
    return is_tofu_dir(path) or (not path.exists() and is_hub_name(data_dir) and "tofu" in data_dir.lower())


def default_retain_split(forget: str) -> str:
    """TOFU's retain split for a forget split: forget01 -> retain99, forget10 -> retain90."""
    match = re.fullmatch(r"forget(\d+)", forget)
    if match is None or not 0 < int(match.group(1)) < 100:
        raise UserInputError(f"--forget {forget}: not named forgetNN; give the retain split with --retain")
    return f"retain{100 - int(match.group(1))}"


@dataclass
class TofuDemoData:
    """A TOFU-layout directory cut into what the demo's stages need."""

    eval: TofuData  # what is evaluated (forget with paraphrased/perturbed answers, utility sets)
    models: MuseData  # what the target learns (forget + retain + background QA; retrain: no forget)
    unlearn: MuseData  # what is unlearned (forget QA) and what the gd retain term trains on (retain QA)
    desc: str


def _limit_retain(train: list, evaluated: list | None, limit: int) -> tuple[list, list | None]:
    """The first `limit` retain pairs, those of the evaluation subset first, and the evaluation
    subset cut to the pairs kept: model utility then measures retain knowledge the models learnt."""
    asked = {it.question for it in evaluated or []}
    kept = sorted(train, key=lambda it: it.question not in asked)[:limit]  # stable: file order within
    if evaluated:
        kept_questions = {it.question for it in kept}
        evaluated = [it for it in evaluated if it.question in kept_questions] or evaluated[:limit]
    return kept, evaluated


def load_tofu_demo(source: str, forget: str, retain: str, retain_limit: int | None = None) -> TofuDemoData:
    """The demo's view of a TOFU-layout directory (or hub name); every file is checked here.

    Trained and unlearned: `forget` (its plain file, else its _perturbed one) and `retain` (cut to
    `retain_limit` pairs). Evaluated: `forget`_perturbed, retain_perturbed, real_authors,
    world_facts, holdoutNN (`load_tofu`)."""
    from dipo_scale.data.tofu import TofuSource, load_split, load_tofu

    data = load_tofu(source, forget=forget)
    src = TofuSource(source)
    forget_items = load_split(src, forget, required=False) or data.forget
    retain_items = load_split(src, retain)
    total = len(retain_items)
    if retain_limit is not None:
        retain_items, data.retain = _limit_retain(retain_items, data.retain, retain_limit)
    background = (data.real_authors or []) + (data.world_facts or [])
    desc = (f"TOFU-layout {source}: {forget} ({len(forget_items)} QA pairs) is unlearned, {retain} "
            f"({len(retain_items)} of {total} QA pairs) is kept")
    return TofuDemoData(eval=data, models=qa_pairs_as_muse(source, forget_items, retain_items + background),
                        unlearn=qa_pairs_as_muse(source, forget_items, retain_items), desc=desc)


def _tofu_notes(tofu: TofuDemoData, metrics: dict, forget: str, retain: str,
                max_new_tokens: int) -> tuple[list[str], list[str]]:
    """The report's notes on the data and on the evaluation of a TOFU run."""
    about_data = [
        f"Data: {tofu.desc}.",
        f"target: trained on {forget} + {retain} + real_authors + world_facts QA pairs (the last two "
        "stand in for what a pretrained model knows: the tiny models start from scratch); retrain "
        f"(TOFU's retain model): the same without {forget}. Each pair in TOFU's prompt "
        "\"Question: {q}\\nAnswer: \", loss on the answer only.",
    ]
    t = metrics["target"]
    about_eval = [
        f"The forget set that is unlearned is the {forget} QA pairs; the gd retain term trains on the "
        f"{retain} QA pairs.",
        "forget_quality: p-value of the KS test between a model's truth ratios on the forget set and "
        "the retrain model's (1 for retrain itself; higher is closer to never having learnt it). "
        "model_utility: harmonic mean of probability, ROUGE-L recall and truth-ratio score on "
        "retain_perturbed, real_authors and world_facts (the nine components are in metrics.json). "
        "knowmem_f / knowmem_r: ROUGE-L recall x100 of the greedy answers (at most "
        f"eval.knowmem_max_new_tokens = {max_new_tokens} tokens) on the forget set / retain_perturbed.",
        *tofu.eval.notes,
    ]
    if "privleak" in t:
        about_eval.append("PrivLeak is relative to the retrain model's MIA AUC (Min-40% Prob of the "
                          f"answer tokens, {forget} vs holdout).")
    if "forget_quality" in t and "model_utility" in t:
        for method in (m for m in METHODS if m in metrics):
            m = metrics[method]
            about_eval.append(
                f"{method}: forget quality {m['forget_quality']:.3g} (target {t['forget_quality']:.3g}), "
                f"model utility {m['model_utility']:.3f} (target {t['model_utility']:.3f})")
    return about_data, about_eval


def _evaluate_tofu(models: dict, data: TofuData, ev) -> tuple[dict, dict]:
    """TOFU's metrics and Min-K% scores (forget, holdout) of every model; forget quality against the
    retrain model's truth ratios. Each
    model in this process, or in a Ray actor with `eval.gpus_per_worker` GPUs, on `eval.device`."""
    from dipo_scale.eval.tofu import evaluate_tofu, tofu_forget_truth_ratios
    from dipo_scale.eval.workers import on_model

    place = dict(device=ev.device, gpus_per_worker=ev.gpus_per_worker)
    _seed_torch()
    retain_ratios = on_model(str(models["retrain"]), tofu_forget_truth_ratios, data, batch_size=ev.batch_size,
                             limit=ev.limit, **place)
    results = _evaluate_each(models, lambda path: on_model(
        path, evaluate_tofu, data, retain_truth_ratios=retain_ratios, batch_size=ev.batch_size, limit=ev.limit,
        max_new_tokens=ev.knowmem_max_new_tokens, **place))
    return {n: r.metrics for n, r in results.items()}, {n: r.mia_scores for n, r in results.items()}


# --- MUSE ------------------------------------------------------------------------------------------
def _evaluate_muse(models: dict, data: MuseData, ev) -> tuple[dict, dict]:
    """MUSE's metrics and Min-K% scores (forget, holdout) of every model, where `eval.device`, `eval.num_workers` and
    `eval.gpus_per_worker` say (`eval.workers.muse_item_scores`)."""
    from dipo_scale.eval.muse import mia_pair, muse_metrics
    from dipo_scale.eval.workers import muse_item_scores

    _seed_torch()
    scores = _evaluate_each(models, lambda path: muse_item_scores(
        path, data, mia=True, **ev.muse_settings(), **ev.placement()))
    return ({n: muse_metrics(s) for n, s in scores.items()},
            {n: mia_pair(s) for n, s in scores.items()})


def _muse_notes(metrics: dict, data_desc: str) -> tuple[list[str], list[str]]:
    """The report's notes on the data and on the evaluation of a MUSE run."""
    about_data = [f"Data: {data_desc}.",
                  "target: trained on forget + retain (documents and QA pairs); retrain: retain only."]
    about_eval = [
        "The forget set that is unlearned is the forget documents plus the forget QA pairs the "
        "target was trained on (TOFU-style); the gd retain term trains on retain documents and QA.",
        "PrivLeak is relative to the retrain model's MIA AUC (Min-40% Prob, forget vs holdout).",
        *_fraction_targets(metrics),
    ]
    return about_data, about_eval


def _seed_torch() -> None:
    import torch

    torch.manual_seed(0)


def _evaluate_each(models: dict, evaluate) -> dict:
    """{name: evaluate(model directory)} for every model, a progress line after each."""
    progress = Progress("demo: evaluate", total=len(models), unit="models", every_s=0)
    metrics = {}
    for name, path in models.items():
        metrics[name] = evaluate(str(path))
        progress.update(model=name)
    return metrics


@contextmanager
def _stage(name: str, timings: dict[str, float]):
    """A console line when the stage starts and one when it ends, with its seconds (kept in `timings`)."""
    print(f"demo: {name} ...", flush=True)
    t = time.time()
    yield
    timings[name] = time.time() - t
    print(f"demo: {name}: done in {timings[name]:.1f} s", flush=True)


def _add_privleak(metrics: dict, mia_scores: dict) -> list[str]:
    """PrivLeak of every model, relative to the retrain model's MIA AUC (when there is one), with
    its paired bootstrap interval (`eval.privacy.add_privleak`). `mia_scores`: {model name:
    (forget, holdout) Min-K% scores}. Returns the report's notes."""
    from dipo_scale.eval.privacy import add_privleak

    reference = metrics["retrain"].get("mia_auc")
    notes = [n for name, m in metrics.items()
             for n in add_privleak(m, reference, mia_scores[name], mia_scores["retrain"])]
    return list(dict.fromkeys(notes))


def _relearn_settings(cfg, settings: TinyModelSettings):
    """The relearning attack of the demo: the unlearning runs' learning rate, batch and workers on
    the tiny models' blocks, for RelearnConfig's default steps and slice."""
    from dipo_scale.config import RelearnConfig

    t = cfg.train
    return RelearnConfig(lr=t.lr, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                         num_workers=t.worker_range[0], block_size=settings.block_size)


def _attack_models(models: dict, attacks: tuple[str, ...], out: Path, source: Path, forget: str | None, ev,
                   relearn) -> dict[str, dict]:
    """Every model evaluated before and after each attack (`dipo-scale attack`'s code, into
    out/attacks/<name>/, against the retrain model): {name: its metrics with `<metric>@<attack>`
    and `<metric>@<attack>_recovery`}."""
    from dipo_scale.eval.run import run_evaluation

    reference = {"retain_model": str(models["retrain"])} if forget else {"retrain_model": str(models["retrain"])}
    progress = Progress("demo: attack", total=len(models), unit="models", every_s=0)
    attacked = {}
    for name, path in models.items():
        _seed_torch()
        attacked[name] = run_evaluation(
            str(path), str(source), out / "attacks" / name, forget=forget or DEFAULT_TOFU_FORGET,
            batch_size=ev.batch_size, limit=ev.limit,
            max_new_tokens=ev.knowmem_max_new_tokens if forget else ev.verbmem_max_new_tokens,
            device=ev.device, num_workers=ev.num_workers, gpus_per_worker=ev.gpus_per_worker,
            attacks=attacks, relearn=relearn, **reference)
        progress.update(model=name)
    return attacked


def _attack_notes(attacks: tuple[str, ...], relearn, tofu: bool) -> list[str]:
    notes = [f"Robustness: each model evaluated before and after {', '.join(attacks)} (`dipo-scale attack`'s "
             "code; per model in attacks/<model>/), its before column from that same evaluation."]
    if relearn is not None:
        notes.append(f"relearn: {relearn.steps} steps (lr {relearn.lr:g}, batch {relearn.global_batch_size}, "
                     f"{relearn.num_workers} ZeRO-3 workers) on {relearn.fraction:g} of the forget "
                     f"{'QA pairs' if tofu else 'documents'} (seed {relearn.seed}); every criterion of the "
                     "robustness tables is measured on the rest, so its before values differ from the table above.")
    if tofu:
        notes.append("The robustness tables' model utility uses the whole retain_perturbed split "
                     "(not cut by --retain-limit).")
    return notes


def run_demo(out: str | Path, *, data_dir: str | None = None, overrides: list[str] | None = None,
             num_docs: int | None = None, forget: str | None = None, retain: str | None = None,
             retain_limit: int | None = None, model_settings: TinyModelSettings | None = None,
             methods: tuple[str, ...] = METHODS, doc: str | None = None, command: str = "dipo-scale demo",
             attacks: tuple[str, ...] = ()) -> dict:
    """The demo (module docstring) into `out`; returns {model name: metrics}.

    TOFU-layout `data_dir`: `forget` (default forget10) is unlearned, `retain` (default the
    complement, e.g. retain90) is kept, cut to `retain_limit` pairs. `model_settings` replaces
    MODEL_SETTINGS (the tiny models' size and training). `methods`: the unlearning methods to run
    (dipo always among them). `doc`: also write the report as a page of the docs (`write_doc`),
    headed by `command`, the date and the machine. `attacks` (`eval.attacks.ATTACKS`): every model
    is also evaluated after each attack (`_attack_models`), into a robustness section."""
    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.models import build_models
    from dipo_scale.prepare import prepare
    from dipo_scale.unlearn import run_unlearning

    settings = model_settings or MODEL_SETTINGS
    tofu_source = is_tofu_source(data_dir)
    if not tofu_source and (forget is not None or retain is not None or retain_limit is not None):
        raise UserInputError("--forget, --retain and --retain-limit are for TOFU-layout data "
                             "(--data DIR holding forget01.json, forget01_perturbed.json, retain99.json, ...)")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "dipo" not in methods:
        raise UserInputError(f"--methods {','.join(methods)}: choose among {','.join(METHODS)}, dipo included")
    if retain_limit is not None and retain_limit < 1:
        raise UserInputError(f"--retain-limit {retain_limit}: must be >= 1")
    out = check_output_dir(out, "demo", inputs=[("--data", data_dir)])
    if doc is not None:
        check_doc_path(doc)
    started, load_at_start = time.time(), os.getloadavg()
    timings: dict[str, float] = {}
    # Validate every method's config before any work starts (and, for TOFU, every data file).
    cfgs = {m: load_unlearn_config(None, overrides, base={**DEMO_UNLEARN, "method": m,
                                                          "out_dir": str(out / "runs" / m)})
            for m in METHODS if m in methods}
    relearn = _relearn_settings(cfgs["dipo"], settings) if "relearn" in attacks else None
    if attacks:  # (each model's evaluation checks them again; here, before any training)
        from dipo_scale.eval.attacks import check_attacks

        ev = cfgs["dipo"].eval
        check_attacks(list(attacks), relearn, device=ev.device, gpus_per_worker=ev.gpus_per_worker)
    mark_output_dir(out, "demo")

    tofu = None
    if tofu_source:
        with _stage("data", timings):
            forget = forget or DEFAULT_TOFU_FORGET
            retain = retain or default_retain_split(forget)
            tofu = load_tofu_demo(data_dir, forget, retain, retain_limit)
            model_data, data = tofu.models, tofu.unlearn
    else:
        with _stage("corpus", timings):
            if data_dir is None:
                corpus_dir = out / "corpus"
                if not (corpus_dir / "world.json").is_file():
                    generate_corpus(corpus_dir, **({'num_docs': num_docs} if num_docs else DEFAULT_CORPUS), seed=0)
                data_desc = f"embedded fictitious news corpus ({corpus_dir})"
            else:
                corpus_dir = Path(data_dir)
                data_desc = f"user directory {corpus_dir.resolve()}"
            data = model_data = load_muse_dir(corpus_dir)

    with _stage("tokenizer + target + retrain models", timings):
        paths = build_models(model_data, out / "models", settings)

    with _stage("prepare", timings):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
        prepare(data, tokenizer, out / "prepared", block_size=settings.block_size, with_qa=True,
                layout="per_sequence")

    # log_to_driver: the workers' progress lines reach this console
    init_ray(log_to_driver=True, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    models = {"target": paths["target"], "retrain": paths["retrain"]}
    last_log = {}
    for method, cfg in cfgs.items():
        with _stage(f"unlearn {method}", timings):
            cfg = cfg.model_copy(update={
                "model": cfg.model.model_copy(update={"path": str(paths["target"])}),
                "data": cfg.data.model_copy(update={"prepared_dir": str(out / "prepared"),
                                                    "block_size": settings.block_size})})
            shutil.rmtree(cfg.out_dir, ignore_errors=True)  # the demo always unlearns afresh
            models[method] = run_unlearning(cfg)
            log_lines = (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()
            last_log[method] = json.loads(log_lines[-1])

    ev = cfgs["dipo"].eval
    with _stage(f"evaluate {len(models)} models", timings):
        metrics, mia_scores = _evaluate_tofu(models, tofu.eval, ev) if tofu else _evaluate_muse(models, data, ev)
        eval_notes = _add_privleak(metrics, mia_scores)
    for name, m in metrics.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float)))

    robustness = {}
    if attacks:
        with _stage(f"attack {len(models)} models ({', '.join(attacks)})", timings):
            robustness = _attack_models(models, attacks, out, Path(data_dir) if tofu else corpus_dir,
                                        forget if tofu else None, ev, relearn)
    atomic_write_json(out / "metrics.json", {"models": metrics, **({"attacks": robustness} if attacks else {})})
    if tofu:
        about_data, about_eval = _tofu_notes(tofu, metrics, forget, retain, ev.knowmem_max_new_tokens)
        shown = {name: {k: m[k] for key in TOFU_REPORT_KEYS for k in (key, f"{key}{CI}") if k in m}
                 for name, m in metrics.items()}
        title = f"dipo-scale demo report (TOFU protocol, {forget})"
    else:
        about_data, about_eval = _muse_notes(metrics, data_desc)
        shown, title = metrics, "dipo-scale demo report"
    if attacks:
        from dipo_scale.eval.attacks import split_metrics

        about_eval += _attack_notes(attacks, relearn, tofu is not None)
    write_report(out, shown, title, _notes(about_data, about_eval + eval_notes, timings, last_log, cfgs),
                 attacks={name: split_metrics(m) for name, m in robustness.items()} or None)
    print(f"report: {out / 'report.md'}")
    if doc is not None:
        write_doc(doc, out, command, started, load_at_start)
        print(f"doc: {doc}")
    return metrics


DOC_MARKER = "<!-- written by `dipo-scale demo --doc`; rerun it to update -->"


def check_doc_path(doc: str | Path) -> None:
    """--doc may write a new file or one it wrote before (its first line is DOC_MARKER), never
    over anything else."""
    path = Path(doc)
    if path.is_dir():
        raise UserInputError(f"--doc {doc}: is a directory")
    if not path.parent.is_dir():
        raise UserInputError(f"--doc {doc}: directory {path.parent} does not exist")
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as f:
            if f.readline().rstrip("\n") != DOC_MARKER:
                raise UserInputError(f"--doc {doc}: exists and was not written by `dipo-scale demo --doc`; "
                                     "not overwriting it (choose another path or move it away)")


def write_doc(doc: str | Path, out: Path, command: str, started: float, load_at_start: tuple) -> None:
    """The run's report.md as a docs page: DOC_MARKER, then who wrote it (command, date, machine,
    load, wall time), then the report with its plots copied to `<doc stem>_files/`."""
    import datetime
    import platform

    path = Path(doc)
    files = path.parent / f"{path.stem}_files"
    files.mkdir(exist_ok=True)
    body = (out / "report.md").read_text(encoding="utf-8").splitlines()
    for png in sorted(p.name for p in out.glob("*.png")):
        shutil.copyfile(out / png, files / f".{png}.tmp")
        os.replace(files / f".{png}.tmp", files / png)
        body = [line.replace(f"]({png})", f"]({files.name}/{png})") for line in body]
    kept = _marked_sections(path.read_text(encoding="utf-8")) if path.is_file() else []
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_end = os.getloadavg()
    header = [
        DOC_MARKER, "",
        "# Demo results", "",
        f"Written by the run itself: `{command}`, {when}, on {platform.machine()} with {os.cpu_count()} CPUs "
        f"(no GPU used), {time.time() - started:.0f} s in all; load average {load_at_start[0]:.1f} at the "
        f"start and {load_end[0]:.1f} at the end (other jobs on the machine slow every stage). The "
        f"figures are the run's metrics.json; the stage times are in the notes.", "",
    ]
    atomic_write_text(path, "\n".join(header + ["##" + body[0][1:]] + body[1:] + kept) + "\n")


def _marked_sections(text: str) -> list[str]:
    """The lines of each `<!-- name:begin -->` ... `<!-- name:end -->` section of a docs page: what
    other commands wrote into it (e.g. benchmarks/sweep_evidence.py), kept when the demo rewrites it."""
    blocks = [m.group(0) for m in re.finditer(r"^<!-- ([\w-]+):begin -->$.*?^<!-- \1:end -->$", text,
                                              flags=re.S | re.M)]
    return [line for block in blocks for line in ["", *block.splitlines()]]
