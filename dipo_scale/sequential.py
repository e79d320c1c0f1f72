"""Series of unlearning requests: sequential (MUSE sustainability) and nested (MUSE scalability).

    dipo-scale sequential  --config configs/sequential.yaml
    dipo-scale scalability --config configs/sequential.yaml --set out_dir=runs/scalability

Before the first request the starting model (`unlearn.model.path`) is evaluated once (request 0).
Then request k, in order:
  1. its forget set, from the source `forget_sets` names (never switching by itself):
     `data` (the default): MUSE's `sust/forget_k.*` (sequential) or `scal/forget_k.*` (scalability)
     in data_dir (or the hub's sust/scal config); a data_dir without them is an error;
     `folds`: data_dir's forget documents cut into `folds` parts, even where sust/ (scal/) exists:
     disjoint folds one after another (sequential), or growing prefixes, k/folds of the documents
     (scalability);
  2. packed blocks of that forget set and the retain documents (`requests/<k>/prepared`);
  3. one unlearning run (`requests/<k>/run`, Ray Train + DeepSpeed ZeRO-3) from its input model:
     request k-1's output (sequential) or the starting model (scalability); the DiPO/NPO reference
     is that input model. With `epochs` set, the run's steps cover the forget blocks that many
     times (so cost grows with the forget set), else `unlearn.train.steps`;
  4. evaluation of its output on data_dir: VerbMem, KnowMem forget/retain, MIA AUC;
  5. an entry in `lineage.json`: request id, forget source and size, input model and its weights
     fingerprint, output model and its fingerprint, metrics, start/finish time and seconds.
At the end, `report.md` with a table per request and the sustainability (metrics against the
request index) or scalability (metrics and seconds against forget tokens) plot.

Resume: re-running the same command skips every request whose lineage entry exists, after checking
that its output model still has the recorded fingerprint (a changed model is an error, since later
requests built on it); the first unfinished request's run resumes from its last Ray Train
checkpoint (run_unlearning does that in a run dir it has seen). A different config in out_dir is
refused. `seconds` is the time of the attempt that finished the request.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dipo_scale.cluster import init_ray
from dipo_scale.config import SeriesConfig, UnlearnConfig
from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_write_json, check_output_dir, claim_run_dir, weights_fingerprint
from dipo_scale.preflight import check_model

SERIES = {"sequential": ("sust", "Sustainability", "request"),
          "scalability": ("scal", "Scalability", "forget_tokens")}


def _fingerprint(model: str) -> str | None:
    """The weights fingerprint of a local model directory; None for a hub name."""
    return weights_fingerprint(model) if Path(model).is_dir() else None


def forget_sets(cfg: SeriesConfig, data, kind: str) -> list[tuple[str, list[str]]]:
    """(source, documents) of each request (see the module docstring)."""
    from dipo_scale.data.muse import load_forget_requests

    subset = SERIES[kind][0]
    if cfg.forget_sets == "data":
        sets = load_forget_requests(cfg.data_dir, subset)
        if not sets:
            raise UserInputError(f"{cfg.data_dir}: no {subset} forget sets ({subset}/forget_1.*, forget_2.*, ...; "
                                 f"on the hub its {subset} config); set forget_sets=folds to cut its forget "
                                 f"documents into `folds` parts")
        return sets
    docs, folds = data.forget_docs, cfg.folds
    if folds > len(docs):
        raise UserInputError(f"folds: {folds} is more than the {len(docs)} forget documents of {cfg.data_dir}")
    bounds = np.linspace(0, len(docs), folds + 1).round().astype(int)
    if kind == "sequential":
        return [(f"raw/forget fold {k + 1} of {folds}", docs[bounds[k]:bounds[k + 1]]) for k in range(folds)]
    return [(f"raw/forget first {bounds[k + 1]} of {len(docs)}", docs[:bounds[k + 1]]) for k in range(folds)]


def _evaluate(cfg: SeriesConfig, data, model_dir: str) -> dict[str, float]:
    """MUSE metrics of one model: in this process, or across `eval_workers` (or
    `unlearn.eval.num_workers`) Ray actors, on `unlearn.eval.device` with
    `unlearn.eval.gpus_per_worker` GPUs each (`eval.workers.muse_item_scores`)."""
    from dipo_scale.eval.muse import muse_metrics
    from dipo_scale.eval.workers import muse_item_scores

    e = cfg.unlearn.eval
    placement = {**e.placement(), "num_workers": cfg.eval_workers if cfg.eval_workers > 1 else e.num_workers}
    return muse_metrics(muse_item_scores(model_dir, data, mia=True, trust_remote_code=cfg.unlearn.model.trust_remote_code,
                                         **e.muse_settings(), **placement))


def _prepare_request(cfg: SeriesConfig, data, docs: list[str], prepared: Path) -> dict:
    """Packed blocks of this request's forget documents and the retain documents (reused when a
    previous attempt completed them: `prepare` writes the directory atomically)."""
    from transformers import AutoTokenizer

    from dipo_scale.prepare import prepare, read_manifest

    if (prepared / "manifest.json").is_file():
        return read_manifest(prepared)
    tokenizer = AutoTokenizer.from_pretrained(cfg.unlearn.model.path,
                                              trust_remote_code=cfg.unlearn.model.trust_remote_code)
    return prepare(dataclasses.replace(data, forget_docs=docs), tokenizer, prepared,
                   block_size=cfg.unlearn.data.block_size, with_qa=cfg.with_qa, layout=cfg.layout)


def _request_config(cfg: SeriesConfig, input_model: str, req_dir: Path, forget_blocks: int) -> UnlearnConfig:
    u = cfg.unlearn
    steps = u.train.steps
    if cfg.epochs is not None:
        steps = max(1, math.ceil(cfg.epochs * forget_blocks / u.train.global_batch_size))
    return u.model_copy(update={
        "out_dir": str(req_dir / "run"),
        "model": u.model.model_copy(update={"path": input_model, "reference_path": input_model}),
        "data": u.data.model_copy(update={"prepared_dir": str(req_dir / "prepared")}),
        "train": u.train.model_copy(update={"steps": steps}),
    })


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _verified(entry: dict) -> dict:
    """A finished request's lineage entry, after checking its output model is the one recorded."""
    found = _fingerprint(entry["output_model"])
    if found != entry["output_fingerprint"]:
        raise UserInputError(f"{entry['output_model']}: weights differ from lineage.json's record of request "
                             f"{entry['request']} ({found} != {entry['output_fingerprint']}); later requests "
                             "were built on it, so the series cannot resume (use another out_dir)")
    return entry


def _write_series_report(out: Path, lineage: dict, kind: str) -> None:
    from dipo_scale.report import write_report

    _, title, x_key = SERIES[kind]
    initial = {"request": 0, "forget_tokens": 0, **lineage["initial"]["metrics"]}
    rows = [initial] + [{"request": e["request"], "forget_tokens": e["forget_tokens"], **e["metrics"],
                         **({"seconds": e["seconds"]} if kind == "scalability" else {})}
                        for e in lineage["requests"]]
    by_model = {("starting model" if r["request"] == 0 else f"request {r['request']}"):
                {k: v for k, v in r.items() if k not in ("request", "forget_tokens")} for r in rows}
    records = [{x_key: r[x_key], **{k: v for k, v in r.items() if k not in ("request", "forget_tokens")}}
               for r in (rows if kind == "sequential" else rows[1:])]
    notes = [f"{e['request']}: {e['forget_source']} ({e['forget_docs']} documents, {e['forget_tokens']} tokens), "
             f"{e['steps']} steps in {e['seconds']:.0f} s, from {e['input_model']}" for e in lineage["requests"]]
    write_report(out, by_model, f"{title}: {len(lineage['requests'])} unlearning requests", notes,
                 series={title: (x_key, records)})


def run_series(cfg: SeriesConfig, kind: str) -> dict:
    """Run (or resume) a sequential or scalability series; returns lineage.json's content."""
    from dipo_scale.data.muse import load_muse
    from dipo_scale.unlearn import run_unlearning

    if kind not in SERIES:
        raise ValueError(f"unknown series kind {kind!r}")
    out = Path(cfg.out_dir).resolve()
    cfg = cfg.model_copy(update={"data_dir": str(Path(cfg.data_dir).resolve())
                                 if Path(cfg.data_dir).exists() else cfg.data_dir})
    data = load_muse(cfg.data_dir)
    sets = forget_sets(cfg, data, kind)
    first = cfg.unlearn.model.path
    check_model(cfg.unlearn.model.path, "unlearn.model.path", trust_remote_code=cfg.unlearn.model.trust_remote_code)
    check_output_dir(cfg.out_dir, kind, flag="out_dir", inputs=[("data_dir", cfg.data_dir),
                                                               ("unlearn.model.path", first)])
    claim_run_dir(out, {"kind": kind, **cfg.model_dump(by_alias=True, exclude={"out_dir"})}, kind,
                  started=lambda run_dir: (run_dir / "lineage.json").is_file())
    path = out / "lineage.json"
    init_ray()
    if path.is_file():
        lineage = json.loads(path.read_text())
        lineage["requests"] = [_verified(e) for e in lineage["requests"]]
    else:
        print(f"request 0: evaluating the starting model {first}", flush=True)
        lineage = {"kind": kind, "data_dir": cfg.data_dir, "requests": [],
                   "initial": {"model": first, "fingerprint": _fingerprint(first),
                               "metrics": _evaluate(cfg, data, first)}}
        atomic_write_json(path, lineage)

    for k, (source, docs) in enumerate(sets, start=1):
        if k <= len(lineage["requests"]):
            print(f"request {k}: finished before, skipped", flush=True)
            continue
        started, t0 = _now(), time.time()
        input_model = lineage["requests"][-1]["output_model"] if kind == "sequential" and k > 1 else first
        print(f"request {k}/{len(sets)}: {source} ({len(docs)} documents), from {input_model}", flush=True)
        req_dir = out / "requests" / str(k)
        manifest = _prepare_request(cfg, data, docs, req_dir / "prepared")
        run_cfg = _request_config(cfg, input_model, req_dir, manifest["splits"]["forget"]["blocks"])
        output_model = str(run_unlearning(run_cfg))
        lineage["requests"].append({
            "request": k, "forget_source": source, "forget_docs": len(docs),
            "forget_tokens": manifest["splits"]["forget"]["tokens"], "steps": run_cfg.train.steps,
            "input_model": input_model, "input_fingerprint": _fingerprint(input_model),
            "output_model": output_model, "output_fingerprint": _fingerprint(output_model),
            "metrics": _evaluate(cfg, data, output_model),
            "started": started, "finished": _now(), "seconds": round(time.time() - t0, 1),
        })
        atomic_write_json(path, lineage)
        entry = lineage["requests"][-1]
        print(f"request {k}/{len(sets)}: done in {entry['seconds']:.0f} s, "
              + ", ".join(f"{m}={v:.3g}" for m, v in entry["metrics"].items() if isinstance(v, float)), flush=True)
    _write_series_report(out, lineage, kind)
    return lineage
