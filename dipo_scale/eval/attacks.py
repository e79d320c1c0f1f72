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
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from dipo_scale.config import RelearnConfig, UnlearnConfig
from dipo_scale.data.muse import MuseData, read_documents
from dipo_scale.data.tofu import TofuData, qa_pairs_as_muse
from dipo_scale.errors import UserInputError
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

    ucfg = relearn_config(cfg, "", Path("."))
    if ucfg.train.use_gpu and (gpus := cluster_gpus()) < cfg.num_workers:
        raise UserInputError(f"relearn.num_workers={cfg.num_workers}: the relearning run on GPUs (relearn.use_gpu="
                             f"{str(cfg.use_gpu).lower()}) needs {cfg.num_workers} GPUs but the Ray cluster has "
                             f"{gpus:g}; set relearn.num_workers={int(gpus)}" if gpus >= 1 else
                             "relearn.use_gpu=true: the Ray cluster has no GPU (set relearn.use_gpu=auto or false)")
    try:
        load_ds_config(ucfg, cfg.num_workers)
    except UserInputError as e:
        raise UserInputError(f"relearn: {e}") from None
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise UserInputError(f"relearn.data {cfg.data}: no such file (a .txt/.jsonl/.json/.parquet of documents)")


def relearn_model(model_path: str, split: RelearnSplit, cfg: RelearnConfig, out_dir: Path) -> Path:
    """Fine-tune the model at `model_path` on `split.train` (packed into OUT/relearn/prepared with
    the model's tokenizer) for `cfg.steps` steps under Ray Train + ZeRO-3; returns the relearned
    model's directory. A rerun with the same settings resumes (or reuses) the run."""
    from transformers import AutoTokenizer

    from dipo_scale.files import atomic_write_json
    from dipo_scale.prepare import prepare
    from dipo_scale.unlearn import run_unlearning

    ucfg = relearn_config(cfg, model_path, out_dir)
    print(f"relearn: {cfg.num_workers} Ray Train workers on {'GPUs' if ucfg.train.use_gpu else 'CPUs'} "
          f"(relearn.use_gpu={str(cfg.use_gpu).lower()}), {ucfg.ds_config_name}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "slice.json", split.record)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prepare(split.train, tokenizer, out_dir / "prepared", block_size=cfg.block_size, with_qa=split.with_qa,
            layout="per_sequence")
    return run_unlearning(ucfg)
