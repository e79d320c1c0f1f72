"""`dipo-scale evaluate`: one model on a MUSE or TOFU layout, its metrics to OUT/metrics.json
and OUT/report.md (+ plots)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from dipo_scale.config import RelearnConfig
from dipo_scale.errors import UserInputError
from dipo_scale.eval.attacks import (ATTACKS, QUANTIZE_BITS, attack_keys, check_attacks, check_relearn_split,
                                     relearn_model, split_metrics, split_relearn)
from dipo_scale.eval.muse import mia_pair, muse_metrics
from dipo_scale.eval.privacy import CI, add_privleak, auc_from_scores
from dipo_scale.eval.tofu import evaluate_tofu, tofu_forget_truth_ratios, tofu_mia_scores, truth_ratio_score
from dipo_scale.eval.workers import GpusPerWorker, check_cpu_size, find_placement, muse_item_scores, on_model


METRIC_ORDER = ("verbmem_f", "knowmem_f", "knowmem_r", "mia_auc", "privleak", "forget_quality",
                "model_utility", "forget_truth_ratio", "forget_prob")
VERBMEM_MAX_NEW_TOKENS, KNOWMEM_MAX_NEW_TOKENS, TOFU_MAX_NEW_TOKENS = 128, 32, 128


def detect_layout(source: str | Path) -> str:
    """The layout of `source`, "muse" or "tofu": from the directory's files, or a hub name."""
    from dipo_scale.data.muse import is_hub_name
    from dipo_scale.data.tofu import is_tofu_dir

    path = Path(source)
    if path.is_dir():
        if any((path / sub).is_dir() for sub in ("raw", "knowmem", "verbmem")):
            return "muse"
        if is_tofu_dir(path):
            return "tofu"
        raise UserInputError(f"{path}: unknown data layout (MUSE: raw/, knowmem/, verbmem/; "
                             "TOFU: files named like the locuslab/TOFU configs, e.g. forget10_perturbed.json)")
    if path.exists():
        raise UserInputError(f"{path}: not a directory")
    if is_hub_name(str(source)):
        name = str(source).lower()
        if "tofu" in name:
            return "tofu"
        if "muse" in name:
            return "muse"
        raise UserInputError(f"{source}: unknown data layout (hub datasets: locuslab/TOFU, muse-bench/MUSE-News, "
                             "muse-bench/MUSE-Books)")
    raise UserInputError(f"{source}: data directory does not exist")


def read_truth_ratios(path: str | Path) -> list[float]:
    """Stored forget-set truth ratios: a JSON list of numbers, this command's truth_ratios.json
    ({"forget_truth_ratios": [...]}), or TOFU's eval_log_forget.json ({"truth_ratio": {i: r}})."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path}: malformed JSON ({' '.join(str(e).split())})") from None
    if isinstance(obj, dict):
        for key in ("forget_truth_ratios", "truth_ratio", "truth_ratios"):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise UserInputError(f"{path} is missing key 'forget_truth_ratios' (or give a JSON list of numbers)")
        if isinstance(obj, dict):
            obj = list(obj.values())
    if not isinstance(obj, list) or not obj:
        raise UserInputError(f"{path}: truth ratios must be a non-empty JSON list of numbers")
    for i, value in enumerate(obj):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise UserInputError(f"{path}: entry {i} is not a positive number ({value!r})")
    return [float(v) for v in obj]


def _retain_model_stats(model, tokenizer, data, *, batch_size: int, limit: int | None):
    """A TOFU retain model's forget-set truth ratios and its Min-K% scores (forget, holdout; None
    without holdout)."""
    return (tofu_forget_truth_ratios(model, tokenizer, data, batch_size=batch_size, limit=limit),
            tofu_mia_scores(model, tokenizer, data, batch_size=batch_size, limit=limit))


MUSE_FILES = {"verbmem": ("verbmem/forget", "gt"), "forget_qa": ("knowmem/forget_qa", "answer"),
              "retain_qa": ("knowmem/retain_qa|knowmem/retain2_qa", "answer"),
              "privleak_forget": ("privleak/forget", "text"), "privleak_holdout": ("privleak/holdout", "text")}
TOFU_METRICS = {"forget": "knowmem_f, forget_truth_ratio, forget_quality", "retain": "knowmem_r, model_utility",
                "real_authors": "model_utility", "world_facts": "model_utility", "holdout": "mia_auc"}


def _muse_file(data: str, name: str) -> str:
    """Where MuseData's list `name` comes from: the file in a local directory, `hub[config/split]`."""
    stems = MUSE_FILES[name][0].split("|")
    root = Path(data)
    if root.is_dir():
        found = [root / f"{stem}{ext}" for stem in stems for ext in (".json", ".jsonl")
                 if (root / f"{stem}{ext}").is_file()]
        return str(found[0] if found else root / f"{stems[0]}.json")
    return f"{data}[{stems[0]}]"


def usable_items(dataset, layout: str, data: str) -> tuple[object, dict[str, int], list[int] | None, list[str]]:
    """`dataset` less the items without a usable reference (an empty or whitespace VerbMem `gt` or
    QA answer: ROUGE against nothing is 0, which reads as perfect forgetting; TOFU: also an empty
    paraphrased or perturbed answer, which has no token to score), checked on the driver before any
    model loads. A list with items but none usable is a one-line error naming its file and metric.
    Returns (the data, {metric (MUSE) or split (TOFU): items left out}, the indices of the TOFU
    forget items kept (None: all), the note lines saying what was left out (also printed))."""
    from dipo_scale.data.muse import note

    if layout == "muse":
        from dipo_scale.eval.muse import without_blank_references

        dataset, dropped = without_blank_references(dataset)
        kept_forget = None
        where = {name: (_muse_file(data, name), MUSE_FILES[name][1]) for _, name, _, _ in dropped}
    else:
        from dipo_scale.eval.tofu import without_blank_references

        dataset, dropped, kept_forget = without_blank_references(dataset)
        where = {name: (f"{data} ({key} split)", "answer, paraphrased or perturbed answer")
                 for key, name, _, _ in dropped}
    field_of = {name: (where[name][1] if layout == "muse" else "answers") for _, name, _, _ in dropped}
    for key, name, left_out, total in dropped:
        if left_out == total:
            metric = key if layout == "muse" else TOFU_METRICS[name]
            file, field = where[name]
            raise UserInputError(f"{file}: all {total} items have an empty {field}: no {metric} can be computed "
                                 "without references (ROUGE against nothing reads as perfect forgetting)")
    skipped: dict[str, int] = {}
    for key, _, left_out, _ in dropped:
        skipped[key] = skipped.get(key, 0) + left_out
    notes = []
    if dropped:
        parts = ", ".join(f"{left_out} of {total} in {where[name][0]} ({field_of[name]}; {key})"
                          for key, name, left_out, total in dropped)
        notes.append(f"items with an empty reference (empty or whitespace) are left out, counted in metrics.json "
                     f"skipped_items: {parts}")
        note(notes[0])
    return dataset, skipped, (kept_forget if dropped and layout == "tofu" else None), notes


def check_finite(metrics: dict, what: str) -> None:
    """A metric that is not a finite number (NaN from non-finite log-probs, e.g. broken weights) is
    a one-line error naming it and the model (`what`): it is never written."""
    for key, value in metrics.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise UserInputError(f"{what}: {key} is {value} (not a finite number: its log-probs are not finite, "
                                 "are its weights broken?); no metrics are written")


def _json_text(path: Path, obj) -> str:
    """`obj` as the JSON text of `path`, refusing NaN and infinities (never written silently)."""
    try:
        return json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise UserInputError(f"{path}: a value is not a finite number (NaN or infinity); nothing is written") from None


WRITTEN = ("metrics.json", "report.md", "items.json", "truth_ratios.json")  # and the plots, *.png


def _check_earlier_output(out: Path, relearn: bool, given: str | Path) -> None:
    """An earlier output the evaluation replaces files in: every file in it can be replaced (not
    immutable or append-only), and the relearning run's folders (with `relearn`) can be written in;
    found before the evaluation (`check_output_dir` tried the directory itself), not after it.
    `given`: --out as the user gave it, for the message."""
    import fcntl
    import tempfile

    if not out.is_dir():
        return
    for path in sorted(out.iterdir()):
        if (path.name in WRITTEN or path.suffix == ".png") and path.is_file() and not path.is_symlink():
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    flags = fcntl.ioctl(fd, 0x80086601, b"\0" * 8)  # FS_IOC_GETFLAGS
                finally:
                    os.close(fd)
            except OSError:
                continue  # no such flags on this file system
            if int.from_bytes(flags[:4], "little") & 0x30:  # FS_IMMUTABLE_FL | FS_APPEND_FL
                raise UserInputError(f"--out {given}: cannot replace {path.name} in it (immutable or append-only: "
                                     "chattr -i / -a it, or choose another --out)")
    folders = [out / "relearn", *(p for p in (out / "relearn").glob("*") if p.is_dir())] if relearn else []
    for folder in folders:
        if folder.is_dir():
            try:
                os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".dipo-scale-probe."))
            except OSError as e:
                raise UserInputError(f"--out {given}: cannot write in {folder} ({e.strerror or e}; choose another "
                                     "--out)") from None


def _ordered(metrics: dict) -> dict:
    """METRIC_ORDER first, each followed by its interval (`<name>_ci`), then the rest."""
    head = [key for k in METRIC_ORDER for key in (k, f"{k}{CI}") if key in metrics]
    return {k: ([float(x) for x in metrics[k]] if k.endswith(CI) else float(metrics[k]))
            for k in head + [k for k in metrics if k not in head]}


def _model_name(path: str) -> str:
    return Path(path).name or str(path)


def run_evaluation(
    model: str,
    data: str,
    out: str | Path,
    *,
    retrain_model: str | None = None,
    retrain_auc: float | None = None,
    retain_model: str | None = None,
    retain_truth_ratios: str | None = None,
    forget: str = "forget10",
    retain: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_workers: int = 1,
    max_new_tokens: int | None = None,
    device: str = "auto",
    gpus_per_worker: GpusPerWorker = "auto",
    attacks: Sequence[str] = (),
    relearn: RelearnConfig | None = None,
) -> dict[str, float]:
    """What `dipo-scale evaluate` (and `dipo-scale attack`) does: evaluate `model` on the MUSE or
    TOFU data `data`, write OUT/metrics.json, OUT/report.md (+ plots) and, for MUSE, OUT/items.json
    (the per-item results: generations, their ROUGE scores, the Min-K% scores of the attack texts)
    or, for TOFU, OUT/truth_ratios.json (the forget-set truth ratios, reusable as another run's
    --retain-truth-ratios). Returns the metrics.

    `attacks` (`dipo_scale.eval.attacks.ATTACKS`): rerun every criterion on the model after each
    attack, into `<metric>@<attack>` and `<metric>@<attack>_recovery`; the relearning run (settings
    `relearn`) goes to OUT/relearn/, and with it every criterion is measured on the forget set less
    the relearned slice (OUT/relearn/slice.json says which items).

    Where it runs (`dipo_scale.eval.workers.plan_placement`): `gpus_per_worker` "auto" is one GPU
    per Ray actor where the Ray cluster has GPUs, else none; `device` "auto" is CUDA with bfloat16
    where a GPU is visible (to the actor), else the CPU with float32 ("cpu", "cuda" force one). With
    one worker and no GPUs, in this process; else MUSE over `num_workers` Ray actors with
    `gpus_per_worker` GPUs each, and TOFU in one actor with `gpus_per_worker` GPUs. A model above
    1B parameters is not evaluated on CPUs unless `device` is "cpu". Each model's lines on the
    console say where it runs and where it was loaded.

    Every input is checked before a model is loaded; nothing is written unless all succeeds (but
    the relearning run, which is resumable).
    """
    from dipo_scale.files import atomic_write_text, check_output_dir, mark_output_dir
    from dipo_scale.preflight import check_model
    from dipo_scale.report import write_report

    if retrain_model is not None and retrain_auc is not None:
        raise UserInputError("give --retrain-model or --retrain-auc, not both")
    if retrain_auc is not None and not 0.0 < retrain_auc <= 1.0:
        raise UserInputError(f"--retrain-auc {retrain_auc}: must be in (0, 1]")
    if retain_model is not None and retain_truth_ratios is not None:
        raise UserInputError("give --retain-model or --retain-truth-ratios, not both")
    for flag, value in (("--limit", limit), ("--batch-size", batch_size), ("--num-workers", num_workers),
                        ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} {value}: must be >= 1")
    attacks = list(attacks)
    if unknown := [a for a in attacks if a not in ATTACKS]:
        raise UserInputError(f"attack {unknown[0]!r}: choose from {', '.join(ATTACKS)}")
    relearn = relearn or RelearnConfig()
    layout = detect_layout(data)
    placement = find_placement(device, num_workers if layout == "muse" else 1, gpus_per_worker)
    place = dict(device=device, gpus_per_worker=placement.gpus_per_worker)  # "auto" settled once
    if layout == "muse" and (retain_model is not None or retain_truth_ratios is not None):
        raise UserInputError("--retain-model / --retain-truth-ratios are for TOFU data (MUSE: --retrain-model)")
    models = [(path, flag) for path, flag in ((model, "--model"), (retrain_model, "--retrain-model"),
                                              (retain_model, "--retain-model")) if path is not None]
    given_out = out
    out = check_output_dir(out, "evaluate", inputs=[("--data", data), *((f, p) for p, f in models)])
    for path, flag in models:  # complete, loadable models, of a size their device can run, before any is loaded
        check_model(path, flag)
        check_cpu_size(path, placement, flag=flag)
    _check_earlier_output(out, "relearn" in attacks, given_out)
    check_attacks(attacks, relearn, **place)

    def cap(default: int) -> int:
        return default if max_new_tokens is None else min(default, max_new_tokens)

    notes: list[str] = []
    if layout == "muse":
        from dipo_scale.data.muse import load_muse

        dataset = load_muse(data, need_raw="relearn" in attacks and relearn.data is None)
        reference_ratios = None
    else:
        from dipo_scale.data.tofu import load_tofu

        dataset = load_tofu(data, forget=forget, retain=retain)
        notes += dataset.notes
        reference_ratios = read_truth_ratios(retain_truth_ratios) if retain_truth_ratios else None
    forget_count = len(dataset.forget) if layout == "tofu" else 0
    dataset, skipped, kept_forget, skip_notes = usable_items(dataset, layout, data)
    notes += skip_notes
    if reference_ratios is not None and kept_forget is not None and len(reference_ratios) == forget_count:
        reference_ratios = [reference_ratios[i] for i in kept_forget]  # the stored ratios of the items kept
    relearn_split = None
    if "relearn" in attacks:
        relearn_split = split_relearn(dataset, relearn)
        check_relearn_split(model, relearn_split, relearn, out / "relearn")  # a stale relearned model: before any work
        if relearn.data is None:
            if reference_ratios is not None:  # the stored ratios of the items still evaluated
                if len(reference_ratios) != len(dataset.forget):
                    raise UserInputError(f"--retain-truth-ratios {retain_truth_ratios}: {len(reference_ratios)} "
                                         f"ratios for {len(dataset.forget)} forget items")
                reference_ratios = [reference_ratios[i] for i in relearn_split.record["evaluated"]["forget"]]
            notes.append(f"relearn: every criterion is measured on the forget set less the relearned slice "
                         f"({relearn.fraction:g} of it; {out / 'relearn' / 'slice.json'} lists both)")
        dataset = relearn_split.evaluate

    references: dict[str, dict] = {}
    reference_auc, reference_scores = retrain_auc, None  # the retrain model's AUC and Min-K% scores
    if retrain_model is not None:
        if layout == "muse":
            reference_scores = mia_pair(muse_item_scores(retrain_model, dataset, num_workers=num_workers,
                                                         mia_only=True, batch_size=batch_size, limit=limit,
                                                         flag="--retrain-model", **place))
        else:
            reference_scores = on_model(retrain_model, tofu_mia_scores, dataset, batch_size=batch_size, limit=limit,
                                        flag="--retrain-model", **place)
        if reference_scores is not None:
            reference_auc = auc_from_scores(*reference_scores)
            check_finite({"mia_auc": reference_auc}, f"--retrain-model {retrain_model}")
            references[f"{_model_name(retrain_model)} (retrain)"] = {"mia_auc": reference_auc}
    if retain_model is not None:
        reference_ratios, retain_mia = on_model(retain_model, _retain_model_stats, dataset, batch_size=batch_size,
                                                limit=limit, flag="--retain-model", **place)
        row = {"forget_truth_ratio": truth_ratio_score(reference_ratios, forget=True)}
        if retrain_model is None and retrain_auc is None and retain_mia is not None:  # TOFU's retrained model
            row["mia_auc"] = reference_auc = auc_from_scores(*retain_mia)
            reference_scores = retain_mia
        check_finite(row, f"--retain-model {retain_model}")
        references[f"{_model_name(retain_model)} (retain)"] = row

    def evaluate(path: str, flag: str, quantize: str | None = None) -> tuple[dict, object]:
        """The metrics of one model (and its per-item results), PrivLeak against the references."""
        if layout == "muse":
            settings = dict(verbmem_max_new_tokens=cap(VERBMEM_MAX_NEW_TOKENS),
                            knowmem_max_new_tokens=cap(KNOWMEM_MAX_NEW_TOKENS), batch_size=batch_size, limit=limit)
            per_item = muse_item_scores(path, dataset, num_workers=num_workers, mia=True, quantize=quantize,
                                        flag=flag, **settings, **place)
            metrics, mia = muse_metrics(per_item), mia_pair(per_item)
            if "mia_auc" not in metrics:
                notes.append("no holdout texts (privleak/holdout.json or raw/holdout.*): no mia_auc / privleak")
        else:
            if num_workers > 1:
                notes.append("--num-workers applies to MUSE data; TOFU was evaluated by one worker")
            per_item = on_model(path, evaluate_tofu, dataset, retain_truth_ratios=reference_ratios,
                                batch_size=batch_size, limit=limit, max_new_tokens=cap(TOFU_MAX_NEW_TOKENS),
                                quantize=quantize, flag=flag, **place)
            metrics, mia = per_item.metrics, per_item.mia_scores
            notes.append("TOFU has no verbatim-memorisation prompts: no verbmem_f; knowmem_f / knowmem_r are "
                         "TOFU's ROUGE-L recall (x100) on forget / retain; utility components are on 0..1")
            if reference_ratios is None:
                notes.append("forget_quality needs --retain-model or --retain-truth-ratios")
            if "mia_auc" not in metrics:
                notes.append(f"no holdout split for {forget}: no mia_auc / privleak")
        if "mia_auc" in metrics and reference_auc is None:
            notes.append("privleak needs --retrain-model or --retrain-auc")
        notes.extend(add_privleak(metrics, reference_auc, mia, reference_scores))
        check_finite(metrics, f"{flag} {path}" + (f" in {quantize}" if quantize else ""))
        return metrics, per_item

    metrics, per_item = evaluate(model, "--model")
    after: dict[str, dict] = {}
    for attack in attacks:
        print(f"evaluate: attack {attack} on {model}", flush=True)
        if attack == "relearn":
            mark_output_dir(out, "evaluate")
            relearned = relearn_model(model, relearn_split, relearn, out / "relearn")
            after[attack] = evaluate(str(relearned), "relearned model")[0]
        else:
            after[attack] = evaluate(model, "--model", quantize=QUANTIZE_BITS[attack])[0]
    metrics = _ordered({**metrics, **attack_keys(metrics, after)})

    check_finite(metrics, f"--model {model}")
    texts = {"metrics.json": _json_text(out / "metrics.json",
                                        {**metrics, "skipped_items": skipped} if skipped else metrics)}
    if layout == "tofu":
        texts["truth_ratios.json"] = _json_text(out / "truth_ratios.json", {
            "forget": forget, "forget_truth_ratios": per_item.forget_truth_ratios})
    else:
        texts["items.json"] = _json_text(out / "items.json", per_item)
    mark_output_dir(out, "evaluate")
    for name in ("truth_ratios.json", "items.json", "metrics.json"):
        if name in texts:
            atomic_write_text(out / name, texts[name])
    plain, attacked = split_metrics(metrics)
    write_report(out, {_model_name(model): plain, **references},
                 title=f"dipo-scale evaluation: {_model_name(model)} on {data}", notes=list(dict.fromkeys(notes)),
                 attacks={_model_name(model): (plain, attacked)} if attacked else None)
    return metrics
