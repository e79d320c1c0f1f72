"""Reference-cache benchmark: size, error and speed of the cached reference forms, on CPU.

    .venv/bin/python benchmarks/reference_cache.py --json /tmp/reference_cache.json
    .venv/bin/python benchmarks/reference_cache.py --json /tmp/rc.json --no-quantize --reps 3

On the demo model and corpus (`dipo-scale demo` builds them into `<demo-dir>/models/target` and
`<demo-dir>/prepared`; this script builds them there first when they are missing, ~2.5 min on
2 cores, and reuses them otherwise). Steps:

1. precompute (`dipo_scale.reference.precompute_reference`, Ray Data actor pool, `--actors`
   actors) the forget + retain statistics in the `hidden` form and in the `topk` form for each K
   of `--ks`: `bytes_per_token_*` (bytes stored per position, from the cache manifest) and the
   precompute throughput (`precompute_tokens_per_second*`: real tokens over the job's wall time,
   Ray start-up included for the first form; `*_per_worker`: over the time inside the actors'
   shard loops);
2. the loss error of each form against the online reference (full float32 logits of the same
   model), on every forget block: the DiPO loss (demo settings: α = 5, β = 0.1, select topk,
   k = 1, reduction sum) summed over batches of 8 blocks, `loss_rel_error_<form>` =
   |L_cached − L_online| / |L_online|; likewise the gradient w.r.t. the policy logits
   (`grad_rel_error_*`, ‖g_cached − g_online‖ / ‖g_online‖) and the KL retain term on the retain
   blocks (`kl_retain_rel_error_*`). The policy is the demo's *retrain* model (never trained on
   the forget set: where unlearning heads; its margins do not saturate log σ);
3. `step_time_ratio_cached_over_online`: one process, the two kinds of step side by side and
   interleaved (online, hidden cache, online, ...), each the real `unlearn.micro_step` (policy
   forward, reference logits from a frozen reference forward or from the cache rows of the
   batch's block ids, DiPO + KL retain loss, backward, AdamW step) on `--micro` forget + as many
   retain blocks, plain PyTorch on one process (no DeepSpeed), 2 threads; the ratio of medians
   over `--reps` pairs after one warm-up pair. Also `step_time_ratio_topk32_over_online`;
4. `--quantize` (default on): the hidden cache precomputed from the reference loaded with
   bitsandbytes 8-bit and 4-bit (nf4) and its error against full precision: the loss error as in
   2 against the float32 online reference, and the mean KL(π_fp32 ‖ π_quantised) per position.
   When bitsandbytes cannot run here its error message is recorded instead of numbers.
5. `precompute_over_forward_throughput` ({"hidden": r, "topk": r, ...}, goal >= 0.7): tokens/s of
   the precompute (`precompute_reference`; by default its default pool, `reference.num_workers`
   and `reference.cpus_per_worker` unset; `--throughput-pools 2x1` adds 2 actors of 1 CPU, ...)
   over tokens/s of a bare forward of the same model to its final hidden states on the same
   cores in the same configuration (`bare_forward`: as many processes as the pool has workers,
   each with as many torch threads as a worker has CPUs, `model.get_decoder()(...)` without
   grad over contiguous shares of the same blocks, in batches of `reference.batch_size`), side
   by side in one run, on a larger corpus (`--throughput-docs` generated documents, prepared
   like the demo's but with concatenated blocks, as MUSE's are; forget split only,
   `loss.retain=gd`). `--throughput-rounds` interleaved rounds (default 3): in each, every
   precompute runs once and every bare configuration once, right before the first precompute of
   its pool (the default pool's right after it: it is known once it ran); each ratio is that of
   one round, and the reported ratio the median over the rounds (`throughput_rounds` keeps every
   round's runs and ratios). The precompute's tokens/s is counted while it computes:
   real tokens over the span from the first shard's start to the last shard's end (the shard
   records' times), i.e. without starting Ray's workers and loading the model into them (the
   bare forward's start-up is excluded likewise); `precompute_over_forward_throughput_wall`
   counts the whole job (start-up included) and `throughput_<form>.startup_seconds` says what
   that was. `precompute_over_forward_tokens_per_cpu_second`: the same ratio per CPU second of
   the worker processes (shard records' `cpu_seconds`, all threads; the bare forward's likewise),
   what a token costs whatever the machine's load (threads spin-waiting count too).
   `topk_over_logits_forward_throughput`: the topk form against a bare forward of the whole model
   to its logits (`bare_forward(head=True)`), which computes the LM head as the topk form must.
   `--throughput-only` runs this part alone; it also runs against an older checkout of
   dipo_scale (records without start times are timed by their file times; an older pool is 1
   actor of 1 CPU). `--doc` writes this part's table into docs/benchmarks.md (between
   `<!-- reference_throughput:begin -->` and `<!-- reference_throughput:end -->`) from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from bench_assets import command_line, demo_assets, machine_facts, write_doc_section  # noqa: E402

DIPO = dict(alpha=5.0, beta=0.1, select="topk", k=1, reduction="sum")


def config(assets: dict, *overrides: str):
    from dipo_scale.config import load_unlearn_config

    return load_unlearn_config(None, [
        f"model.path={assets['target']}", f"data.prepared_dir={assets['prepared']}", "method=dipo",
        "loss.retain=kl", *[f"dipo.{k}={v}" for k, v in DIPO.items()], *overrides])


class PlainEngine:
    """What `unlearn.micro_step` needs of a DeepSpeed engine, on one process."""

    def __init__(self, model, lr=None):
        self.model = model
        self.device = torch.device("cpu")
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr) if lr else None

    def __call__(self, **kw):
        return self.model(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def loss_errors(assets, caches: dict, batch: int = 8) -> dict:
    """Loss / gradient errors of each cache against online float32 reference logits."""
    from dipo_scale.losses import dipo_loss, kl_retain_loss, shift_targets
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference import ReferenceCache

    policy, reference = load_model(assets["retrain"]), load_model(assets["target"])
    readers = {name: ReferenceCache(path) for name, path in caches.items()}
    out = {}
    for split in ("forget", "retain"):
        blocks = read_blocks(assets["prepared"], split)
        n = len(blocks["input_ids"])
        totals = {name: 0.0 for name in ["online", *readers]}
        grads = {name: [] for name in ["online", *readers]}
        for s in range(0, n, batch):
            ids = list(range(s, min(n, s + batch)))
            x = {k: torch.as_tensor(blocks[k][ids]) for k in ("input_ids", "attention_mask")}
            targets = shift_targets(torch.as_tensor(blocks["labels"][ids]))
            with torch.no_grad():
                z = policy(**x).logits
                z_ref = reference(**x).logits
            refs = {"online": z_ref, **{name: r.reference(split, ids) for name, r in readers.items()}}
            for name, ref in refs.items():
                logits = z.clone().requires_grad_(True)
                if split == "forget":
                    loss = dipo_loss(logits, ref, targets, **DIPO)[0]
                else:
                    loss = kl_retain_loss(logits, ref, targets)
                (g,) = torch.autograd.grad(loss, logits)
                totals[name] += loss.item() * len(ids)
                grads[name].append(g.flatten())
        g_online = torch.cat(grads["online"])
        for name in readers:
            rel = abs(totals[name] - totals["online"]) / abs(totals["online"])
            grel = (torch.cat(grads[name]) - g_online).norm().item() / g_online.norm().item()
            if split == "forget":
                out[f"loss_rel_error_{name}"] = rel
                out[f"grad_rel_error_{name}"] = grel
            else:
                out[f"kl_retain_rel_error_{name}"] = rel
        key = "dipo_loss_online" if split == "forget" else "kl_retain_loss_online"
        out[key] = totals["online"] / n
    return out


def quantised_kl(assets, cache_fp: Path, cache_q: Path) -> float:
    """Mean KL(π_fp32 ‖ π_quantised) per real position of the forget blocks (from the two caches)."""
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference import ReferenceCache

    fp, q = ReferenceCache(cache_fp), ReferenceCache(cache_q)
    blocks = read_blocks(assets["prepared"], "forget")
    total, count = 0.0, 0
    for s in range(0, len(blocks["input_ids"]), 8):
        ids = list(range(s, min(len(blocks["input_ids"]), s + 8)))
        mask = torch.as_tensor(blocks["attention_mask"][ids]).bool()
        a, b = fp.reference("forget", ids), q.reference("forget", ids)
        la = torch.log_softmax(a.logits(a.hidden[mask]), -1)
        lb = torch.log_softmax(b.logits(b.hidden[mask]), -1)
        total += (la.exp() * (la - lb)).sum().item()
        count += int(mask.sum())
    return total / count


def step_times(assets, caches: dict, reps: int, micro: int) -> dict:
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference import ReferenceCache
    from dipo_scale.unlearn import micro_step

    torch.set_num_threads(2)
    engine = PlainEngine(load_model(assets["target"]).train(), lr=1e-4)
    ref_engine = PlainEngine(load_model(assets["target"]).requires_grad_(False))
    forget, retain = (read_blocks(assets["prepared"], s) for s in ("forget", "retain"))
    readers = {name: ReferenceCache(path) for name, path in caches.items()}
    cfgs = {"online": config(assets, f"train.micro_batch_size={micro}"),
            **{name: config(assets, f"reference.form={'hidden' if name == 'hidden' else 'topk'}",
                            f"reference.cache_dir={path}",
                            *([f"reference.k={name.split('_')[1]}"] if name != "hidden" else []))
               for name, path in caches.items()}}
    times = {name: [] for name in cfgs}
    for rep in range(reps + 1):
        f_ids = [(rep * micro + i) % len(forget["input_ids"]) for i in range(micro)]
        r_ids = [(rep * micro + i) % len(retain["input_ids"]) for i in range(micro)]
        batch = {k: torch.as_tensor(__import__("numpy").concatenate([forget[k][f_ids], retain[k][r_ids]]))
                 for k in ("input_ids", "labels", "attention_mask")}
        for name, cfg in cfgs.items():
            t0 = time.perf_counter()
            if name == "online":
                micro_step(cfg, engine, ref_engine, batch, n_forget=micro)
            else:
                cached = readers[name].references(None, forget=f_ids, retain=r_ids)
                micro_step(cfg, engine, None, batch, n_forget=micro, cached_ref=cached)
            if rep:  # the first pair warms up
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def throughput_assets(demo_dir: Path, assets: dict, num_docs: int) -> Path:
    """A larger prepared corpus for the throughput comparison (demo tokenizer, demo block size,
    concatenated blocks as MUSE's are); built once per `num_docs`."""
    from transformers import AutoTokenizer

    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.demo import MODEL_SETTINGS
    from dipo_scale.prepare import prepare

    root = demo_dir / f"throughput_{num_docs}"
    if not (root / "prepared" / "manifest.json").is_file():
        if not (root / "corpus" / "world.json").is_file():
            generate_corpus(root / "corpus", num_docs=num_docs, seed=1)
        prepare(load_muse_dir(root / "corpus"), AutoTokenizer.from_pretrained(assets["tokenizer"]),
                root / "prepared", block_size=MODEL_SETTINGS.block_size, layout="concat")
    return root / "prepared"


def _bare_worker(model_dir, prepared, batch_size: int, threads: int, head: bool, part: int, parts: int, barrier,
                 results):
    """One process of `bare_forward`: its contiguous share of the forget blocks, timed after a
    barrier (every process has loaded torch, the model and its blocks, and run one batch); glibc's
    allocator fixed as in the precompute's CPU workers (`dipo_scale.memory.steady_allocator`)."""
    from dipo_scale.memory import steady_allocator
    from dipo_scale.prepare import read_blocks

    steady_allocator()  # as the precompute's CPU workers do
    torch.set_num_threads(threads)
    model = load_model(model_dir)
    trunk = model if head else model.get_decoder()
    blocks = read_blocks(prepared, "forget")
    batches = list(range(0, len(blocks["input_ids"]), batch_size))
    mine = batches[part * len(batches) // parts:(part + 1) * len(batches) // parts]
    run = lambda s: trunk(input_ids=torch.as_tensor(blocks["input_ids"][s:s + batch_size]),  # noqa: E731
                          attention_mask=torch.as_tensor(blocks["attention_mask"][s:s + batch_size]), use_cache=False)
    with torch.no_grad():
        run(mine[0])  # warm-up
        barrier.wait()
        t0, cpu0 = time.time(), time.process_time()
        for s in mine:
            run(s)
        t1, cpu = time.time(), time.process_time() - cpu0
    tokens = sum(int(blocks["attention_mask"][s:s + batch_size].sum()) for s in mine)
    results.put((tokens, t0, t1, cpu))


def bare_forward(model_dir, prepared: Path, batch_size: int, workers: int, threads: int, head: bool = False) -> dict:
    """Tokens/s of a bare forward of the model's decoder trunk (to its final hidden states, no
    grad; `head`: of the whole model, to its logits, which the topk form computes too) over the
    forget blocks, in the precompute pool's configuration: `workers` processes of `threads` torch
    threads each, over contiguous shares of the blocks, from the first start to the last end
    (start-up excluded, as the precompute's computing span excludes it)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(str(model_dir), str(prepared), batch_size, threads, head, i,
                                                     workers, barrier, results)) for i in range(workers)]
    for proc in procs:
        proc.start()
    done = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    tokens = sum(d[0] for d in done)
    seconds = max(d[2] for d in done) - min(d[1] for d in done)
    cpu = sum(d[3] for d in done)
    return {"workers": workers, "threads": threads, "head": head, "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds, "cpu_seconds": cpu, "tokens_per_cpu_second": tokens / cpu}


def computing_span(cache: Path) -> tuple[float, float, float | None]:
    """(first shard's start, last shard's end, CPU seconds of the workers in their shard loops)
    from the shard records of a cache (CPU: None for records without it)."""
    starts, ends, cpu = [], [], []
    for record_path in cache.glob("*/part-*.json"):
        record = json.loads(record_path.read_text())
        end = record.get("finished", record_path.stat().st_mtime)
        starts.append(record.get("started", end - record["seconds"]))
        ends.append(end)
        cpu.append(record.get("cpu_seconds"))
    return min(starts), max(ends), (None if None in cpu else sum(cpu))


def throughput(assets: dict, demo_dir: Path, work: Path, num_docs: int, k: int, pools: list[str],
               rounds: int = 3) -> dict:
    """Section 5 of the module docstring."""
    from dipo_scale.reference import precompute_reference

    prepared = throughput_assets(demo_dir, assets, num_docs)
    batch = 8
    out: dict = {"throughput_corpus": {"docs": num_docs, "prepared": str(prepared),
                                       "forget_blocks": json.loads((prepared / "manifest.json").read_text())
                                       ["splits"]["forget"]["blocks"]}}
    forms = {"hidden": ["reference.form=hidden"], "topk": ["reference.form=topk", f"reference.k={k}"]}
    runs = {name: (None, overrides) for name, overrides in forms.items()}  # None: the default pool
    for pool in pools:  # other pools than the default, e.g. 2x1: 2 actors of 1 CPU
        workers, cpus = (int(x) for x in pool.split("x"))
        runs.update({f"{name}_{pool}": ((workers, cpus), [*overrides, f"reference.num_workers={workers}",
                                                          f"reference.cpus_per_worker={cpus}"])
                     for name, overrides in forms.items()})
    per_round = []
    for round_ in range(rounds):  # interleaved: the machine's drift hits precompute and bare forward alike
        bare: dict = {}  # (workers, threads, head) -> this round's bare forward

        def bracket(pool: tuple, head: bool) -> None:  # the bare forwards a run is compared with, once per round
            for key in [(*pool, False), (*pool, True)] if head else [(*pool, False)]:
                if key not in bare:
                    bare[key] = bare_forward(assets["target"], prepared, batch, *key)

        precompute = {}
        for name, (pool, overrides) in runs.items():
            head = name.startswith("topk")  # the topk form computes the LM head: a forward to the logits too
            if pool is not None:
                bracket(pool, head)
            cache = work / f"throughput_{name}_{round_}"
            t0 = time.time()
            m = precompute_reference(config({**assets, "prepared": prepared}, *overrides,
                                            f"reference.cache_dir={cache}", "loss.retain=gd",
                                            f"reference.batch_size={batch}"))
            wall = time.time() - t0
            start, end, cpu = computing_span(cache)
            p = m["precompute"]
            tokens = p["tokens_computed"]
            used = (p.get("num_workers") or 1, p.get("cpus_per_worker") or 1)  # an older checkout: 1 actor, 1 CPU
            precompute[name] = {
                "tokens": tokens, "job_seconds": round(wall, 3), "computing_seconds": round(end - start, 3),
                "startup_seconds": round(start - t0, 3), "tokens_per_second_computing": tokens / (end - start),
                "tokens_per_second_job": tokens / wall, "num_workers": used[0], "cpus_per_worker": used[1],
                "shards": p["shards_computed"], "cpu_seconds": cpu, "tokens_per_cpu_second": tokens / cpu if cpu else None}
            bracket(used, head)  # the default pool: known once it ran; its bare forward right after it
            print(f"throughput round {round_} {name}: {precompute[name]}", flush=True)
        per_round.append({"precompute": precompute,
                          "bare_forward": {f"{w}x{t}{'_logits' if h else ''}": b for (w, t, h), b in bare.items()},
                          **ratios(precompute, bare)})
    out["throughput_rounds"] = per_round
    for key in ("precompute_over_forward_throughput", "topk_over_logits_forward_throughput",
                "precompute_over_forward_throughput_wall", "precompute_over_forward_tokens_per_cpu_second",
                "topk_over_logits_forward_tokens_per_cpu_second"):
        out[key] = {name: statistics.median(r[key][name] for r in per_round) for name in per_round[0][key]}
        print(key, "(median of rounds)", out[key], flush=True)
    return out


def ratios(precompute: dict, bare: dict) -> dict:
    """One round's ratios of each precompute run over the bare forwards of its pool."""
    pool = {name: (r["num_workers"], r["cpus_per_worker"]) for name, r in precompute.items()}
    trunk = {name: bare[(*pool[name], False)] for name in precompute}
    logits = {name: bare[(*pool[name], True)] for name in precompute if name.startswith("topk")}
    nan = float("nan")
    return {
        "precompute_over_forward_throughput": {
            name: r["tokens_per_second_computing"] / trunk[name]["tokens_per_second"] for name, r in precompute.items()},
        # the topk form against a forward that computes what it must compute (trunk + LM head, to the logits)
        "topk_over_logits_forward_throughput": {
            name: precompute[name]["tokens_per_second_computing"] / b["tokens_per_second"] for name, b in logits.items()},
        "precompute_over_forward_throughput_wall": {
            name: r["tokens_per_second_job"] / trunk[name]["tokens_per_second"] for name, r in precompute.items()},
        # per CPU second (the workers' processes, all threads): what a token costs, whatever the
        # machine's load; the pool's threads spin-waiting for each other count too
        "precompute_over_forward_tokens_per_cpu_second": {
            name: (r["tokens_per_cpu_second"] or nan) / trunk[name]["tokens_per_cpu_second"]
            for name, r in precompute.items()},
        "topk_over_logits_forward_tokens_per_cpu_second": {
            name: (precompute[name]["tokens_per_cpu_second"] or nan) / b["tokens_per_cpu_second"]
            for name, b in logits.items()}}


def throughput_doc(result: dict) -> str:
    """docs/benchmarks.md's section of the throughput part (section 5), from its JSON."""
    rounds = result["throughput_rounds"]
    corpus = result["throughput_corpus"]
    lines = [f"**{result['date_utc'][:16].replace('T', ' ')} UTC**, `{result['command']}` (load average "
             f"{result['machine']['load_average_at_start'][0]:.1f} at the start, "
             f"{result['machine']['load_average'][0]:.1f} at the end; {corpus['docs']} generated documents, "
             f"{rounds[0]['precompute']['hidden']['tokens']:,} forget tokens in {corpus['forget_blocks']} blocks; "
             f"{len(rounds)} interleaved rounds, each a bare forward and a precompute per pool and form; "
             "the ratios are the median over the rounds, each round's in brackets):", "",
             "| pool | form | tokens/s computing (median) | over the trunk forward | over the logits forward "
             "| per CPU second (trunk) |", "|---|---|---:|---:|---:|---:|"]
    fmt = lambda key, name: (  # noqa: E731
        f"**{result[key][name]:.2f}** ({', '.join(f'{r[key][name]:.2f}' for r in rounds)})"
        if name in result[key] else "")
    for name, first in rounds[0]["precompute"].items():
        pool = f"{first['num_workers']} actor{'s' if first['num_workers'] > 1 else ''} × {first['cpus_per_worker']} CPU" \
               f"{'s' if first['cpus_per_worker'] > 1 else ''}{' (default)' if '_' not in name else ''}"
        speed = statistics.median(r["precompute"][name]["tokens_per_second_computing"] for r in rounds)
        lines.append(f"| {pool} | {name.split('_')[0]} | {speed:,.0f} | {fmt('precompute_over_forward_throughput', name)} | "
                     f"{fmt('topk_over_logits_forward_throughput', name)} | "
                     f"{result['precompute_over_forward_tokens_per_cpu_second'][name]:.2f} |")
    bare = {key: statistics.median(r["bare_forward"][key]["tokens_per_second"] for r in rounds)
            for key in rounds[0]["bare_forward"]}
    lines += ["", "Bare forwards, tokens/s (median of the rounds): " +
              ", ".join(f"{key.replace('_logits', ' to the logits')} {v:,.0f}" for key, v in bare.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--demo-dir", default=str(ROOT / "demo_out"))
    parser.add_argument("--work", default=None, help="cache directories (default: <demo-dir>/reference_bench)")
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6, help="timed step pairs (after one warm-up pair)")
    parser.add_argument("--micro", type=int, default=4, help="forget (and retain) blocks per timed step")
    parser.add_argument("--no-quantize", dest="quantize", action="store_false")
    parser.add_argument("--throughput-docs", type=int, default=7000,
                        help="documents of the generated corpus of section 5 (0: skip it)")
    parser.add_argument("--throughput-k", type=int, default=32, help="K of the topk form in section 5")
    parser.add_argument("--throughput-only", action="store_true", help="run section 5 alone")
    parser.add_argument("--throughput-pools", default="", help="section 5: other pools than the default, "
                        "WORKERSxCPUS comma-separated (e.g. 2x1)")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="section 5: interleaved rounds")
    parser.add_argument("--doc", action="store_true", help="write section 5's table into docs/benchmarks.md "
                        "(between <!-- reference_throughput:begin --> and <!-- reference_throughput:end -->)")
    args = parser.parse_args(argv)

    import shutil

    import ray

    from dipo_scale.errors import UserInputError
    from dipo_scale.reference import precompute_reference

    t_start = time.time()
    models = Path(args.demo_dir).resolve() / "models"
    if args.throughput_only and (models / "target" / "model.safetensors").is_file() and (models / "tokenizer").is_dir():
        assets = {"target": models / "target", "tokenizer": models / "tokenizer"}  # all section 5 needs
    else:
        assets = demo_assets(Path(args.demo_dir).resolve())
    work = Path(args.work or Path(args.demo_dir) / "reference_bench").resolve()
    shutil.rmtree(work, ignore_errors=True)  # measure a precompute from nothing
    load_at_start = os.getloadavg()
    ray.init(address="local", num_cpus=max(os.cpu_count(), args.actors), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    result: dict = {"settings": {"dipo": DIPO, "actors": args.actors, "reps": args.reps, "micro": args.micro,
                                 "demo_dir": str(Path(args.demo_dir).resolve())}}
    if args.throughput_docs:
        result.update(throughput(assets, Path(args.demo_dir).resolve(), work, args.throughput_docs,
                                 args.throughput_k, [p for p in args.throughput_pools.split(",") if p],
                                 args.throughput_rounds))
    if args.throughput_only:
        ray.shutdown()
        return _write(args, result, t_start, load_at_start, argv)
    ks = [int(k) for k in args.ks.split(",")]
    forms = {"hidden": ["reference.form=hidden"],
             **{f"topk_{k}": ["reference.form=topk", f"reference.k={k}"] for k in ks}}
    caches = {}
    for name, overrides in forms.items():
        caches[name] = work / name
        m = precompute_reference(config(assets, *overrides, f"reference.cache_dir={caches[name]}",
                                        f"reference.num_workers={args.actors}", "reference.batch_size=8",
                                        "reference.rows_per_shard=16"))
        p = m["precompute"]
        result[f"bytes_per_token_{name}"] = m["bytes_per_token"]
        result[f"total_bytes_{name}"] = m["total_bytes"]
        result[f"precompute_tokens_per_second_{name}"] = p["tokens_per_second"]
        result[f"precompute_tokens_per_second_per_worker_{name}"] = p["tokens_per_second_per_worker"]
        result[f"precompute_seconds_{name}"] = p["seconds"]
        result["bytes_per_token_full_logits"] = m["full_logits_bytes_per_token"]
        result["vocab_size"], result["hidden_size"] = m["vocab_size"], m["hidden_size"]
        result["precompute_tokens"] = p["tokens_computed"]
        print(f"{name}: {m['bytes_per_token']} bytes/token, {p['tokens_per_second']} tokens/s", flush=True)
    result["precompute_tokens_per_second"] = result["precompute_tokens_per_second_hidden"]
    if "hidden" in caches:
        result["lm_head_bytes"] = json.loads((caches["hidden"] / "manifest.json").read_text())["lm_head"]["bytes"]

    if args.quantize:
        for q in ("8bit", "4bit"):
            path = work / f"hidden_{q}"
            try:
                m = precompute_reference(config(assets, "reference.form=hidden", f"reference.cache_dir={path}",
                                                f"reference.quantize={q}", "reference.num_workers=1",
                                                "reference.batch_size=8", "reference.rows_per_shard=16"))
            except (UserInputError, Exception) as e:  # noqa: BLE001  (recorded, not hidden)
                result[f"quantized_{q}_error"] = str(e).splitlines()[0][:300]
                print(f"quantized {q}: {result[f'quantized_{q}_error']}", flush=True)
                continue
            caches[f"hidden_{q}"] = path
            result[f"precompute_tokens_per_second_hidden_{q}"] = m["precompute"]["tokens_per_second"]
            result[f"kl_fp32_to_{q}_per_position"] = quantised_kl(assets, caches["hidden"], path)
    ray.shutdown()

    result.update(loss_errors(assets, caches))
    print({k: v for k, v in result.items() if "error" in k}, flush=True)
    timed = {k: v for k, v in caches.items() if k in ("hidden", "topk_32")}
    medians = step_times(assets, timed, args.reps, args.micro)
    result["step_seconds_median"] = medians
    result["step_time_ratio_cached_over_online"] = medians["hidden"] / medians["online"]
    if "topk_32" in medians:
        result["step_time_ratio_topk32_over_online"] = medians["topk_32"] / medians["online"]
    return _write(args, result, t_start, load_at_start, argv)


def _write(args, result: dict, t_start: float, load_at_start, argv) -> int:
    from dipo_scale.files import atomic_write_json

    result.update(machine_facts(load_at_start))
    result["wall_seconds"] = round(time.time() - t_start, 1)
    result["command"] = command_line("reference_cache.py", argv)
    atomic_write_json(args.json, result)
    if args.doc and "throughput_rounds" in result:
        write_doc_section(ROOT / "docs" / "benchmarks.md", "reference_throughput", throughput_doc(result))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
