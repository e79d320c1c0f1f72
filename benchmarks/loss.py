"""Loss benchmark: DiPO (chunked, naive, fused LM head) against plain cross-entropy, on CPU.

    .venv/bin/python benchmarks/loss.py --json /tmp/loss.json          # several minutes on 2 cores
    .venv/bin/python benchmarks/loss.py --quick --json /tmp/loss_quick.json

For each size (B = 1, seq T x vocab V) and each case, forward + backward is run in a fresh
subprocess (this script with `--case`), so that peak memory can be read per case:

* memory: peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) minus the RSS once the inputs
  exist, in MB (1e6 bytes), for one forward + backward. The peak is reset just before that run
  (`/proc/self/clear_refs` `5`, Linux >= 4.0), so transients of input creation do not count; a
  small (16x256) warm-up first touches the code paths (library pages count in RSS). torch has no
  CPU allocator statistics; glibc's mmap threshold is pinned to 1 MiB (`mallopt`) from process
  start to the end of that run, so freed tensors go back to the OS and the RSS peak tracks the
  peak of live tensors (the CPU analogue of `torch.cuda.max_memory_allocated`), not glibc's heap
  high-water mark.
* time: `torch.set_num_threads(2)`; median wall time of `--reps` forward + backward after a
  full-size warm-up (the memory run; mmap threshold then 32 MiB, glibc's steady-state default)
  for ce / dipo / dipo_chunk1024. To fit a few minutes on 2 shared cores, `naive` (`--reps-naive`) and
  the matmul-bound hidden-state cases (`--reps-hidden`) default to 0 extra runs: their time is
  that of the memory run itself (after the small warm-up; fresh-page faults counted, both sides
  of the fused-vs-CE ratio alike).

Cases (float32 everywhere; targets uniform random, no padding):
  ce          F.cross_entropy on logits [T, V] that require grad (plain fine-tuning loss)
  dipo        dipo_scale.losses.dipo_loss on the same logits + reference logits [1, T, V],
              with the module's default chunking (auto_chunk_size(V): ~2**22 elements per
              [chunk, V] temporary)
  dipo_chunk1024  the same with 1024 positions per chunk (the first default; kept to show why
              chunks are now sized by elements)
  naive       dipo_loss_naive (unchunked, full [T, V] float32 intermediates)
  ce_hidden   cross_entropy(hidden @ weight.T) from hidden [T, H] and weight [V, H], both
              requiring grad (the unfused fine-tuning LM head + loss)
  fused_dipo  dipo_scale.losses.dipo_loss(LMHead(hidden, weight), ...) from the same hidden/weight, reference in
              the hidden cache form (ref_hidden [T, H] + ref_weight [V, H]), default chunk

Memory ratios use the policy side only (the delta over the inputs; the reference logits /
reference hidden + weight are inputs and can be cached). `*_with_ref` numbers add the
reference inputs' bytes to the DiPO side.

`--doc` writes the run's tables into docs/benchmarks.md between `<!-- loss:begin -->` and
`<!-- loss:end -->` (`--from-json FILE`: from an earlier full run's JSON, running nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL_SIZES = [(512, 32000), (2048, 32000), (1024, 128256)]
QUICK_SIZES = [(128, 4096), (512, 32000)]
LOGIT_CASES = ["ce", "dipo", "dipo_chunk1024", "naive"]
HIDDEN_CASES = ["ce_hidden", "fused_dipo"]
DIPO_KW = dict(alpha=1.0, beta=0.1, select="topk", k=1, reduction="sum")
MB = 1e6


# --------------------------------------------------------------------------------------------
# Child: one case, one size.
# --------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make(case: str, T: int, V: int, H: int, seed: int = 0, fused_chunk=None):
    """Inputs and a step() doing forward + backward. Inputs are built in place (no temporaries)."""
    import torch
    import torch.nn.functional as F

    from dipo_scale.losses import HiddenReference, LMHead, auto_chunk_size, dipo_loss
    from tests.losses.naive import dipo_loss_naive  # the unchunked oracle of the tests

    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (1, T), generator=g)
    inputs, ref_bytes, extra = {}, 0, {}

    if case in LOGIT_CASES:
        logits = torch.empty(1, T, V).normal_(generator=g).mul_(2.0).requires_grad_(True)
        inputs["logits"] = logits
        if case != "ce":
            ref = torch.empty(1, T, V).normal_(generator=g).mul_(0.5).add_(logits.detach())
            inputs["ref_logits"], ref_bytes = ref, ref.nbytes
        if case == "ce":
            def step():
                F.cross_entropy(logits[0], targets[0]).backward()
        elif case in ("dipo", "dipo_chunk1024"):
            chunk = 1024 if case == "dipo_chunk1024" else None  # None: the losses' default
            extra["chunk_size"] = chunk or auto_chunk_size(V)

            def step():
                dipo_loss(logits, ref, targets, chunk_size=chunk, **DIPO_KW)[0].backward()
        else:
            def step():
                dipo_loss_naive(logits, ref, targets, **DIPO_KW)[0].backward()
        params = [logits]
    else:
        hidden = torch.empty(1, T, H).normal_(generator=g).requires_grad_(True)
        weight = torch.empty(V, H).normal_(generator=g).mul_(H ** -0.5).requires_grad_(True)
        inputs.update(hidden=hidden, weight=weight)
        if case == "ce_hidden":
            def step():
                F.cross_entropy(hidden[0] @ weight.T, targets[0]).backward()
        else:
            ref_hidden = torch.empty(1, T, H).normal_(generator=g).mul_(0.3).add_(hidden.detach())
            ref_weight = torch.empty(V, H).normal_(generator=g).mul_(0.3 * H ** -0.5).add_(weight.detach())
            inputs.update(ref_hidden=ref_hidden, ref_weight=ref_weight)
            ref_bytes = ref_hidden.nbytes + ref_weight.nbytes
            extra["chunk_size"] = fused_chunk or auto_chunk_size(V)

            def step():
                dipo_loss(LMHead(hidden, weight), HiddenReference(ref_hidden, ref_weight), targets,
                          chunk_size=fused_chunk, **DIPO_KW)[0].backward()
        params = [hidden, weight]

    def run():
        for p in params:
            p.grad = None
        step()
        for p in params:
            p.grad = None

    return run, inputs, ref_bytes, extra


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _set_mmap_threshold(libc, nbytes: int) -> bool:
    """glibc: allocations >= nbytes get their own mmap, unmapped on free (fixed, not dynamic)."""
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    return ok and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * nbytes))


def _timed(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def run_case(case: str, T: int, V: int, H: int, reps: int, fused_chunk=None) -> dict:
    """One process, one case: a small warm-up, the memory-measured run, then `reps` timed runs.

    The memory run comes first, with glibc's mmap threshold pinned to 1 MiB since process start
    (pinning it later would not help: allocations are served from the free lists of a heap grown
    by earlier runs). It is a full-size run, so it is also the warm-up of the timed runs, which
    follow with the threshold at 32 MiB (glibc's steady-state default on 64-bit). With reps == 0
    the time is the memory run's own (fresh-page faults counted).
    """
    import torch

    libc = _libc()
    pinned = _set_mmap_threshold(libc, 1 << 20)
    torch.set_num_threads(2)
    warm, *_ = _make(case, 16, 256, 64)  # touch the code paths (library pages count in RSS)
    warm()
    del warm
    hidden_case = case in HIDDEN_CASES
    run, inputs, ref_bytes, extra = _make(case, T, V, H, fused_chunk=fused_chunk)

    rss_inputs = _rss_bytes()
    reset = _reset_peak()
    if not reset:  # fall back: the high-water mark may include input creation
        rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem_run_s = _timed(run)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    if reps <= 0:
        times, timing = [mem_run_s], "the memory run (after a 16x256 warm-up; mmap threshold 1 MiB)"
    else:
        _set_mmap_threshold(libc, 32 << 20)
        times = [_timed(run) for _ in range(reps)]
        timing = f"median of {reps} after a full-size warm-up (the memory run); mmap threshold 32 MiB"
    return dict(
        case=case, seq=T, vocab=V, hidden=H if hidden_case else None,
        time_s=statistics.median(times), times_s=times, timing=timing, memory_run_s=mem_run_s,
        peak_mb=(peak - rss_inputs) / MB, rss_inputs_mb=rss_inputs / MB, peak_rss_mb=peak / MB,
        peak_reset=reset, mmap_threshold_pinned=pinned,
        ref_input_mb=ref_bytes / MB, input_mb={k: v.nbytes / MB for k, v in inputs.items()},
        logits_fp32_mb=T * V * 4 / MB, **extra,
    )


# --------------------------------------------------------------------------------------------
# Parent: every case in a fresh subprocess, ratios, JSON, markdown table.
# --------------------------------------------------------------------------------------------
def _spawn(case, T, V, H, reps, fused_chunk=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--seq", str(T),
           "--vocab", str(V), "--hidden", str(H), "--reps", str(reps)]
    if fused_chunk:
        cmd += ["--fused-chunk", str(fused_chunk)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} {T}x{V} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratios(c: dict) -> dict:
    r = lambda a, b: round(a / b, 3)  # noqa: E731
    # "dipo" runs with the losses' default chunking (sized by the vocabulary); "dipo_chunk1024"
    # with 1024 positions per chunk, the earlier default, kept to show why it was changed.
    ce, dipo, c1024, naive = c["ce"], c["dipo"], c["dipo_chunk1024"], c["naive"]
    out = dict(
        dipo_over_ce_time=r(dipo["time_s"], ce["time_s"]),
        dipo_over_ce_peak_memory=r(dipo["peak_mb"], ce["peak_mb"]),
        dipo_over_ce_peak_memory_with_ref=r(dipo["peak_mb"] + dipo["ref_input_mb"], ce["peak_mb"]),
        chunked_over_naive_peak_memory=r(dipo["peak_mb"], naive["peak_mb"]),
        chunk1024_over_ce_time=r(c1024["time_s"], ce["time_s"]),
        chunk1024_over_ce_peak_memory=r(c1024["peak_mb"], ce["peak_mb"]),
        chunk1024_over_naive_peak_memory=r(c1024["peak_mb"], naive["peak_mb"]),
    )
    if "fused_dipo" in c:
        f, ceh = c["fused_dipo"], c["ce_hidden"]
        out.update(fused_over_ce_peak_memory=r(f["peak_mb"], ceh["peak_mb"]),
                   fused_over_ce_peak_memory_with_ref=r(f["peak_mb"] + f["ref_input_mb"], ceh["peak_mb"]),
                   fused_over_ce_time=r(f["time_s"], ceh["time_s"]))
    return out


def _machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                if line.startswith("MemTotal")), None)
    return dict(device="cpu", cpu_model=model, cpu_count=os.cpu_count(), torch_threads=2,
                memory_gb=round(mem / 1e9, 1) if mem else None, torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform(),
                loadavg_at_start=os.getloadavg())


def _table(results: dict) -> str:
    rows = ["| seq × vocab | case | time (s) | peak MB (policy side) | + ref inputs MB | chunk |",
            "|---|---|---:|---:|---:|---:|"]
    for key, size in results["sizes"].items():
        for name, c in size["cases"].items():
            label = name + (f" (H={c['hidden']})" if c.get("hidden") else "")
            rows.append(f"| {key} | {label} | {c['time_s']:.3f} | {c['peak_mb']:.0f} | "
                        f"{c['ref_input_mb']:.0f} | {c.get('chunk_size', '')} |")
    rows += ["", "| seq × vocab | " + " | ".join(RATIO_KEYS) + " |",
             "|---|" + "---:|" * len(RATIO_KEYS)]
    for key, size in results["sizes"].items():
        rows.append(f"| {key} | " + " | ".join(str(size.get(k, "")) for k in RATIO_KEYS) + " |")
    return "\n".join(rows)


RATIO_KEYS = ["dipo_over_ce_peak_memory", "dipo_over_ce_peak_memory_with_ref", "dipo_over_ce_time",
              "chunked_over_naive_peak_memory", "chunk1024_over_ce_peak_memory",
              "chunk1024_over_naive_peak_memory", "chunk1024_over_ce_time",
              "fused_over_ce_peak_memory", "fused_over_ce_time"]


DOC_CASES = [("ce", "CE"), ("dipo_chunk1024", "DiPO, chunk 1024"), ("dipo", "**DiPO (default: auto chunk)**"),
             ("naive", "DiPO naive"), ("ce_hidden", "CE from hidden"), ("fused_dipo", "fused DiPO")]
DOC_RATIOS = [("dipo_over_ce_peak_memory", " (policy side)"), ("dipo_over_ce_peak_memory_with_ref", ""),
              ("chunked_over_naive_peak_memory", ""), ("dipo_over_ce_time", ""),
              ("chunk1024_over_ce_peak_memory", ""), ("chunk1024_over_naive_peak_memory", ""),
              ("chunk1024_over_ce_time", ""), ("fused_over_ce_peak_memory", " (policy side, H = {H})"),
              ("fused_over_ce_time", "")]


def doc_section(results: dict) -> str:
    """The run's tables for docs/benchmarks.md (section "Loss"): results, ratios, targets."""
    m, sizes = results["machine"], results["sizes"]
    label = lambda key: key.replace("x", " × ")  # noqa: E731
    lines = [f"**The run below** (`{results['command']}`, {results['date']}, {results['wall_s'] / 60:.1f} min; "
             f"{m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}, load average "
             f"{m['loadavg_at_start'][0]:.1f} at the start and {m['loadavg_at_end'][0]:.1f} at the end): the `dipo` "
             "case is the losses' default chunking (`chunk_size=None`: `auto_chunk_size(V)`, on the CPU "
             "`max(1, min(1024, 2**22 // V))` positions, \"auto chunk\"), `dipo_chunk1024` the first default "
             "(1024 positions).", "",
             "### Results (peak MB over the inputs / time)", "",
             "| seq × vocab | " + " | ".join(name for _, name in DOC_CASES) + " |",
             "|---|" + "---:|" * len(DOC_CASES)]
    for key, size in sizes.items():
        cells = []
        for case, _ in DOC_CASES:
            c = size["cases"].get(case)
            chunk = f" (c={c['chunk_size']})" if c and case in ("dipo", "fused_dipo") else ""
            cells.append(f"{c['peak_mb']:.0f} MB / {c['time_s']:.2f} s{chunk}" if c else "not run")
        lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | " + " | ".join(label(k) for k in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for key, note in DOC_RATIOS:
        if any(key in size for size in sizes.values()):
            values = [f"{size[key]:.2f}" if key in size else "" for size in sizes.values()]
            lines.append(f"| `{key}`{note.format(H=results['settings']['hidden'])} | " + " | ".join(values) + " |")
    target = sizes.get("2048x32000")
    if target:
        mem, naive = target["dipo_over_ce_peak_memory"], target["chunked_over_naive_peak_memory"]
        lines += ["", "### Targets (seq 2048 × vocab 32k)", "", "| target | result |", "|---|---|",
                  f"| DiPO peak memory / CE ≤ 1.3 | **{'met' if mem <= 1.3 else 'missed'}: {mem:.2f}** "
                  f"({target['dipo_over_ce_peak_memory_with_ref']:.2f} counting the reference logits as DiPO's) |",
                  f"| chunked / naive peak memory ≤ 0.5 | **{'met' if naive <= 0.5 else 'missed'}: {naive:.2f}** |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--doc", action="store_true", help="write the tables into docs/benchmarks.md")
    ap.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                    help="run nothing: write the docs tables from an earlier run's JSON")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test; ~2 min on 2 busy cores)")
    ap.add_argument("--hidden", type=int, default=None,
                    help="hidden size H of the fused cases (default 2048; 512 with --quick)")
    ap.add_argument("--reps", type=int, default=2,
                    help="timed runs of ce/dipo/dipo_chunk1024 after the warm-up (memory) run")
    ap.add_argument("--reps-naive", type=int, default=0,
                    help="timed runs of naive (0: time the memory run)")
    ap.add_argument("--reps-hidden", type=int, default=0,
                    help="timed runs of the matmul-bound hidden-state cases (0: time the memory run)")
    ap.add_argument("--no-hidden", action="store_true", help="skip the hidden-state cases")
    ap.add_argument("--fused-chunk", type=int, default=None,
                    help="chunk_size of fused_dipo (default: the module's, auto_chunk_size(V))")
    # child mode
    ap.add_argument("--case", choices=LOGIT_CASES + HIDDEN_CASES, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.case:
        print(json.dumps(run_case(args.case, args.seq, args.vocab, args.hidden, args.reps,
                                  args.fused_chunk)))
        return 0
    if args.from_json:
        from bench_assets import write_doc_section

        write_doc_section(ROOT / "docs" / "benchmarks.md", "loss", doc_section(json.loads(args.from_json.read_text())))
        return 0

    H = args.hidden or (512 if args.quick else 2048)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    started = time.time()
    results = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, "benchmarks/loss.py"] + list(sys.argv[1:] if argv is None else argv)),
        machine=_machine(),
        settings=dict(batch=1, hidden=H, dtype="float32", dipo=DIPO_KW, reps=args.reps,
                      fused_chunk=args.fused_chunk or "auto_chunk_size(V)",
                      reps_naive=args.reps_naive, reps_hidden=args.reps_hidden,
                      memory="peak RSS - RSS after inputs (MB=1e6 B)",
                      ratio_memory_side="policy side only (reference inputs not counted)"),
        sizes={},
    )
    for T, V in sizes:
        key = f"{T}x{V}"
        cases = {}
        for case in LOGIT_CASES + ([] if args.no_hidden else HIDDEN_CASES):
            reps = (args.reps_hidden if case in HIDDEN_CASES else
                    args.reps_naive if case == "naive" else args.reps)
            c = _spawn(case, T, V, H, reps, args.fused_chunk)
            cases[case] = c
            print(f"{key:>12} {case:<10} time {c['time_s']:8.3f} s   peak {c['peak_mb']:8.0f} MB",
                  file=sys.stderr, flush=True)
        results["sizes"][key] = dict(seq=T, vocab=V, cases=cases, **_ratios(cases))

    target_key = "2048x32000"
    if target_key in results["sizes"]:
        s = results["sizes"][target_key]
        results["targets"] = {
            "dipo_over_ce_peak_memory <= 1.3": s["dipo_over_ce_peak_memory"] <= 1.3,
            "chunked_over_naive_peak_memory <= 0.5": s["chunked_over_naive_peak_memory"] <= 0.5,
        }
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["wall_s"] = round(time.time() - started, 1)
    print(_table(results))
    if "targets" in results:
        print(json.dumps(results["targets"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.doc:
        from bench_assets import write_doc_section

        write_doc_section(ROOT / "docs" / "benchmarks.md", "loss", doc_section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
