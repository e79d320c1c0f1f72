"""GPU check: DiPO (fused LM head, hidden reference cache) against plain fine-tuning on one GPU.

    benchmarks/gpu_check.sh                  # one GPU (an H200: under 8 minutes, all included)
    benchmarks/gpu_check.sh --dry-run        # CPU, sizes scaled down (tests/test_gpu_check.py)

What runs, in one process and one Ray Train run (nothing downloaded):

1. a random-init Llama-shape model of ~1.06 B parameters (vocabulary 32000, hidden 2048, 18
   layers, MLP 5632, 32 heads; `--dry-run`: 512 / 64 / 2 / 128), saved in bf16, a word-level
   tokenizer and random-text blocks of 1024 tokens through the real `prepare`
   (`benchmarks/bench_assets.py`);
2. the `hidden` reference cache of the forget blocks, written by the real precompute
   (`dipo_scale.reference.precompute_reference`, one actor on the GPU, stored in bf16: exact for
   a bf16 model);
3. one Ray Train worker on the GPU (`use_gpu`, nccl, DeepSpeed ZeRO-3 with
   `ds_configs/zero3_bf16.json`, model in bf16) builds two training engines from the same
   weights with `unlearn.init_engines` (the logits path, and `loss.fused=true`) and times
   `unlearn.micro_step` (forward over [forget; retain] rows, loss, backward, optimizer step; `gd`
   retain term) for four variants in turn, round-robin, `warmup` rounds then `reps` timed rounds
   (medians), each bracketed by `torch.cuda.synchronize()`:
   `sft` (plain fine-tuning, logits: method GA, whose loss is the negated NLL: the same forward,
   backward and step as fine-tuning on those tokens), `sft_fused`, `dipo_fused` (DiPO, hidden
   cache, fused head: the configuration this check is about) and `dipo_logits` (DiPO, hidden
   cache, logits path);
   - tokens/s = rows × block / step time (every position is a real token);
   - MFU = tokens/s × model FLOPs per token / the card's dense bf16 peak (`--peak-tflops`, H200:
     989). Model FLOPs per token = 6·N + 12·L·H·T (PaLM, appendix B: N the parameters less the
     input embedding, attention counted over the whole block), the same figure for every variant,
     so the FLOPs DiPO adds in its loss (the reference logits rebuilt from the cache) lower its MFU;
   - memory: `torch.cuda.max_memory_allocated()` during the step over the allocation just before
     it (`step_peak_gib`: activations, logits or the fused head's chunks, gradients, gathered
     parameters), and each engine's persistent allocation (parameters, fp32 master, optimizer
     state; `engine_gib`). Both engines live on the GPU, so the absolute peak
     (`absolute_peak_gib`) counts the other engine too; a single run would hold one;
4. generation: `dipo-scale evaluate --device cuda` on the same model (MUSE layout corpus from
   `dipo_scale.data.corpus.generate_corpus`; `--limit`, `--max-new-tokens`), its wall time and
   generation tokens/s = Σ items × new tokens (VerbMem 128, KnowMem 32, capped by
   `--max-new-tokens`) / Σ seconds of the `(generate)` loops, from the progress lines evaluate
   prints (whole seconds under 90 s; an upper bound if a batch stopped early at EOS, which a
   random model's greedy output rarely does);
5. the JSON (`--json`) and docs/benchmarks.md's "GPU check" section rewritten from it (`--docs`:
   between `<!-- gpu_check:begin -->` and `<!-- gpu_check:end -->`; the rest of the file is kept).

`--dry-run`: CPU (`DS_ACCELERATOR=cpu`, gloo, `zero3_cpu.json`, float32), the sizes above scaled
down, one warm-up and two timed rounds, `evaluate --device cpu`; memory is not measured (no CUDA
allocator statistics). It checks that the script runs end to end, not GPU figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_assets import build_bench_assets, num_parameters, write_doc_section  # noqa: E402

SIZES = {
    "gpu": dict(vocab=32000, hidden=2048, layers=18, intermediate=5632, block=1024, rows=4, warmup=2, reps=5,
                eval_docs=800, eval_limit=256, eval_batch=32, max_new_tokens=128),
    "dry": dict(vocab=512, hidden=64, layers=2, intermediate=128, block=64, rows=2, warmup=1, reps=2,
                eval_docs=12, eval_limit=4, eval_batch=4, max_new_tokens=8),
}
H200_BF16_TFLOPS = 989.0  # dense (no sparsity), H200 SXM
VERBMEM_NEW_TOKENS, KNOWMEM_NEW_TOKENS = 128, 32  # evaluate's defaults (dipo_scale/eval)
VARIANTS = {  # name -> overrides of the run config
    "sft": ["method=ga"],
    "sft_fused": ["method=ga", "loss.fused=true"],
    "dipo_fused": ["method=dipo", "reference.form=hidden", "loss.fused=true"],
    "dipo_logits": ["method=dipo", "reference.form=hidden"],
}
DOCS_HEADING = "## GPU check"


def check_worker(config: dict) -> None:
    """The Ray Train worker: two engines, the four variants timed round-robin (module docstring, 3)."""
    import numpy as np
    import ray.train
    import torch

    from dipo_scale.config import UnlearnConfig
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference import ReferenceCache
    from dipo_scale.unlearn import init_engines, load_ds_config, micro_step

    gpu = config["gpu"]
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    cfgs = {name: UnlearnConfig.model_validate(c) for name, c in config["cfgs"].items()}
    world = ray.train.get_context().get_world_size()
    allocated = (lambda: torch.cuda.memory_allocated()) if gpu else (lambda: 0)  # noqa: E731
    engines, engine_bytes = {}, {}
    for fused, name in ((False, "dipo_logits"), (True, "dipo_fused")):
        before = allocated()
        torch.manual_seed(0)  # both engines start from the same weights
        engine, _, _ = init_engines(cfgs[name], load_ds_config(cfgs[name], world))
        engines[fused], engine_bytes["fused" if fused else "logits"] = engine, allocated() - before
    device = engines[False].device
    cache = ReferenceCache(config["cache"])
    base = cfgs["dipo_fused"]
    rows = base.train.micro_batch_size
    forget, retain = (read_blocks(base.data.prepared_dir, s) for s in ("forget", "retain"))
    ids = np.arange(rows)
    batch = {k: torch.as_tensor(np.concatenate([forget[k][ids], retain[k][ids]])).to(device)
             for k in ("input_ids", "labels", "attention_mask")}

    def one_step(name: str) -> tuple[float, float | None, float | None]:
        cfg = cfgs[name]
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start_bytes = allocated()
        t0 = time.perf_counter()
        cached = cache.references(device, forget=ids) if cfg.method == "dipo" else None
        micro_step(cfg, engines[cfg.loss.fused], None, batch, n_forget=rows, cached_ref=cached)
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if not gpu:
            return seconds, None, None
        peak = torch.cuda.max_memory_allocated()
        return seconds, (peak - start_bytes) / 2 ** 30, peak / 2 ** 30

    times = {name: [] for name in cfgs}
    step_peak = {name: [] for name in cfgs}
    absolute = {name: [] for name in cfgs}
    for r in range(config["warmup"] + config["reps"]):
        for name in cfgs:
            t, step_gib, abs_gib = one_step(name)
            if r >= config["warmup"]:
                times[name].append(t)
                step_peak[name].append(step_gib)
                absolute[name].append(abs_gib)
    Path(config["out"]).write_text(json.dumps({
        "times": times, "step_peak_gib": step_peak, "absolute_peak_gib": absolute,
        "engine_gib": {k: v / 2 ** 30 for k, v in engine_bytes.items()} if gpu else None,
        "device": torch.cuda.get_device_name() if gpu else "cpu"}))


def flops_per_token(model_dir: Path, block: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token: 6·N + 12·L·H·T, N without the input embedding)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    params = num_parameters(model_dir)
    n = params - config.vocab_size * config.hidden_size  # the input embedding is a lookup
    return params, 6 * n + 12 * config.num_hidden_layers * config.hidden_size * block


def _seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def run_evaluate(model: Path, corpus: Path, out: Path, device: str, sizes: dict) -> dict:
    """`dipo-scale evaluate --device DEVICE` (module docstring, 4)."""
    args = [sys.executable, "-m", "dipo_scale.cli", "evaluate", "--model", str(model), "--data", str(corpus),
            "--out", str(out), "--device", device, "--limit", str(sizes["eval_limit"]),
            "--batch-size", str(sizes["eval_batch"]), "--max-new-tokens", str(sizes["max_new_tokens"])]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = {"command": " ".join(["dipo-scale", *args[3:]]), "exit_code": proc.returncode,
              "wall_seconds": round(wall, 2)}
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        result["error"] = lines[-1][:300]
        return result
    loops = re.findall(r"eval (\S+) \(generate\): done, (\d+) items in ([\d.]+ (?:s|min|h))", proc.stdout)
    per_loop = {}
    for criterion, n, t in loops:  # evaluate caps each criterion's default at --max-new-tokens
        default = KNOWMEM_NEW_TOKENS if criterion.startswith("knowmem") else VERBMEM_NEW_TOKENS
        new = min(default, sizes["max_new_tokens"])
        per_loop[criterion] = {"items": int(n), "new_tokens": new, "tokens": int(n) * new, "seconds": _seconds(t)}
    tokens = sum(v["tokens"] for v in per_loop.values())
    seconds = sum(v["seconds"] for v in per_loop.values())
    result.update(generate_loops=per_loop, generated_tokens=tokens, generate_seconds=seconds,
                  generation_tokens_per_second=tokens / seconds if seconds else None)
    return result


def render_section(result: dict) -> str:
    """docs/benchmarks.md's "GPU check" section, from the JSON."""
    m, v = result["model"], result["variants"]
    dry = result["dry_run"]
    lines = [DOCS_HEADING, ""]
    if dry:
        lines += ["**Dry run on CPU (not a GPU measurement):** `benchmarks/gpu_check.sh --dry-run` checked that the",
                  "script runs end to end with the sizes scaled down; the figures below are CPU figures of a",
                  "toy model and say nothing about a GPU.", ""]
    script = f"benchmarks/gpu_check.sh{' --dry-run' if dry else ''}"
    size = f"{m['parameters'] / 1e9:.3f} B" if m["parameters"] >= 1e8 else f"{m['parameters'] / 1e6:.2f} M"
    lines += [f"`{script}` (the script's docstring says what each figure measures), run",
              f"{result['date_utc']} on {result['device']}, {result['wall_seconds']:.0f} s in all.",
              f"Model: random-init Llama shape, {size} parameters (vocabulary",
              f"{m['vocab']}, hidden {m['hidden']}, {m['layers']} layers), {m['dtype']}, DeepSpeed ZeRO-3",
              f"(`{m['ds_config']}`) on one {'GPU' if not dry else 'CPU worker'}; {m['rows']} forget + {m['rows']} "
              f"retain rows of {m['block']} tokens per step ({m['tokens_per_step']} tokens); medians of",
              f"{result['reps']} steps after {result['warmup']}; MFU against {result['peak_tflops']:g} TFLOPS "
              f"(dense bf16), {m['flops_per_token'] / 1e9:.2f} GFLOP per token.",
              "",
              "| variant | step time | tokens/s | MFU | step peak (GiB over the step's start) |",
              "|---|---:|---:|---:|---:|"]
    names = {"sft": "plain fine-tuning (logits)", "sft_fused": "plain fine-tuning, fused head",
             "dipo_fused": "**DiPO, fused head, hidden cache**", "dipo_logits": "DiPO, logits, hidden cache"}
    for name, row in v.items():
        peak = "not measured (CPU)" if row["step_peak_gib"] is None else f"{row['step_peak_gib']:.2f}"
        lines.append(f"| {names.get(name, name)} | {row['step_seconds']:.3f} s | {row['tokens_per_second']:,.0f} "
                     f"| {100 * row['mfu']:.1f} % | {peak} |")
    r = result["ratios"]
    lines += ["", f"- `dipo_fused_over_sft_step_time` = **{r['dipo_fused_over_sft_step_time']:.2f}**; "
                  f"over fused fine-tuning {r['dipo_fused_over_sft_fused_step_time']:.2f}."]
    if r.get("fused_over_logits_dipo_step_peak_memory") is not None:
        engines = ", ".join(f"{k} {g:.2f} GiB" for k, g in result["engine_gib"].items())
        absolute = max(x["absolute_peak_gib"] for x in v.values())
        lines.append(f"- `fused_over_logits_dipo_step_peak_memory` = "
                     f"**{r['fused_over_logits_dipo_step_peak_memory']:.2f}** (fine-tuning: "
                     f"{r['fused_over_logits_sft_step_peak_memory']:.2f}); engines: {engines}; absolute peak "
                     f"{absolute:.2f} GiB (both engines resident).")
    e = result["evaluate"]
    if e.get("generation_tokens_per_second"):
        lines.append(f"- Generation: **{e['generation_tokens_per_second']:,.0f} tokens/s** "
                     f"({e['generated_tokens']} tokens in {e['generate_seconds']:g} s of generate loops; the command "
                     f"took {e['wall_seconds']:.0f} s): `{e['command']}`.")
    elif e["exit_code"] == 0:
        lines.append(f"- Generation: {e['generated_tokens']} tokens, every generate loop under the 1 s resolution "
                     f"of evaluate's progress lines (no rate); the command took {e['wall_seconds']:.0f} s: "
                     f"`{e['command']}`.")
    else:
        lines.append(f"- Generation: `{e['command']}` failed (exit {e['exit_code']}): {e.get('error', '')}")
    p = result["precompute"]
    lines += [f"- Hidden cache precompute: {p['tokens']} tokens, {p['seconds']:.1f} s as a job (start-up included).",
              f"- Raw figures: the JSON the script wrote, `{result['json']}` (`--json`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, sizes scaled down")
    parser.add_argument("--json", default=None, help="results (default: <work>/gpu_check.json)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"),
                        help="the markdown file whose GPU section is rewritten ('' : none)")
    parser.add_argument("--work", default=None, help="models, data, caches (default: a temporary directory)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the card's dense bf16 peak")
    args = parser.parse_args(argv)
    t_start = time.time()
    dry = args.dry_run
    sizes = SIZES["dry" if dry else "gpu"]
    if dry:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dipo_scale.config import load_unlearn_config
    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.reference import precompute_reference

    if not dry and not torch.cuda.is_available():
        print("gpu_check: torch sees no GPU (use --dry-run on CPU)", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    json_path = Path(args.json or work / "gpu_check.json")
    dtype = "float32" if dry else "bfloat16"
    assets = build_bench_assets(work / "assets", vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                                num_layers=sizes["layers"], intermediate_size=sizes["intermediate"],
                                block_size=sizes["block"], num_blocks=sizes["rows"], dtype=dtype,
                                device="cpu" if dry else "cuda")
    print(f"gpu_check: assets in {time.time() - t_start:.0f} s", flush=True)
    corpus = work / "corpus"
    if not (corpus / "world.json").is_file():
        generate_corpus(corpus, num_docs=sizes["eval_docs"], seed=0)
    rows = sizes["rows"]
    common = [f"model.path={assets['model']}", f"data.prepared_dir={assets['prepared']}", "loss.retain=gd",
              f"model.dtype={dtype}", f"train.use_gpu={'false' if dry else 'true'}",
              f"train.ds_config={'zero3_cpu.json' if dry else 'zero3_bf16.json'}", "train.num_workers=1",
              f"train.global_batch_size={rows}", f"train.micro_batch_size={rows}", "train.lr=1e-5",
              f"out_dir={work / 'run'}", "logging.wandb=disabled", f"reference.cache_dir={work / 'cache'}",
              f"reference.dtype={dtype}", "reference.batch_size=2"]
    cfgs = {name: load_unlearn_config(None, common + overrides) for name, overrides in VARIANTS.items()}

    # a cluster of its own (never one that `ray start` left running), in a short temp dir (socket paths)
    ray.init(address="local", include_dashboard=False, log_to_driver=True, _temp_dir=f"/tmp/gpu_check_{os.getpid()}",
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"} if dry else {}})
    t0 = time.time()
    manifest = precompute_reference(cfgs["dipo_fused"])
    precompute = {"tokens": manifest["precompute"]["tokens_computed"], "seconds": time.time() - t0}
    print(f"gpu_check: hidden cache in {precompute['seconds']:.0f} s", flush=True)
    out = work / "times.json"
    TorchTrainer(check_worker,
                 train_loop_config={"cfgs": {n: c.model_dump(by_alias=True) for n, c in cfgs.items()},
                                    "cache": str(work / "cache"), "gpu": not dry, "warmup": sizes["warmup"],
                                    "reps": sizes["reps"], "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=1, use_gpu=not dry),
                 torch_config=TorchConfig(backend="gloo" if dry else "nccl"),
                 run_config=RunConfig(name="gpu_check", storage_path=str(work / "ray"))).fit()
    ray.shutdown()
    print(f"gpu_check: steps done at {time.time() - t_start:.0f} s", flush=True)

    measured = json.loads(out.read_text())
    params, flops = flops_per_token(assets["model"], sizes["block"])
    tokens = 2 * rows * sizes["block"]
    variants = {}
    for name, ts in measured["times"].items():
        seconds = statistics.median(ts)
        peaks = [p for p in measured["step_peak_gib"][name] if p is not None]
        absolute = [p for p in measured["absolute_peak_gib"][name] if p is not None]
        variants[name] = {"step_seconds": seconds, "step_seconds_all": ts, "tokens_per_second": tokens / seconds,
                          "mfu": tokens / seconds * flops / (args.peak_tflops * 1e12),
                          "step_peak_gib": max(peaks) if peaks else None,
                          "absolute_peak_gib": max(absolute) if absolute else None}
    ratio = lambda a, b, key: (variants[a][key] / variants[b][key]  # noqa: E731
                               if variants[a][key] is not None and variants[b][key] else None)
    evaluation = run_evaluate(assets["model"], corpus, work / "eval", "cpu" if dry else "cuda", sizes)
    print(f"gpu_check: evaluate: {evaluation}", flush=True)
    result = {
        "dry_run": dry, "device": measured["device"], "peak_tflops": args.peak_tflops,
        "model": {"parameters": params, "vocab": sizes["vocab"], "hidden": sizes["hidden"], "layers": sizes["layers"],
                  "intermediate": sizes["intermediate"], "dtype": dtype, "block": sizes["block"], "rows": rows,
                  "tokens_per_step": tokens, "flops_per_token": flops,
                  "ds_config": "zero3_cpu.json" if dry else "zero3_bf16.json"},
        "warmup": sizes["warmup"], "reps": sizes["reps"], "variants": variants,
        "engine_gib": measured["engine_gib"],
        "ratios": {"dipo_fused_over_sft_step_time": ratio("dipo_fused", "sft", "step_seconds"),
                   "dipo_fused_over_sft_fused_step_time": ratio("dipo_fused", "sft_fused", "step_seconds"),
                   "fused_over_logits_dipo_step_peak_memory": ratio("dipo_fused", "dipo_logits", "step_peak_gib"),
                   "fused_over_logits_sft_step_peak_memory": ratio("sft_fused", "sft", "step_peak_gib")},
        "precompute": precompute, "evaluate": evaluation,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "json": str(json_path), "work": str(work),
    }
    result["wall_seconds"] = round(time.time() - t_start, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        write_doc_section(Path(args.docs), "gpu_check", render_section(result))
    print(json.dumps({k: result[k] for k in ("variants", "ratios", "evaluate", "wall_seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
