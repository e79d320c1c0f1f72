"""Evaluation during unlearning: metrics to `<out_dir>/eval.jsonl` (and wandb) every
`eval.every` steps, and checkpoint selection (`eval.select`) exporting the model a rule picks to
`<out_dir>/selected_model`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dipo_scale.config import UnlearnConfig
from dipo_scale.files import atomic_dir, atomic_write_json


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


def _open_history(path: Path, finished_steps: int) -> tuple[list[dict], object]:
    """The evaluation records of the steps the restored checkpoint contains, and the log opened for
    appending (cut back to those records: redone steps are evaluated and logged again)."""
    kept = []
    if finished_steps and path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("step", 0) <= finished_steps:
                kept.append(record)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept, open(path, "a")


class Evaluator:
    """Rank 0's evaluation during unlearning: metrics to eval.jsonl (and wandb), and the model a
    selection rule picks exported to <out_dir>/selected_model."""

    def __init__(self, cfg: UnlearnConfig, run_dir: Path, finished_steps: int):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from dipo_scale.data.muse import load_muse_dir

        self.cfg, self.run_dir = cfg, run_dir
        self.data = load_muse_dir(cfg.eval.data_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        model_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        self.model = AutoModelForCausalLM.from_config(model_config).eval()
        self.history, self.file = _open_history(run_dir / "eval.jsonl", finished_steps)

    def run(self, step: int, state_dict: dict, wandb_run) -> None:
        from dipo_scale.eval.muse import evaluate_muse

        e = self.cfg.eval
        self.model.load_state_dict(state_dict, strict=False)
        metrics = evaluate_muse(self.model, self.tokenizer, self.data, **e.muse_settings())
        record = {"step": step, **metrics}
        self.history.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if wandb_run is not None:
            wandb_run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        chosen = select_evaluation(e.select, self.history, retrain_knowmem_f=e.retrain_knowmem_f,
                                   forget_target=e.forget_target)
        if chosen is record:
            with atomic_dir(self.run_dir / "selected_model", "unlearn") as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                atomic_write_json(tmp / "dipo_scale.json", {
                    "method": self.cfg.run_name, "source_model": self.cfg.model.path, "step": step,
                    "selection_rule": e.select, "metrics": metrics})

    def close(self) -> None:
        self.file.close()
