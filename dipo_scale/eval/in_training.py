"""Evaluation during unlearning: metrics to `<out_dir>/eval.jsonl` (and wandb) every
`eval.every` steps, computed by the training workers on their sharded model (`Evaluator`), and
checkpoint selection (`eval.select`) exporting the model a rule picks to
`<out_dir>/selected_model`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dipo_scale.collectives import broadcast_object, gather_objects
from dipo_scale.config import UnlearnConfig
from dipo_scale.files import atomic_write_json, reopen_step_log


def select_evaluation(rule: str, history: list[dict], *, retrain_knowmem_f: float | None = None,
                      forget_target: float | None = None) -> dict | None:
    """The evaluation record a checkpoint-selection rule picks from `history` (None: none yet).

    `muse`: MUSE's rule, the first evaluation whose knowmem_f is at most the retrain model's.
    `knowmem_r`: the best knowmem_r among evaluations whose knowmem_f reaches `forget_target`.
    """
    if rule == "muse":
        return next((h for h in history if h["knowmem_f"] <= retrain_knowmem_f), None)
    if rule == "knowmem_r":
        ok = [h for h in history if h["knowmem_f"] <= forget_target]
        return max(ok, key=lambda h: (h["knowmem_r"], -h["step"])) if ok else None
    return None


class Evaluator:
    """Evaluation during unlearning, inside the (ZeRO-3) engines, data-parallel.

    Every rank scores its share of the items (`MuseItems.share`) on the sharded model itself: a
    forward gathers each layer's parameters from all ranks as it runs, so every rank runs the same
    number of forwards (`MuseItems.batches`; shorter shares add dummy batches) and generation keeps
    the ranks in step until all are done (HF `synced_gpus`). Rank 0 gathers the per-item results
    and computes the metrics: one line per evaluation in `<out_dir>/eval.jsonl` (with its wall
    `seconds`), the per-item results (generations, ROUGE, Min-K% scores) in
    `<out_dir>/eval_items/step<N>.json`, and wandb.
    When the selection rule picks this evaluation, the engine's weights, the ones just evaluated,
    are exported to `<out_dir>/selected_model` (a collective) and the export's weights fingerprint
    is recorded in the evaluation's line and in the export's `dipo_scale.json`.
    """

    def __init__(self, cfg: UnlearnConfig, run_dir: Path, finished_steps: int, *, rank: int = 0, world: int = 1):
        from transformers import AutoTokenizer

        from dipo_scale.data.muse import load_muse_dir
        from dipo_scale.eval.muse import muse_items, without_blank_references

        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        e = cfg.eval
        # items without a reference are left out, as `evaluate` leaves them out (ROUGE against nothing is 0)
        self.items = muse_items(without_blank_references(load_muse_dir(e.data_dir))[0], limit=e.limit, mia=True)
        self.share = self.items.share(rank, world)
        self.batches = self.items.batches(world, e.batch_size)  # the same on every rank
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        self.history, self.file = (reopen_step_log(run_dir / "eval.jsonl", finished_steps) if rank == 0
                                   else ([], None))

    def run(self, step: int, model, export, wandb_run=None) -> dict:
        """Evaluate `model` (the engine's HF module; every rank calls this) after `step` steps.
        `export(path, metadata)` writes the engine's weights as an HF model to `path` (a
        collective) and returns its weights fingerprint on rank 0. Returns the evaluation's record
        on rank 0, {} elsewhere."""
        from contextlib import nullcontext

        from dipo_scale.eval.generation import where
        from dipo_scale.eval.muse import merge_item_scores, muse_metrics, score_muse_items

        started = time.perf_counter()
        e = self.cfg.eval
        settings = {k: v for k, v in e.muse_settings().items() if k != "limit"}
        place = where(f"rank {self.rank} of {self.world}") if self.world > 1 else nullcontext()
        with place:
            scores = score_muse_items(model, self.tokenizer, self.share, batches=self.batches,
                                      synced=self.world > 1, **settings)
        parts = gather_objects(scores, self.world)
        record, chosen = {}, False
        if self.rank == 0:
            merged = merge_item_scores(parts)
            record = {"step": step, **muse_metrics(merged)}
            chosen = select_evaluation(e.select, self.history + [record], retrain_knowmem_f=e.retrain_knowmem_f,
                                       forget_target=e.forget_target) is record
            atomic_write_json(self.run_dir / "eval_items" / f"step{step:07d}.json", {"step": step, **merged})
        if broadcast_object(chosen, self.world):
            metrics = {k: v for k, v in record.items() if k != "step"}
            fingerprint = export(self.run_dir / "selected_model", {
                "method": self.cfg.run_name, "source_model": self.cfg.model.path, "step": step,
                "selection_rule": e.select, "metrics": metrics})
            if self.rank == 0:
                record.update(selected_model=str(self.run_dir / "selected_model"), weights_fingerprint=fingerprint)
        if self.rank == 0:
            record["seconds"] = round(time.perf_counter() - started, 3)  # this evaluation's wall time
            self.history.append(record)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if wandb_run is not None:
                wandb_run.log({f"eval/{k}": v for k, v in record.items() if isinstance(v, (int, float))
                               and k != "step"}, step=step)
        return record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
