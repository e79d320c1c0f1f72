"""What one reference-cache shard costs, before and after a change of the precompute, in one process.

    git archive 21d98ba^ dipo_scale | tar -x -C /tmp/before      # an older checkout
    .venv/bin/python benchmarks/reference_shard_cost.py --before /tmp/before --json /tmp/shard_cost.json

The shard work of `dipo-scale reference` without Ray or a pool: one process, one torch thread,
the demo's target model (`benchmarks/reference_cache.py` builds it into `demo_out/`) and the
larger corpus of that benchmark's section 5 (`demo_out/throughput_<docs>/prepared`, built by it).
Interleaved, `--reps` times: a bare forward of the model's decoder trunk to its final hidden
states over the shard's blocks (no grad, batches of 8), one of the whole model to its logits
(what the topk form must compute too: `topk_over_logits_forward_tokens_per_cpu_second`), then
each precompute's shard function
(this checkout's `compute_shard`, the older checkout's `_compute_shard`: reading the blocks, the
forwards, the statistics, writing and hashing the shard) for the `hidden` and the `topk` form.
Figures: CPU seconds of the process per token (`time.process_time`: all its threads, so the
writer thread counts) and wall seconds, medians over the reps; `*_over_bare_tokens_per_cpu_second`
= bare CPU per token / the shard's CPU per token (1.0: the shard costs what the bare forward
does). CPU time hardly depends on what else loads the machine; the wall times do.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402


def _load_module(path: Path, name: str):
    """A module file of the older checkout under another name (its imports of `dipo_scale.*` are
    this checkout's, which the old precompute's shard function is compatible with)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="an older checkout holding dipo_scale/reference.py")
    parser.add_argument("--json", required=True)
    parser.add_argument("--demo-dir", default=str(ROOT / "demo_out"))
    parser.add_argument("--docs", type=int, default=7000, help="the section-5 corpus of reference_cache.py")
    parser.add_argument("--rows", type=int, default=256, help="blocks in the shard")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoConfig, AutoModelForCausalLM

    from dipo_scale.config import load_unlearn_config
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference.precompute import ReferenceForward, compute_shard

    old = _load_module(Path(args.before) / "dipo_scale" / "reference.py", "reference_before")
    demo = Path(args.demo_dir).resolve()
    model_dir, prepared = demo / "models" / "target", demo / f"throughput_{args.docs}" / "prepared"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    hidden_size = AutoConfig.from_pretrained(model_dir).hidden_size
    block_size = json.loads((prepared / "manifest.json").read_text())["block_size"]
    blocks = read_blocks(prepared, "forget")
    rows = min(args.rows, len(blocks["input_ids"]))
    tokens = int(blocks["attention_mask"][:rows].sum())
    work = Path(tempfile.mkdtemp(prefix="shard_cost_"))
    item = {"split": "forget", "file": "forget/part-00000.safetensors", "first_block": 0, "rows": rows, "key": "x"}

    def cfg(form: str, name: str):
        return load_unlearn_config(None, [f"model.path={model_dir}", f"data.prepared_dir={prepared}",
                                          f"reference.form={form}", f"reference.k={args.k}", "loss.retain=gd",
                                          f"reference.cache_dir={work / name}", "reference.batch_size=8"])

    def bare(module):
        with torch.no_grad():
            for s in range(0, rows, 8):
                module(input_ids=torch.as_tensor(blocks["input_ids"][s:s + 8]),
                       attention_mask=torch.as_tensor(blocks["attention_mask"][s:s + 8]), use_cache=False)

    cases = {"bare_forward": lambda: bare(model.get_decoder()), "bare_logits_forward": lambda: bare(model)}
    for form in ("hidden", "topk"):
        new_cfg, old_cfg = cfg(form, f"new_{form}"), cfg(form, f"old_{form}")
        forward = ReferenceForward(model, new_cfg)
        # the older precompute's hook on the LM head stays on; the hidden path here never calls the head
        head = old._HeadInput(model)
        cases[f"after_{form}"] = (lambda c=new_cfg, f=forward:
                                  compute_shard(f, c, item, "cpu", block_size, hidden_size, set()))
        cases[f"before_{form}"] = (lambda c=old_cfg, h=head:
                                   old._compute_shard(model, model, h, c, item, "cpu", set()))
    times: dict = {name: {"cpu": [], "wall": []} for name in cases}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, run in cases.items():
            c0, w0 = time.process_time(), time.perf_counter()
            run()
            if rep:
                times[name]["cpu"].append(time.process_time() - c0)
                times[name]["wall"].append(time.perf_counter() - w0)
    median = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    bare_cpu = median["bare_forward"]["cpu"]
    result = {
        "rows": rows, "tokens": tokens, "k": args.k, "threads": 1, "reps": args.reps,
        "cpu_seconds_per_million_tokens": {n: 1e6 * m["cpu"] / tokens for n, m in median.items()},
        "wall_seconds_per_million_tokens": {n: 1e6 * m["wall"] / tokens for n, m in median.items()},
        "over_bare_tokens_per_cpu_second": {n: bare_cpu / m["cpu"] for n, m in median.items() if n != "bare_forward"},
        # the topk form computes the LM head too: against a forward of the whole model, to its logits
        "topk_over_logits_forward_tokens_per_cpu_second": {
            n: median["bare_logits_forward"]["cpu"] / m["cpu"] for n, m in median.items() if n.endswith("_topk")},
        "all": times, "before": str(Path(args.before).resolve()),
        "load_average": os.getloadavg(), "cpus": os.cpu_count(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "all"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
