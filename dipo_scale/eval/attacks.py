"""Attacks on unlearning: does the forgetting survive 4-bit quantization, or a few steps of
relearning? If it does not, the knowledge was hidden, not removed.

    quantize8, quantize4   the model reloaded with bitsandbytes in 8-bit (LLM.int8) or 4-bit NF4
                           (Zhang et al., ICLR 2025: quantizing a GA/NPO-unlearned model to 4 bits
                           restores much of what it forgot)
    relearn                the model fine-tuned for `relearn.steps` steps on a slice of its forget set
                           (`relearn.fraction` of the forget documents; TOFU: of the forget QA pairs),
                           or on a named related set (`relearn.data`), with unlearning's own engine
                           (Ray Train + ZeRO-3, method=relearn: descent on the NLL; Hu et al., "Jogging
                           the memory of unlearned LLMs through targeted relearning attacks")

Every criterion is rerun on the attacked model: metrics.json gets `<metric>@<attack>` and
`<metric>@<attack>_recovery` = after - before. The relearned slice is never evaluated: with relearn
among the attacks, every criterion of the run (before and after each attack) is measured on the
forget set less the slice (`split_relearn`), so before and after compare the same items. A MUSE
item belongs to the slice when its text (VerbMem prompt, attack text) or its answer (KnowMem)
occurs in a slice document, whitespace-normalised and case-folded; this errs towards leaving out.

The relearning run is resumable: a rerun into the same OUT reuses OUT/relearn/ (its checkpoints,
its relearned model) only when it would be made from the same things, recorded in
OUT/relearn/source.json: the model's weights (`files.sampled_fingerprint`), the documents (or QA
pairs) it trains on, and the relearn settings but `num_workers`. A rerun whose model, data or
settings differ from those of an earlier run that made progress is refused in one line naming
`--out` and what changed, before any evaluation, preparation or Ray start (`check_relearn_reuse`,
from the command line; `relearn_model` checks again before it writes anything). The relearning
run's settings (batch against workers, DeepSpeed config, the workers' CPUs/GPUs, block size against
the model's positions) are checked before any model loads too, named as `relearn.*` keys.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from dipo_scale.config import RelearnConfig, UnlearnConfig
from dipo_scale.data.muse import MuseData, read_documents
from dipo_scale.data.tofu import TofuData, qa_pairs_as_muse
from dipo_scale.errors import UserInputError
from dipo_scale.files import json_digest
from dipo_scale.eval.privacy import CI

ATTACKS = ("quantize8", "quantize4", "relearn")
QUANTIZE_BITS = {"quantize8": "8bit", "quantize4": "4bit"}
RECOVERY = "_recovery"  # metrics: `<metric>@<attack>_recovery` is after - before
_KINDS = {"quantize": ("quantize8", "quantize4"), "quantize8": ("quantize8",), "quantize4": ("quantize4",),
          "relearn": ("relearn",)}


def parse_attacks(text: str, flag: str) -> list[str]:
    """The attacks named in a comma-separated list ("quantize" is both quantize8 and quantize4), in
    ATTACKS order."""
    named = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in named if part not in _KINDS]
    if unknown or not named:
        raise UserInputError(f"{flag} {text}: unknown attack {unknown[0] if unknown else '(none)'!r} "
                             f"(choose from {', '.join(_KINDS)}; comma-separated)")
    chosen = {attack for part in named for attack in _KINDS[part]}
    return [attack for attack in ATTACKS if attack in chosen]


def check_quantization(attack: str, device: str) -> None:
    """A bitsandbytes layer of `attack`'s kind quantizes and runs on `device` ("cpu" / "cuda") in
    this process, in well under a second: a backend that cannot is a one-line error before any
    model loads."""
    import torch

    bits = QUANTIZE_BITS[attack]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        import bitsandbytes as bnb

        layer = (bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False) if bits == "8bit" else
                 bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=dtype))
        layer.to(device)(torch.randn(2, 64, device=device, dtype=dtype))
    except Exception as e:  # noqa: BLE001  (whatever the backend raises: one line, not a trace)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(f"{attack}: bitsandbytes cannot run {bits} layers on {device} here "
                             f"({type(e).__name__}: {first[:200]})") from None


def attack_keys(before: dict, after: dict[str, dict]) -> dict:
    """metrics.json's keys for the attacked models' metrics `after` ({attack: metrics}):
    `<metric>@<attack>`, its interval `<metric>@<attack>_ci`, and `<metric>@<attack>_recovery`
    (after - before, where `before` has the metric)."""
    keys: dict = {}
    for attack, metrics in after.items():
        for key, value in metrics.items():
            if key.endswith(CI):
                keys[f"{key.removesuffix(CI)}@{attack}{CI}"] = value
                continue
            keys[f"{key}@{attack}"] = value
            if key in before:
                keys[f"{key}@{attack}{RECOVERY}"] = value - before[key]
    return keys


def split_metrics(metrics: dict) -> tuple[dict, dict[str, dict]]:
    """metrics.json's keys back into (plain metrics, {attack: {metric: (after, recovery)}})."""
    plain, attacked = {}, {}
    for key, value in metrics.items():
        if "@" not in key:
            plain[key] = value
            continue
        name, attack = key.split("@", 1)
        if attack in ATTACKS:
            attacked.setdefault(attack, {})[name] = (value, metrics.get(f"{key}{RECOVERY}"))
    return plain, attacked


# --- relearning ------------------------------------------------------------------------------------
@dataclass
class RelearnSplit:
    """What the relearning attack trains on, what every criterion is then measured on, and the
    record of both (OUT/relearn/slice.json)."""

    train: MuseData  # the slice's documents (MUSE) or QA pairs (TOFU), or the related set
    evaluate: MuseData | TofuData  # the data less the slice
    with_qa: bool  # the training blocks are QA pairs (TOFU)
    record: dict


def _slice_ids(n: int, cfg: RelearnConfig, what: str) -> list[int]:
    if n < 2:
        raise UserInputError(f"relearn: the forget set has {n} {what}; the attack needs two or more "
                             "(a slice to relearn, the rest to evaluate)")
    size = min(n - 1, max(1, round(cfg.fraction * n)))
    return sorted(random.Random(cfg.seed).sample(range(n), size))


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def _muse_split(data: MuseData, cfg: RelearnConfig) -> RelearnSplit:
    ids = _slice_ids(len(data.forget_docs), cfg, "documents")
    sliced = [_normalised(data.forget_docs[i]) for i in ids]

    def from_slice(text: str) -> bool:
        t = _normalised(text)
        return bool(t) and any(t in doc or doc in t for doc in sliced)

    lists = {"verbmem": (data.verbmem, lambda it: from_slice(it.prompt)),
             "knowmem_f": (data.forget_qa, lambda qa: from_slice(qa.answer)),
             "mia_forget": (data.privleak_forget, from_slice)}
    kept = {name: [i for i, item in enumerate(items) if not test(item)] for name, (items, test) in lists.items()}
    for name in ("verbmem", "knowmem_f"):
        if not kept[name]:
            raise UserInputError(f"relearn: every {name} item comes from the relearned slice "
                                 f"({len(ids)} of {len(data.forget_docs)} documents); lower relearn.fraction")
    rest = [i for i in range(len(data.forget_docs)) if i not in set(ids)]
    evaluate = replace(data, forget_docs=[data.forget_docs[i] for i in rest],
                       verbmem=[data.verbmem[i] for i in kept["verbmem"]],
                       forget_qa=[data.forget_qa[i] for i in kept["knowmem_f"]],
                       privleak_forget=[data.privleak_forget[i] for i in kept["mia_forget"]])
    train = replace(qa_pairs_as_muse(data.root, [], []), forget_docs=[data.forget_docs[i] for i in ids])
    record = {"relearned": {"forget_docs": ids},
              "evaluated": {"forget_docs": rest, **kept},
              "left_out": {name: [i for i in range(len(items)) if i not in set(kept[name])]
                           for name, (items, _) in lists.items()}}
    return RelearnSplit(train, evaluate, False, record)


def _tofu_split(data: TofuData, cfg: RelearnConfig) -> RelearnSplit:
    ids = _slice_ids(len(data.forget), cfg, "QA pairs")
    rest = [i for i in range(len(data.forget)) if i not in set(ids)]
    train = qa_pairs_as_muse(data.source, [data.forget[i] for i in ids], [])
    record = {"relearned": {"forget": ids}, "evaluated": {"forget": rest}}
    return RelearnSplit(train, replace(data, forget=[data.forget[i] for i in rest]), True, record)


def split_relearn(data: MuseData | TofuData, cfg: RelearnConfig) -> RelearnSplit:
    """The relearning attack's training set and the data its criteria are measured on: a seeded
    `cfg.fraction` of the forget documents (TOFU: QA pairs) and the data without them, or, with
    `cfg.data`, that related set and all the data."""
    if cfg.data is not None:
        docs = read_documents(cfg.data)
        if not docs:
            raise UserInputError(f"relearn.data {cfg.data}: no documents")
        train = replace(qa_pairs_as_muse(cfg.data, [], []), forget_docs=docs)
        return RelearnSplit(train, data, False, {"relearned": {"data": str(cfg.data), "documents": len(docs)}})
    return _tofu_split(data, cfg) if isinstance(data, TofuData) else _muse_split(data, cfg)


def relearn_uses_gpu(cfg: RelearnConfig) -> bool:
    """`relearn.use_gpu`, with "auto" settled: GPU workers where the Ray cluster has GPUs."""
    if cfg.use_gpu != "auto":
        return cfg.use_gpu
    from dipo_scale.eval.workers import cluster_gpus

    return cluster_gpus() >= 1


def relearn_config(cfg: RelearnConfig, model_path: str, out_dir: Path) -> UnlearnConfig:
    """The unlearning config of the relearning run: method=relearn (no retain term, no reference)
    on OUT/relearn/prepared, into OUT/relearn/run, on GPUs or CPUs as `relearn_uses_gpu` says."""
    return UnlearnConfig.model_validate({
        "method": "relearn", "out_dir": str(out_dir / "run"),
        "model": {"path": str(model_path)},
        "data": {"prepared_dir": str(out_dir / "prepared"), "block_size": cfg.block_size},
        "loss": {"retain": "none"},
        "train": {"num_workers": cfg.num_workers, "use_gpu": relearn_uses_gpu(cfg), "ds_config": cfg.ds_config,
                  "steps": cfg.steps, "lr": cfg.lr, "global_batch_size": cfg.global_batch_size,
                  "micro_batch_size": cfg.micro_batch_size, "seed": cfg.seed},
        "logging": {"wandb": "disabled"},
    })


def check_attacks(attacks: list[str], relearn: RelearnConfig, *, device: str, gpus_per_worker) -> None:
    """Before any model loads: each quantization runs where the models will load (in this process,
    or, with GPUs per worker (`eval.workers.find_placement`), in a Ray task with the actors' GPUs),
    and the relearning run's settings are valid (`check_relearn`)."""
    from dipo_scale.eval.workers import find_placement, on_gpus

    quantizations = [a for a in attacks if a in QUANTIZE_BITS]
    place = find_placement(device, 1, gpus_per_worker) if quantizations else None
    for attack in quantizations:
        if place.gpus_per_worker > 0:
            on_gpus(check_quantization, attack, "cuda", gpus=place.gpus_per_worker)
        else:
            check_quantization(attack, "cpu" if place.on_cpu else "cuda")
    if "relearn" in attacks:
        check_relearn(relearn)


def check_relearn(cfg: RelearnConfig) -> None:
    """What the relearning run needs, checked before any model loads: a GPU per worker on GPUs,
    its engine config, the related set (when named)."""
    from dipo_scale.eval.workers import cluster_gpus
    from dipo_scale.unlearn import load_ds_config

    from dipo_scale.preflight import check_resources

    ucfg = relearn_config(cfg, "", Path("."))
    if ucfg.train.use_gpu and (gpus := cluster_gpus()) < cfg.num_workers:
        raise UserInputError(f"relearn.num_workers={cfg.num_workers}: the relearning run on GPUs (relearn.use_gpu="
                             f"{str(cfg.use_gpu).lower()}) needs {cfg.num_workers} GPUs but the Ray cluster has "
                             f"{gpus:g}; set relearn.num_workers={int(gpus)}" if gpus >= 1 else
                             "relearn.use_gpu=true: the Ray cluster has no GPU (set relearn.use_gpu=auto or false)")
    try:
        load_ds_config(ucfg, cfg.num_workers)
    except UserInputError as e:
        message = _as_relearn_keys(str(e))
        raise UserInputError(message if message.startswith("relearn.") else f"relearn: {message}") from None
    check_resources(cfg.num_workers, use_gpu=ucfg.train.use_gpu, flag="relearn.num_workers")
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise UserInputError(f"relearn.data {cfg.data}: no such file (a .txt/.jsonl/.json/.parquet of documents)")


_TRAIN_KEY = re.compile(r"(?<![\w./-])train\.(num_workers|global_batch_size|micro_batch_size|ds_config|steps|lr|seed|"
                        r"use_gpu)\b")


def _as_relearn_keys(message: str) -> str:
    """An unlearning check's line with the relearning run's keys named as the user sets them
    (train.global_batch_size -> relearn.global_batch_size)."""
    return _TRAIN_KEY.sub(r"relearn.\1", message)


SOURCE = "source.json"  # OUT/relearn/source.json: what the relearning run was made from


def relearn_source(model_path: str, split: RelearnSplit, cfg: RelearnConfig) -> dict:
    """What a relearning run is made from: the model's weights (`files.sampled_fingerprint`), the
    documents / QA pairs it trains on, and its settings but the worker count."""
    from dipo_scale.files import sampled_fingerprint
    from dipo_scale.preflight import resolve_model_dir

    train = dataclasses.asdict(split.train)
    return {"model": sampled_fingerprint(resolve_model_dir(str(model_path), "--model")),
            "data": json_digest({"with_qa": split.with_qa, **{k: train[k] for k in
                                                          ("forget_docs", "retain_docs", "forget_qa", "retain_qa")}}),
            "settings": cfg.model_dump(exclude={"num_workers"})}


def _relearn_started(out_dir: Path) -> bool:
    """Whether OUT/relearn holds a relearning run that made progress (a log line, or its model)."""
    log = out_dir / "run" / "log.jsonl"
    return (out_dir / "run" / "model").is_dir() or (log.is_file() and log.stat().st_size > 0)


def _earlier_source(out_dir: Path) -> dict | None:
    """The record of the relearning run in OUT/relearn (None: none that made progress). A run
    made before source.json existed: its run's config.json gives the model's fingerprint."""
    if not _relearn_started(out_dir):
        return None
    for path, read in ((out_dir / SOURCE, lambda obj: obj),
                       (out_dir / "run" / "config.json", lambda obj: {"model": obj["inputs"]["model"]})):
        try:
            return read(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _refuse_other_source(earlier: dict, now: dict, *, out: str, model: str, data: str | None) -> None:
    """A one-line error when the earlier relearning run in `out` was made from other inputs."""
    head = f"--out {out}: its earlier relearning attack (relearn/) "
    tail = "; its relearned model would not be this model's: choose another --out (or restore what changed)"
    if "model" in earlier and earlier["model"] != now["model"]:
        raise UserInputError(f"{head}relearned other weights: the model at --model {model} changed since the "
                             f"earlier attack (fingerprint {earlier['model']} then, {now['model']} now){tail}")
    if "settings" in now and "settings" in earlier and earlier["settings"] != now["settings"]:
        diff = ", ".join(f"relearn.{k}: {earlier['settings'].get(k)} then, {v} now"
                         for k, v in now["settings"].items() if earlier["settings"].get(k) != v)
        raise UserInputError(f"{head}ran with other settings ({diff}); rerun with those, or choose another --out")
    if "data" in now and "data" in earlier and earlier["data"] != now["data"]:
        raise UserInputError(f"{head}trained on other data: the relearned documents of "
                             f"{'relearn.data' if data is None else '--data ' + data} changed since the earlier "
                             f"attack (fingerprint {earlier['data']} then, {now['data']} now){tail}")


def check_relearn_reuse(model: str, data: str, out: str | Path, cfg: RelearnConfig, *, forget: str = "forget10",
                        retain: str | None = None) -> None:
    """Before any evaluation, preparation or Ray start (the command line calls it first): when OUT
    holds an earlier relearning run that made progress, the model's weights, the relearn settings
    and the documents it would train on are those it was made from (OUT/relearn/source.json);
    else a one-line error naming --out and what changed. Also the relearning blocks fit the model's
    positions. Nothing is written."""
    from dipo_scale.files import check_output_dir
    from dipo_scale.preflight import check_model, max_positions

    model_config = check_model(model, "--model", tokenizer=False)
    limit = max_positions(model_config)
    if limit is not None and cfg.block_size > limit:
        raise UserInputError(f"relearn.block_size={cfg.block_size}: exceeds the {limit} positions of --model {model}; "
                             f"set relearn.block_size={limit} or less")
    out_dir = check_output_dir(out, "evaluate", inputs=[("--data", data), ("--model", model)]) / "relearn"
    earlier = _earlier_source(out_dir)
    if earlier is None:
        return
    from dipo_scale.files import sampled_fingerprint

    now = {"model": sampled_fingerprint(model_config["_dir"]), "settings": cfg.model_dump(exclude={"num_workers"})}
    _refuse_other_source(earlier, now, out=str(out), model=model, data=data if cfg.data is None else None)
    if "data" not in earlier:
        return
    from dipo_scale.eval.run import detect_layout

    if detect_layout(data) == "muse":
        from dipo_scale.data.muse import load_muse

        dataset = load_muse(data, need_raw=cfg.data is None)
    else:
        from dipo_scale.data.tofu import load_tofu

        dataset = load_tofu(data, forget=forget, retain=retain)
    now = relearn_source(model, split_relearn(dataset, cfg), cfg)
    _refuse_other_source(earlier, now, out=str(out), model=model, data=data if cfg.data is None else None)


def check_relearn_split(model_path: str, split: RelearnSplit, cfg: RelearnConfig, out_dir: Path) -> dict:
    """`check_relearn_reuse` for a caller that has the split already (`relearn_model`; OUT/relearn
    as `out_dir`): a one-line error when OUT/relearn holds a relearning run made from other inputs.
    Returns this run's record (`relearn_source`)."""
    source = relearn_source(model_path, split, cfg)
    earlier = _earlier_source(Path(out_dir))
    if earlier is not None:
        data = split.evaluate.root if isinstance(split.evaluate, MuseData) else split.evaluate.source
        _refuse_other_source(earlier, source, out=str(Path(out_dir).parent), model=model_path,
                             data=str(data) if cfg.data is None else None)
    return source


def relearn_model(model_path: str, split: RelearnSplit, cfg: RelearnConfig, out_dir: Path) -> Path:
    """Fine-tune the model at `model_path` on `split.train` (packed into OUT/relearn/prepared with
    the model's tokenizer) for `cfg.steps` steps under Ray Train + ZeRO-3; returns the relearned
    model's directory. A rerun with the same settings resumes (or reuses) the run."""
    from transformers import AutoTokenizer

    from dipo_scale.files import atomic_write_json
    from dipo_scale.prepare import prepare
    from dipo_scale.unlearn import run_unlearning

    source = check_relearn_split(model_path, split, cfg, out_dir)  # (the command line checked it before any work)
    ucfg = relearn_config(cfg, model_path, out_dir)
    print(f"relearn: {cfg.num_workers} Ray Train workers on {'GPUs' if ucfg.train.use_gpu else 'CPUs'} "
          f"(relearn.use_gpu={str(cfg.use_gpu).lower()}), {ucfg.ds_config_name}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / SOURCE, source)
    atomic_write_json(out_dir / "slice.json", split.record)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prepare(split.train, tokenizer, out_dir / "prepared", block_size=cfg.block_size, with_qa=split.with_qa,
            layout="per_sequence")
    return run_unlearning(ucfg)
