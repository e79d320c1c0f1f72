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

Checks first: everything a series needs is checked on the driver before out_dir is claimed, Ray
starts or anything is evaluated (`check_series`; one-line errors, exit 2, nothing written, so the
corrected command just runs): the starting model's files and tokenizer, the forget sets (a
`sust/forget_k.*` file the numbering skips, or a `forget*` file it cannot read as a request, is an
error naming it, never dropped), each request's unlearning config (batch sizes against the
workers, the DeepSpeed config, the optimizer, block size against the model's positions, a retain
split where the loss needs one; errors name the `unlearn.*` key), the CPUs (GPUs) for the workers
(a local cluster's before it starts, a joined one's once joined), out_dir, and what a resume would
reuse.

Resume: re-running the same command reuses earlier work only where what it was made from is
unchanged, all checked before any work: the starting model's weights (lineage.json's initial
fingerprint), data_dir's content (`data_fingerprint`), each finished request's forget set
(`forget_fingerprint`) and output model (its recorded fingerprint: later requests built on it), and
the unfinished request's forget set (requests/<k>/forget.json) before its prepared blocks and
checkpoints are reused. A difference is a one-line error naming out_dir and what changed. It then
skips every finished request; the first unfinished request's run resumes from its last Ray Train
checkpoint (run_unlearning does that in a run dir it has seen). A different config in out_dir is
refused. `seconds` is the time of the attempt that finished the request.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dipo_scale.cluster import init_ray
from dipo_scale.config import SeriesConfig, UnlearnConfig
from dipo_scale.errors import UserInputError
from dipo_scale.files import (atomic_write_json, check_output_dir, check_run_dir, claim_run_dir, hold_output_dir,
                              json_digest, weights_fingerprint)
from dipo_scale.preflight import check_model, check_resources, check_workers_can_run, max_positions

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
        _check_no_set_left_out(cfg.data_dir, subset, sets)
        return sets
    docs, folds = data.forget_docs, cfg.folds
    if folds > len(docs):
        raise UserInputError(f"folds: {folds} is more than the {len(docs)} forget documents of {cfg.data_dir}")
    bounds = np.linspace(0, len(docs), folds + 1).round().astype(int)
    if kind == "sequential":
        return [(f"raw/forget fold {k + 1} of {folds}", docs[bounds[k]:bounds[k + 1]]) for k in range(folds)]
    return [(f"raw/forget first {bounds[k + 1]} of {len(docs)}", docs[:bounds[k + 1]]) for k in range(folds)]


_SET_NAME = re.compile(r"forget_([1-9]\d*)$")


def _check_no_set_left_out(source: str, subset: str, sets: list[tuple[str, list[str]]]) -> None:
    """Every forget set the data holds is a request: `load_forget_requests` reads forget_1,
    forget_2, ... up to the first missing number, so a set after a gap (forget_4 without forget_3),
    or a file named like a forget set that is none (forget_01.txt, forget-3.txt), would be dropped
    without a word. Each is a one-line error naming it."""
    from dipo_scale.data.muse import RAW_EXTENSIONS, _hub_dataset, is_hub_name

    path = Path(source)
    if not path.exists() and is_hub_name(str(source)):
        splits = _hub_dataset(str(source), subset, required=False) or {}
        names = [(f"{source}[{subset}/{name}]", name) for name in splits if name.lower().startswith("forget")]
    else:
        used = {Path(where).name for where, _ in sets}
        names = [(str(p), p.name.split(".", 1)[0]) for p in sorted((path / subset).iterdir())
                 if p.is_file() and p.suffix.lower() in RAW_EXTENSIONS and p.name.lower().startswith("forget")
                 and p.name not in used]
    for where, stem in names:
        number = _SET_NAME.match(stem)
        if number and int(number.group(1)) <= len(sets):
            continue  # (hub splits: the ones read)
        if number:
            raise UserInputError(f"{where}: forget set {int(number.group(1))} follows no forget_{len(sets) + 1} "
                                 f"(the requests are forget_1, forget_2, ... without a gap; the series would "
                                 f"stop at forget_{len(sets)}); rename it or add the missing set")
        raise UserInputError(f"{where}: not a forget set name the series reads ({subset}/forget_1.*, "
                             f"forget_2.*, ...: forget_<k> with k from 1, no leading zeros); rename or move it")


def data_fingerprint(data) -> str:
    """A fingerprint of data_dir's content (every document, QA pair and item; not where it is)."""
    return json_digest({k: v for k, v in dataclasses.asdict(data).items() if k != "root"})


def forget_fingerprint(docs: list[str]) -> str:
    """A fingerprint of one request's forget documents."""
    return json_digest(docs)


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


_KEY = re.compile(r"(?<![\w./-])(method|model|data|loss|dipo|npo|train|logging|eval|reference)(?=\.[a-z_]|=)")


def _as_set(e: UserInputError) -> UserInputError:
    """An unlearning check's one line with its config keys named as a series sets them
    (train.global_batch_size -> unlearn.train.global_batch_size)."""
    return UserInputError(_KEY.sub(lambda m: f"unlearn.{m.group(1)}", str(e)))


def check_request_config(cfg: SeriesConfig, model: dict, data) -> UnlearnConfig:
    """What every request's unlearning run will check once its blocks are prepared and its input
    model exists, checked now from the settings, the starting model (`check_model`'s result; each
    request's input model has its architecture and tokenizer) and the data: the config, the batch
    against the workers and the DeepSpeed config, the optimizer, the fused head, block size against
    positions, the tokenizer's bos/eos (packing), a retain split where the loss trains on one, the
    evaluation data, wandb. Errors name the `unlearn.*` keys. Returns request 1's config (steps
    as `unlearn.train.steps`)."""
    from dipo_scale.preflight import trained_splits, validate_settings

    first = cfg.unlearn.model.path
    run_cfg = _request_config(cfg, first, Path(cfg.out_dir) / "requests" / "1", 0)
    try:
        run_cfg = UnlearnConfig.model_validate(run_cfg.model_dump(by_alias=True))  # (cross-field checks)
        validate_settings(run_cfg)
    except UserInputError as e:
        raise _as_set(e) from None
    except ValueError as e:  # pydantic's ValidationError
        raise UserInputError(f"unlearn: {' '.join(str(e).split())[:300]}") from None
    limit, block = max_positions(model), run_cfg.data.block_size
    if limit is not None and block > limit:
        raise UserInputError(f"unlearn.data.block_size={block}: exceeds the model's {limit} positions "
                             f"(unlearn.model.path {first})")
    tokenizer = model.get("_tokenizer")
    if tokenizer is not None and (tokenizer.bos_token_id is None or tokenizer.eos_token_id is None):
        raise UserInputError(f"unlearn.model.path {first}: its tokenizer has no bos or eos token (each request's "
                             "documents are packed between them)")
    if "retain" in trained_splits(run_cfg) and not any(doc.strip() for doc in data.retain_docs):
        raise UserInputError(f"data_dir {cfg.data_dir}: no retain documents, but unlearn.loss.retain="
                             f"{run_cfg.loss.retain} trains on them (add raw/retain*, or set unlearn.loss.retain=none)")
    return run_cfg


def _read_lineage(path: Path) -> dict:
    try:
        lineage = json.loads(path.read_text())
        lineage["initial"]["fingerprint"], list(lineage["requests"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path}: malformed lineage ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                             "the series cannot resume (use another out_dir)") from None
    return lineage


def check_resume(cfg: SeriesConfig, data, sets: list[tuple[str, list[str]]], kind: str) -> dict | None:
    """Before any work: what a rerun in out_dir would reuse was made from what it has now (module
    docstring: starting model, data, forget sets, finished requests' outputs, the unfinished
    request's forget set). Returns the verified lineage (None: nothing to reuse)."""
    out, flag = Path(cfg.out_dir), f"out_dir {cfg.out_dir}"
    if not (out / "lineage.json").is_file():
        return None
    lineage = _read_lineage(out / "lineage.json")
    first = cfg.unlearn.model.path
    found = _fingerprint(first)
    if found != lineage["initial"]["fingerprint"]:
        raise UserInputError(f"{flag}: its series started from other weights: the model at unlearn.model.path "
                             f"{first} changed since (fingerprint {lineage['initial']['fingerprint']} then, {found} "
                             "now), and every request was built on it; restore that model, or use another out_dir")
    recorded = lineage.get("data_fingerprint")
    if recorded is not None and recorded != data_fingerprint(data):
        raise UserInputError(f"{flag}: its series was evaluated and unlearned on other data: data_dir "
                             f"{cfg.data_dir} changed since (documents, QA pairs or items; fingerprint {recorded} "
                             f"then, {data_fingerprint(data)} now); restore it, or use another out_dir")
    if len(lineage["requests"]) > len(sets):
        raise UserInputError(f"{flag}: lineage.json holds {len(lineage['requests'])} finished requests but "
                             f"data_dir {cfg.data_dir} now has {len(sets)} forget sets; restore them, or use "
                             "another out_dir")
    for entry, (source, docs) in zip(lineage["requests"], sets):
        if entry.get("forget_fingerprint", forget_fingerprint(docs)) != forget_fingerprint(docs):
            raise UserInputError(f"{flag}: request {entry['request']} was unlearned on another forget set: {source} "
                                 "changed since; restore it, or use another out_dir")
    lineage["requests"] = [_verified(e) for e in lineage["requests"]]
    k = len(lineage["requests"]) + 1
    record = out / "requests" / str(k) / "forget.json"
    if k <= len(sets) and record.is_file():
        started = json.loads(record.read_text()).get("forget_fingerprint")
        if started != forget_fingerprint(sets[k - 1][1]):
            raise UserInputError(f"{flag}: its unfinished request {k} was started on another forget set: "
                                 f"{sets[k - 1][0]} changed since; restore it, or use another out_dir")
    return lineage


def check_series(cfg: SeriesConfig, kind: str):
    """Every check a series needs, before anything is claimed, started or evaluated (module
    docstring). Returns (data, forget sets, lineage to resume or None, out_dir's config record)."""
    from dipo_scale.data.muse import load_muse

    first = cfg.unlearn.model.path
    data = load_muse(cfg.data_dir)
    sets = forget_sets(cfg, data, kind)
    model = check_model(first, "unlearn.model.path", trust_remote_code=cfg.unlearn.model.trust_remote_code)
    run_cfg = check_request_config(cfg, model, data)
    check_resources(run_cfg.train.worker_range[0], use_gpu=run_cfg.train.use_gpu, flag="unlearn.train.num_workers")
    check_output_dir(cfg.out_dir, kind, flag="out_dir", inputs=[("data_dir", cfg.data_dir),
                                                               ("unlearn.model.path", first)])
    record = {"kind": kind, **cfg.model_dump(by_alias=True, exclude={"out_dir"})}
    check_run_dir(cfg.out_dir, record, kind, started=lambda run_dir: (run_dir / "lineage.json").is_file())
    lineage = check_resume(cfg, data, sets, kind)
    return data, sets, lineage, record, run_cfg


def _check_on_cluster(cfg: SeriesConfig, run_cfg: UnlearnConfig) -> None:
    """Once Ray is up (before out_dir is claimed): the workers' resources on this cluster (on GPUs
    also the 8-bit optimizer and the memory plan), and where the evaluations run."""
    from dipo_scale.eval.workers import check_cpu_size, find_placement

    try:
        check_workers_can_run(run_cfg)  # resources; on GPUs the optimizer, the memory plan
    except UserInputError as e:
        raise _as_set(e) from None
    e = cfg.unlearn.eval
    place = find_placement(e.device, cfg.eval_workers if cfg.eval_workers > 1 else e.num_workers, e.gpus_per_worker)
    check_cpu_size(cfg.unlearn.model.path, place, flag="unlearn.model.path",
                   trust_remote_code=cfg.unlearn.model.trust_remote_code)


def run_series(cfg: SeriesConfig, kind: str) -> dict:
    """Run (or resume) a sequential or scalability series; returns lineage.json's content."""
    from dipo_scale.unlearn import run_unlearning

    if kind not in SERIES:
        raise ValueError(f"unknown series kind {kind!r}")
    out = Path(cfg.out_dir).resolve()
    cfg = cfg.model_copy(update={"data_dir": str(Path(cfg.data_dir).resolve())
                                 if Path(cfg.data_dir).exists() else cfg.data_dir})
    data, sets, lineage, record, run_cfg = check_series(cfg, kind)  # nothing claimed, started or written before
    first = cfg.unlearn.model.path
    init_ray()
    _check_on_cluster(cfg, run_cfg)
    with hold_output_dir(out, kind, flag="out_dir"):
        claim_run_dir(out, record, kind, started=lambda run_dir: (run_dir / "lineage.json").is_file())
        path = out / "lineage.json"
        if lineage is None:
            print(f"request 0: evaluating the starting model {first}", flush=True)
            lineage = {"kind": kind, "data_dir": cfg.data_dir, "data_fingerprint": data_fingerprint(data),
                       "requests": [], "initial": {"model": first, "fingerprint": _fingerprint(first),
                                                   "metrics": _evaluate(cfg, data, first)}}
            atomic_write_json(path, lineage)
        _run_requests(cfg, kind, data, sets, lineage, out, run_unlearning)
    _write_series_report(out, lineage, kind)
    return lineage


def _run_requests(cfg: SeriesConfig, kind: str, data, sets, lineage: dict, out: Path, run_unlearning) -> None:
    path, first = out / "lineage.json", cfg.unlearn.model.path
    for k, (source, docs) in enumerate(sets, start=1):
        if k <= len(lineage["requests"]):
            print(f"request {k}: finished before, skipped", flush=True)
            continue
        started, t0 = _now(), time.time()
        input_model = lineage["requests"][-1]["output_model"] if kind == "sequential" and k > 1 else first
        print(f"request {k}/{len(sets)}: {source} ({len(docs)} documents), from {input_model}", flush=True)
        req_dir = out / "requests" / str(k)
        atomic_write_json(req_dir / "forget.json", {"source": source, "forget_fingerprint": forget_fingerprint(docs)})
        manifest = _prepare_request(cfg, data, docs, req_dir / "prepared")
        run_cfg = _request_config(cfg, input_model, req_dir, manifest["splits"]["forget"]["blocks"])
        output_model = str(run_unlearning(run_cfg))
        lineage["requests"].append({
            "request": k, "forget_source": source, "forget_docs": len(docs),
            "forget_fingerprint": forget_fingerprint(docs),
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
