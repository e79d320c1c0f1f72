"""GPU check: the real path of dipo-scale on one GPU, and the figures of its step (issue 26).

    benchmarks/gpu_check.sh                  # on the GPU check machine (one H100 or H200)
    benchmarks/gpu_check.sh --dry-run        # CPU, sizes scaled down (tests/test_gpu_check.py runs it)
    .venv/bin/python benchmarks/gpu_check.py --docs-from benchmarks/results/gpu_check.json
                                             # docs/benchmarks.md's section from a run's JSON, no run

The machine's python3 has torch and transformers but not deepspeed, ray, pydantic, ...
(../shared/docs/STACK_NOTES.md): gpu_check.sh first installs `.gpu_wheels/` (gathered here by
benchmarks/gpu_wheels.py and carried with the checkout) into a folder of its own, put on
PYTHONPATH with the repository root: the project as `pip install -e .` would make it
importable; the commands run as `python -m dipo_scale.cli`, the function the `dipo-scale`
entry point calls.

The parts, in this order. Each runs in processes of its own (a `dipo-scale` command, or this
script with `--part NAME`) under a time limit within the whole check's, so one that hangs is
stopped and the GPU memory it held is freed; each is written to the JSON as soon as it ends
(status ok / failed / skipped, seconds, its figures; on failure the error and the end of its
log), and one that fails does not stop the others.

environment  the GPU, python, torch (CUDA), transformers, deepspeed, ray, bitsandbytes, pydantic
             versions; DeepSpeed's accelerator (cuda; imported without building any op: the runs
             use torch's AdamW, `engine.make_optimizer`); nvcc; every requirement that
             `.gpu_wheels/manifest.json` leaves to the machine met by what it has.
assets       built here, nothing downloaded (benchmarks/bench_assets.py): `small`, a random-init
             Llama (hidden 256, 4 layers) with a byte-level BPE tokenizer trained on a generated
             MUSE-layout corpus, that corpus prepared with its QA pairs (the commands that
             evaluate need real text); `step`, a random-init Llama of ~1.06 B parameters
             (vocabulary 32000, hidden 2048, 18 layers, MLP 5632, 32 heads) saved in bf16, with
             random 1024-token blocks through the real `prepare` (the figures).
unlearn      `dipo-scale unlearn` on `small`: Ray Train, one worker on the GPU (nccl), DiPO with
             the online reference (a second ZeRO-3 engine), model.dtype and train.ds_config auto
             (bf16, zero3_bf16.json), 8 steps, train.checkpoint_every=4 (two checkpoints: steps 4
             and 8), train.max_failures=1, eval.every=2 on the corpus (in-training evaluation).
             When checkpoint 4 is complete on disk, the worker process (its pid in
             <out_dir>/ranks/rank0.json) is killed with SIGKILL (the fault injection lives here,
             not in the package); Ray Train must start a new worker that resumes after step 4,
             finishes and exports <out_dir>/model. Checked: exit status 0, a new worker
             resumed from step 4, log.jsonl holds steps 1..8 once each, eval.jsonl steps
             2, 4, 6, 8, checkpoints 4 and 8 complete, the exported weights finite.
reference    `dipo-scale reference` on `step` with reference.form=hidden, then topk (K 32), on the
             GPU (train.use_gpu=true: a Ray Data actor holding the GPU); each cache checked
             (`reference.cache.check_cache`: fingerprints and every shard's sha256); its
             tokens/s from the cache's manifest.
evaluate     `dipo-scale evaluate --device cuda --gpus-per-worker 1` (a Ray actor with the GPU)
             on the model `unlearn` exported (the initial `small` model if it made none; the JSON
             says which); metrics.json has every MUSE criterion; generation tokens/s = Σ items ×
             new tokens / Σ seconds of the `(generate)` loops from evaluate's progress lines
             (whole seconds under 90 s, so an upper bound for short loops, and none when every
             loop took under a second).
attack       `dipo-scale attack --kind quantize4 --device cuda` on the same model (bitsandbytes
             4-bit NF4): the `<metric>@quantize4` metrics present.
figures      on `step`, with the hidden cache `reference` wrote, one Ray Train worker on the GPU
             (nccl, DeepSpeed ZeRO-3, zero3_bf16.json, bf16) builds two training engines from the
             same weights with `engine.init_engines` (the logits path, and loss.fused=true) and
             times `unlearn.micro_step` (forward over [forget; retain] rows, loss, backward,
             optimizer step; `gd` retain term) for four variants in turn, round-robin, `warmup`
             rounds then `reps` timed rounds (medians), each bracketed by
             `torch.cuda.synchronize()`: `sft` (plain fine-tuning, logits: method GA, whose loss is
             the negated NLL: the same forward, backward and step as fine-tuning on those
             tokens), `sft_fused`, `dipo_fused` (DiPO, hidden cache, fused head: the
             configuration this check is about) and `dipo_logits`.
             - tokens/s = rows × block / step time (every position is a real token);
             - MFU = tokens/s × model FLOPs per token / the card's dense bf16 peak
               (`--peak-tflops`, 989 for both the H100 SXM and the H200). Model FLOPs per token
               = 6·N + 12·L·H·T (PaLM, appendix B: N the parameters less the input embedding,
               attention over the whole block), the same for every variant, so the FLOPs DiPO
               adds in its loss (the reference logits rebuilt from the cache) lower its MFU;
             - memory: `torch.cuda.max_memory_allocated()` during the step over the allocation
               just before it (`step_peak_gib`: activations, logits or the fused head's chunks,
               gradients, gathered parameters) and each engine's persistent allocation
               (`engine_gib`: parameters, fp32 master, optimizer state). Both engines live on
               the GPU, so the absolute peak counts the other engine too; a single run holds
               one: its peak is `engine_gib` of its engine + `step_peak_gib`, which is set
               against the planner's estimate for that variant's config
               (`dipo_scale.plan.plan_memory(cfg, num_workers=1, gpu_memory_bytes=the card's)`,
               `.total_bytes`; its error is recorded if the planner fails or is absent).

`--dry-run`: CPU (DS_ACCELERATOR=cpu, gloo, train.use_gpu=false, float32, zero3_cpu.json),
`evaluate` and `attack` with `--device cpu` in the command's own process (no actor), the sizes
scaled down (`SIZES["dry"]`), memory not measured (no CUDA allocator statistics). It checks
that every part runs, not GPU figures.

The JSON (`--json`) and docs/benchmarks.md's "GPU check" section, rewritten from it (`--docs`:
between `<!-- gpu_check:begin -->` and `<!-- gpu_check:end -->`, the rest of the file kept).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_assets import write_doc_section  # noqa: E402

SIZES = {
    "gpu": dict(small=dict(num_docs=40, vocab_size=4096, hidden_size=256, num_layers=4, intermediate_size=704,
                           block_size=256),
                step=dict(vocab_size=32000, hidden_size=2048, num_layers=18, intermediate_size=5632,
                          block_size=1024, num_blocks=4),
                warmup=2, reps=5, eval_limit=8, eval_batch=8, max_new_tokens=32, train_eval_limit=4),
    "dry": dict(small=dict(num_docs=12, vocab_size=512, hidden_size=64, num_layers=2, intermediate_size=128,
                           block_size=64),
                step=dict(vocab_size=512, hidden_size=64, num_layers=2, intermediate_size=128, block_size=64,
                          num_blocks=2),
                warmup=1, reps=2, eval_limit=4, eval_batch=4, max_new_tokens=8, train_eval_limit=2),
}
# Time limits of the parts (seconds; each also ends before the whole check's deadline).
LIMITS = {"environment": 60, "assets": 120, "unlearn": 240, "reference": 150, "evaluate": 90, "attack": 90,
          "figures": 240}
PARTS = list(LIMITS)
UNLEARN_STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 8, 4, 2
PEAK_BF16_TFLOPS = 989.0  # dense (no sparsity): H100 SXM and H200 alike
VERBMEM_NEW_TOKENS, KNOWMEM_NEW_TOKENS = 128, 32  # evaluate's defaults (dipo_scale/eval)
VARIANTS = {  # name -> overrides of the figures' run config
    "sft": ["method=ga"],
    "sft_fused": ["method=ga", "loss.fused=true"],
    "dipo_fused": ["method=dipo", "reference.form=hidden", "loss.fused=true"],
    "dipo_logits": ["method=dipo", "reference.form=hidden"],
}
DOCS_HEADING = "## GPU check"
GIB = 2 ** 30


class PartFailed(Exception):
    """A part's check did not hold; `facts` are what it measured up to there."""

    def __init__(self, message: str, facts: dict | None = None, log: Path | None = None):
        super().__init__(message)
        self.facts, self.log = facts or {}, log


# ------------------------------------------------------------------------------------------
# Running commands
# ------------------------------------------------------------------------------------------
def command_env() -> dict:
    """The environment of every command: no RAY_ADDRESS (each command starts a local Ray cluster of
    its own and stops it when it ends), Ray's files under a short temp dir of this check's."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = f"/tmp/gpuchk_{os.getpid()}"  # short: Ray's socket paths have a length limit
    return env


def cli(*args: str) -> list[str]:
    """A `dipo-scale` command line (run as `python -m dipo_scale.cli`, the entry point's function)."""
    return [sys.executable, "-m", "dipo_scale.cli", *args]


def shown(command: list[str]) -> str:
    """How the JSON and the docs show a command."""
    if command[1:3] == ["-m", "dipo_scale.cli"]:
        return " ".join(["dipo-scale", *command[3:]])
    return " ".join(["python", *(str(Path(a).relative_to(ROOT)) if a == __file__ else a for a in command[1:])])


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


RUNNING: list[subprocess.Popen] = []  # the commands started, stopped if the check itself is interrupted


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Start `command` in a process group of its own (the local Ray cluster it starts joins it)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=command_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    RUNNING.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Ctrl-C to the command's process group (its driver shuts its Ray cluster down), then SIGKILL
    to whatever of the group is left after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        end = time.time() + grace
        while time.time() < end:
            proc.poll()  # reap the leader, so that a finished group is gone
            os.killpg(proc.pid, 0)  # ProcessLookupError once no process of the group is left
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(command: list[str], log: Path, limit: float) -> str:
    """Run `command` to its end within `limit` seconds; its output (also in `log`). A non-zero exit
    status or the time limit fails the part."""
    proc = start(command, log)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise PartFailed(f"`{shown(command)}` still running after {limit:.0f} s: stopped", log=log) from None
    stop(proc, grace=5.0)  # anything it left behind
    output = log.read_text(errors="replace")
    if code != 0:
        raise PartFailed(f"`{shown(command)}` exited {code}: {last_error_line(output)}", log=log)
    return output


def last_error_line(output: str) -> str:
    """The line that says why a command failed: its `error: ...` line, else the last line naming
    an error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[:400]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error)\b", line):
            return line[:400]
    return (lines[-1] if lines else "no output")[:400]


def one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:400]


def tail(log: Path | None, lines: int = 25) -> str | None:
    if log is None or not log.is_file():
        return None
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])[-4000:]


def run_part_process(ctx: dict, name: str, limit: float) -> dict:
    """This script with `--part NAME` (a process of its own); returns what the part wrote."""
    out = Path(ctx["work"]) / f"part_{name}.json"
    out.unlink(missing_ok=True)
    context = Path(ctx["work"]) / "context.json"
    context.write_text(json.dumps(ctx))
    run([sys.executable, __file__, "--part", name, "--context", str(context), "--result", str(out)],
        Path(ctx["work"]) / f"{name}.log", limit)
    result = json.loads(out.read_text())
    if "error" in result:
        raise PartFailed(result["error"], result.get("facts"), log=Path(ctx["work"]) / f"{name}.log")
    return result


# ------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------
def environment_facts(ctx: dict) -> dict:
    """(--part environment) Versions, the GPU, DeepSpeed's accelerator, the machine's packages."""
    import torch
    import transformers

    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
             "nvcc": shutil.which("nvcc"), "cuda_available": torch.cuda.is_available()}
    problems = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpus=torch.cuda.device_count())
    elif not ctx["dry"]:
        problems.append("torch sees no CUDA device")
    t0 = time.perf_counter()
    try:  # no op is built here: the runs use torch's AdamW (engine.make_optimizer)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        facts.update(deepspeed=deepspeed.__version__, deepspeed_import_seconds=round(time.perf_counter() - t0, 2),
                     deepspeed_accelerator=get_accelerator().device_name())
        if facts["deepspeed_accelerator"] != ("cpu" if ctx["dry"] else "cuda"):
            problems.append(f"DeepSpeed's accelerator is {facts['deepspeed_accelerator']}")
    except Exception as e:  # noqa: BLE001  (recorded: the part fails)
        problems.append(f"DeepSpeed's accelerator: {type(e).__name__}: {one_line(e)}")
    site = os.environ.get("GPU_CHECK_SITE")  # where gpu_check.sh installed the wheels
    facts["from_wheels"] = []
    for module in ("deepspeed", "ray", "pydantic", "datasets", "bitsandbytes", "rouge_score"):
        try:
            mod = __import__(module)
        except Exception as e:  # noqa: BLE001  (recorded: the part fails)
            problems.append(f"import {module}: {type(e).__name__}: {one_line(e)}")
            continue
        facts[module] = getattr(mod, "__version__", None) or importlib.metadata.version(module.replace("_", "-"))
        if site and str(mod.__file__).startswith(site):
            facts["from_wheels"].append(module)
    manifest = ROOT / ".gpu_wheels" / "manifest.json"
    if site and manifest.is_file():  # what the wheels leave to the machine, against what it has
        from packaging.specifiers import SpecifierSet

        unmet = []
        for name, specs in json.loads(manifest.read_text())["on_the_machine"].items():
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                unmet.append(f"{name} (absent)")
                continue
            wanted = SpecifierSet(",".join(specs))
            if not wanted.contains(version, prereleases=True):
                unmet.append(f"{name} {version} (needs {wanted})")
        facts["machine_requirements_unmet"] = unmet
        if unmet:
            problems.append(f"the machine's packages miss what the wheels need: {', '.join(unmet)}")
    if problems:
        raise PartFailed("; ".join(problems), facts)
    return facts


def build_assets(ctx: dict) -> dict:
    """(--part assets) The `small` and `step` models and their data (module docstring)."""
    from bench_assets import build_bench_assets, corpus_assets, num_parameters

    work, sizes = Path(ctx["work"]), SIZES[ctx["sizes"]]
    t0 = time.perf_counter()
    small = corpus_assets(work / "small", **sizes["small"])
    t1 = time.perf_counter()
    step = build_bench_assets(work / "step", **sizes["step"], dtype="float32" if ctx["dry"] else "bfloat16",
                              device="cpu" if ctx["dry"] else "cuda")
    return {"small": {k: str(v) for k, v in small.items()}, "step": {k: str(v) for k, v in step.items()},
            "small_parameters": num_parameters(small["model"]), "step_parameters": num_parameters(step["model"]),
            "small_seconds": round(t1 - t0, 1), "step_seconds": round(time.perf_counter() - t1, 1)}


def unlearn_settings(ctx: dict, out_dir: Path) -> list[str]:
    small, sizes, dry = ctx["assets"]["small"], SIZES[ctx["sizes"]], ctx["dry"]
    return [f"model.path={small['model']}", f"data.prepared_dir={small['prepared']}", f"out_dir={out_dir}",
            "method=dipo", f"train.use_gpu={'false' if dry else 'true'}", "train.num_workers=1",
            "train.ds_config=auto", "model.dtype=auto", f"train.steps={UNLEARN_STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.max_failures=1", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.lr=1e-4", f"eval.every={EVAL_EVERY}", f"eval.data_dir={small['corpus']}",
            f"eval.limit={sizes['train_eval_limit']}", "eval.batch_size=4", "eval.verbmem_max_new_tokens=16",
            "eval.knowmem_max_new_tokens=8", "logging.wandb=disabled"]


def wait_for(condition, proc: subprocess.Popen, deadline: float, what: str, log: Path):
    """Poll `condition()` until it gives a true value (returned); the run must still be going."""
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise PartFailed(f"the run ended (exit {proc.returncode}) before {what}: "
                             f"{last_error_line(log.read_text(errors='replace'))}", log=log)
        if time.time() > deadline:
            stop(proc)
            raise PartFailed(f"no {what} before the part's time limit", log=log)
        time.sleep(0.05)


def _kill_after_first_checkpoint(proc: subprocess.Popen, root: Path, rank0: Path, deadline: float, log: Path,
                                 facts: dict) -> tuple[int, int]:
    """The fault injection: once a checkpoint is complete on disk, SIGKILL the worker whose pid
    rank0.json holds; wait for the new worker Ray Train starts, then for the run's end. Returns (the
    run's exit status, the newest complete checkpoint's step when the worker was killed); `facts`
    gets the timings."""
    from dipo_scale.checkpoint import complete_checkpoints

    started = time.time()
    wait_for(lambda: complete_checkpoints(root), proc, deadline, "a complete checkpoint on disk", log)
    victim = json.loads(rank0.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)  # the worker dies at once, as on a lost node
    killed_at = time.time()
    on_disk = complete_checkpoints(root)[-1][0]
    facts.update(first_checkpoint_seconds=round(killed_at - started, 1), killed_pid=victim,
                 killed_after_checkpoint=on_disk)

    def new_worker():
        try:
            record = json.loads(rank0.read_text())
        except (OSError, ValueError):  # being rewritten
            return None
        return record if record["pid"] != victim else None

    resumed = wait_for(new_worker, proc, deadline, "a new worker after the kill", log)
    facts.update(kill_to_new_worker_seconds=round(time.time() - killed_at, 1),
                 resumed_from_step=resumed.get("resumed_from_step"))
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        stop(proc)
        raise PartFailed("the resumed run did not end within the part's time limit", log=log) from None
    stop(proc, grace=5.0)  # anything it left behind
    return code, on_disk


def part_unlearn(ctx: dict, limit: float) -> dict:
    """`dipo-scale unlearn` killed after its first checkpoint, resumed, exported (module docstring)."""
    import torch
    from safetensors.torch import load_file

    from dipo_scale.checkpoint import complete_checkpoints
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.unlearn import checkpoint_root

    work = Path(ctx["work"])
    out_dir, log = work / "unlearn", work / "unlearn.log"
    settings = unlearn_settings(ctx, out_dir)
    root = checkpoint_root(load_unlearn_config(None, settings))
    command = cli("unlearn", *sets(*settings))
    facts: dict = {"command": shown(command), "steps": UNLEARN_STEPS, "checkpoint_every": CHECKPOINT_EVERY}
    t0 = time.time()
    deadline = t0 + limit
    proc = start(command, log)
    try:
        code, on_disk = _kill_after_first_checkpoint(proc, root, out_dir / "ranks" / "rank0.json", deadline, log, facts)
    except PartFailed as e:
        e.facts = {**facts, **e.facts}
        raise
    facts["seconds_to_end"] = round(time.time() - t0, 1)
    output = log.read_text(errors="replace")
    if code != 0:
        raise PartFailed(f"the run exited {code} after the kill: {last_error_line(output)}", facts, log)

    problems = []
    if on_disk >= UNLEARN_STEPS:
        problems.append(f"the kill came after the run's last checkpoint (step {on_disk}): nothing was resumed")
    elif facts["resumed_from_step"] != on_disk:
        problems.append(f"the new worker resumed from step {facts['resumed_from_step']}, not {on_disk} (the newest "
                        "complete checkpoint when the worker was killed)")
    facts["resume_line_seen"] = f"resuming after step {on_disk}" in output
    steps = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    if [s["step"] for s in steps] != list(range(1, UNLEARN_STEPS + 1)):
        problems.append(f"log.jsonl steps {[s['step'] for s in steps]}, not 1..{UNLEARN_STEPS} once each")
    facts["step_time_s_median"] = round(statistics.median(s["step_time_s"] for s in steps), 4)
    facts["final_loss"] = steps[-1]["loss"] if steps else None
    evals = [json.loads(line) for line in (out_dir / "eval.jsonl").read_text().splitlines()] \
        if (out_dir / "eval.jsonl").is_file() else []
    facts["eval_steps"] = [e["step"] for e in evals]
    facts["eval_seconds"] = [e.get("seconds") for e in evals]
    if facts["eval_steps"] != list(range(EVAL_EVERY, UNLEARN_STEPS + 1, EVAL_EVERY)):
        problems.append(f"eval.jsonl steps {facts['eval_steps']}")
    if evals and "knowmem_f" not in evals[-1]:
        problems.append(f"eval.jsonl has no knowmem_f: {sorted(evals[-1])}")
    facts["checkpoints"] = [s for s, _ in complete_checkpoints(root)]
    if facts["checkpoints"] != [CHECKPOINT_EVERY, UNLEARN_STEPS]:
        problems.append(f"complete checkpoints {facts['checkpoints']}, not [{CHECKPOINT_EVERY}, {UNLEARN_STEPS}]")
    weights_file = out_dir / "model" / "model.safetensors"
    if not weights_file.is_file():
        problems.append(f"no export at {weights_file}")
    else:
        weights = load_file(weights_file)
        bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
        facts.update(exported_tensors=len(weights), exported_dtypes=sorted({str(v.dtype) for v in weights.values()}),
                     non_finite_tensors=bad[:5])
        if bad:
            problems.append(f"non-finite exported weights in {len(bad)} tensors, e.g. {bad[0]}")
    if problems:
        raise PartFailed("; ".join(problems), facts, log)
    facts["model"] = str(out_dir / "model")
    return facts


def reference_settings(ctx: dict, form: str) -> list[str]:
    step, dry = ctx["assets"]["step"], ctx["dry"]
    return [f"model.path={step['model']}", f"data.prepared_dir={step['prepared']}", "method=dipo", "loss.retain=gd",
            f"out_dir={Path(ctx['work']) / 'figures_run'}", f"train.use_gpu={'false' if dry else 'true'}",
            "model.dtype=auto", "reference.dtype=auto", f"reference.form={form}", "reference.k=32",
            f"reference.cache_dir={Path(ctx['work']) / f'cache_{form}'}", "reference.batch_size=2",
            "logging.wandb=disabled"]


def part_reference(ctx: dict, limit: float) -> dict:
    """`dipo-scale reference` hidden, then topk, on the GPU; each cache checked."""
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.reference.cache import check_cache

    facts, deadline = {}, time.time() + limit
    for form in ("hidden", "topk"):
        settings = reference_settings(ctx, form)
        command = cli("reference", *sets(*settings))
        t0 = time.time()
        run(command, Path(ctx["work"]) / f"reference_{form}.log", deadline - time.time())
        seconds = time.time() - t0
        check_cache(load_unlearn_config(None, settings))  # fingerprints against the run, every shard's sha256
        m = json.loads((Path(ctx["work"]) / f"cache_{form}" / "manifest.json").read_text())
        p = m["precompute"]
        facts[form] = {"command": shown(command), "seconds": round(seconds, 1), "tokens": p["tokens_computed"],
                       "tokens_per_second_computing": p["tokens_per_second_computing"],
                       "bytes_per_token": m["bytes_per_token"], "total_bytes": m["total_bytes"], "dtype": m["dtype"],
                       "workers": p["num_workers"]}
    return facts


def evaluation_model(ctx: dict) -> tuple[str, str]:
    """(model, which): the model `unlearn` exported, else the initial `small` model."""
    exported = ctx["parts"].get("unlearn", {}).get("model")
    if exported and Path(exported, "model.safetensors").is_file():
        return exported, "the unlearn part's export"
    return ctx["assets"]["small"]["model"], "the initial small model (the unlearn part exported none)"


def evaluate_args(ctx: dict, out: Path) -> list[str]:
    sizes, model = SIZES[ctx["sizes"]], evaluation_model(ctx)[0]
    where = ["--device", "cpu"] if ctx["dry"] else ["--device", "cuda"]
    return ["--model", model, "--data", ctx["assets"]["small"]["corpus"], "--out", str(out), *where,
            "--limit", str(sizes["eval_limit"]), "--batch-size", str(sizes["eval_batch"]),
            "--max-new-tokens", str(sizes["max_new_tokens"])]


def _seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def generation_rate(output: str, max_new_tokens: int) -> dict:
    """Generated tokens and tokens/s of the `(generate)` loops evaluate's progress lines report."""
    loops = re.findall(r"eval (\S+) \(generate\): done, (\d+) items in ([\d.]+ (?:s|min|h))", output)
    per_loop = {}
    for criterion, n, t in loops:  # evaluate caps each criterion's default at --max-new-tokens
        new = min(KNOWMEM_NEW_TOKENS if criterion.startswith("knowmem") else VERBMEM_NEW_TOKENS, max_new_tokens)
        per_loop[criterion] = {"items": int(n), "new_tokens": new, "tokens": int(n) * new, "seconds": _seconds(t)}
    tokens = sum(v["tokens"] for v in per_loop.values())
    seconds = sum(v["seconds"] for v in per_loop.values())
    return {"generate_loops": per_loop, "generated_tokens": tokens, "generate_seconds": seconds,
            "generation_tokens_per_second": tokens / seconds if seconds else None}


def loaded_on(output: str) -> list[str]:
    """evaluate's lines saying where each model was loaded."""
    return [line.strip()[:200] for line in output.splitlines() if re.search(r"\b(cuda|cpu) \(", line)][:4]


def part_evaluate(ctx: dict, limit: float) -> dict:
    """`dipo-scale evaluate --device cuda --gpus-per-worker 1` (an actor with the GPU)."""
    out = Path(ctx["work"]) / "evaluate"
    actor = [] if ctx["dry"] else ["--gpus-per-worker", "1"]
    command = cli("evaluate", *evaluate_args(ctx, out), *actor)
    output = run(command, Path(ctx["work"]) / "evaluate.log", limit)
    metrics = json.loads((out / "metrics.json").read_text())
    facts = {"command": shown(command), "model": evaluation_model(ctx)[1], "loaded": loaded_on(output),
             "metrics": {k: v for k, v in metrics.items() if not isinstance(v, list)},
             **generation_rate(output, SIZES[ctx["sizes"]]["max_new_tokens"])}
    missing = [k for k in ("verbmem_f", "knowmem_f", "knowmem_r", "mia_auc") if k not in metrics]
    if missing:
        raise PartFailed(f"metrics.json lacks {', '.join(missing)}", facts, Path(ctx["work"]) / "evaluate.log")
    return facts


def part_attack(ctx: dict, limit: float) -> dict:
    """`dipo-scale attack --kind quantize4 --device cuda`."""
    out = Path(ctx["work"]) / "attack"
    command = cli("attack", *evaluate_args(ctx, out), "--kind", "quantize4")
    output = run(command, Path(ctx["work"]) / "attack.log", limit)
    metrics = json.loads((out / "metrics.json").read_text())
    after = {k: v for k, v in metrics.items() if "@quantize4" in k and not isinstance(v, list)}
    facts = {"command": shown(command), "model": evaluation_model(ctx)[1], "loaded": loaded_on(output),
             "metrics_after": after}
    if not any(k.startswith("knowmem_f@quantize4") for k in after):
        raise PartFailed(f"metrics.json has no knowmem_f@quantize4: {sorted(metrics)}", facts,
                         Path(ctx["work"]) / "attack.log")
    return facts


def figures_configs(ctx: dict) -> dict:
    """The four variants' run configs (`VARIANTS`) on the `step` model."""
    from dipo_scale.config import load_unlearn_config

    rows = SIZES[ctx["sizes"]]["step"]["num_blocks"]
    common = reference_settings(ctx, "hidden") + [
        "train.num_workers=1", "train.ds_config=auto", f"train.global_batch_size={rows}",
        f"train.micro_batch_size={rows}", "train.lr=1e-5"]
    return {name: load_unlearn_config(None, common + overrides) for name, overrides in VARIANTS.items()}


def check_worker(config: dict) -> None:
    """The Ray Train worker of the figures: two engines, the four variants timed round-robin."""
    import numpy as np
    import ray.train
    import torch

    from dipo_scale.config import UnlearnConfig
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference import ReferenceCache
    from dipo_scale.engine import init_engines, load_ds_config
    from dipo_scale.unlearn import micro_step

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
        return seconds, (peak - start_bytes) / GIB, peak / GIB

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
        "engine_gib": {k: v / GIB for k, v in engine_bytes.items()} if gpu else None,
        # the caching allocator's pool at the end (both engines; it only grows, nothing empties it)
        "reserved_gib": torch.cuda.memory_reserved() / GIB if gpu else None,
        "device": torch.cuda.get_device_name() if gpu else "cpu"}))


def flops_per_token(model_dir: Path, block: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token: 6·N + 12·L·H·T, N without the input embedding)."""
    from transformers import AutoConfig

    from bench_assets import num_parameters

    config = AutoConfig.from_pretrained(model_dir)
    params = num_parameters(model_dir)
    n = params - config.vocab_size * config.hidden_size  # the input embedding is a lookup
    return params, 6 * n + 12 * config.num_hidden_layers * config.hidden_size * block


def planned_memory(cfg, gpu_memory_bytes: int | None) -> dict:
    """The planner's estimate for one worker of `cfg` (`dipo_scale.plan.plan_memory`), or its error."""
    try:
        from dipo_scale.plan import plan_memory
    except ImportError as e:
        return {"error": f"dipo_scale.plan.plan_memory not available ({e})"}
    try:
        plan = plan_memory(cfg, num_workers=1, gpu_memory_bytes=gpu_memory_bytes)
        return {"total_bytes": int(plan.total_bytes), "rows": _jsonable(plan.rows)}
    except Exception as e:  # noqa: BLE001  (recorded beside the measurement)
        return {"error": f"plan_memory: {type(e).__name__}: {one_line(e)}"}


def _jsonable(value):
    """`value` as JSON can hold it (dataclasses and named tuples as dicts, the rest as text)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "_asdict"):
        return _jsonable(value._asdict())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def measure_figures(ctx: dict) -> dict:
    """(--part figures) The step figures and memory against the planner (module docstring)."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dry, sizes = ctx["dry"], SIZES[ctx["sizes"]]
    work = Path(ctx["work"])
    cache = work / "cache_hidden"
    if not (cache / "manifest.json").is_file():
        raise PartFailed(f"no hidden cache at {cache} (the reference part wrote none)")
    cfgs = figures_configs(ctx)
    out = work / "times.json"
    # a cluster of its own, with the dashboard (Ray Train's placement-group cleaner asks its state API)
    from dipo_scale.cluster import local_dashboard

    ray.init(address="local", log_to_driver=True, **local_dashboard(),
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"} if dry else {}})
    try:
        TorchTrainer(check_worker,
                     train_loop_config={"cfgs": {n: c.model_dump(by_alias=True) for n, c in cfgs.items()},
                                        "cache": str(cache), "gpu": not dry, "warmup": sizes["warmup"],
                                        "reps": sizes["reps"], "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=1, use_gpu=not dry),
                     torch_config=TorchConfig(backend="gloo" if dry else "nccl"),
                     run_config=RunConfig(name="gpu_check", storage_path=str(work / "figures_ray"))).fit()
    finally:
        ray.shutdown()
    measured = json.loads(out.read_text())
    rows, block = sizes["step"]["num_blocks"], sizes["step"]["block_size"]
    params, flops = flops_per_token(Path(ctx["assets"]["step"]["model"]), block)
    tokens = 2 * rows * block
    peak_tflops = ctx["peak_tflops"]
    variants = {}
    for name, ts in measured["times"].items():
        seconds = statistics.median(ts)
        peaks = [p for p in measured["step_peak_gib"][name] if p is not None]
        absolute = [p for p in measured["absolute_peak_gib"][name] if p is not None]
        variants[name] = {"step_seconds": seconds, "step_seconds_all": ts, "tokens_per_second": tokens / seconds,
                          "mfu": tokens / seconds * flops / (peak_tflops * 1e12),
                          "step_peak_gib": max(peaks) if peaks else None,
                          "absolute_peak_gib": max(absolute) if absolute else None}

    def ratio(a, b, key):
        return variants[a][key] / variants[b][key] if variants[a][key] is not None and variants[b][key] else None

    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if not dry else None
    memory = {}
    for name, cfg in cfgs.items():  # one run of this variant: its engine + its step's peak, against the plan
        engine = "fused" if cfg.loss.fused else "logits"
        measured_gib = (measured["engine_gib"][engine] + variants[name]["step_peak_gib"]
                        if measured["engine_gib"] and variants[name]["step_peak_gib"] is not None else None)
        plan = planned_memory(cfg, gpu_bytes)
        planned_gib = plan["total_bytes"] / GIB if "total_bytes" in plan else None
        memory[name] = {"measured_single_run_gib": measured_gib, "planned_gib": planned_gib,
                        "planned_over_measured": planned_gib / measured_gib if planned_gib and measured_gib else None,
                        "plan": plan}
    return {
        "device": measured["device"], "peak_tflops": peak_tflops, "gpu_memory_bytes": gpu_bytes,
        "model": {"parameters": params, "vocab": sizes["step"]["vocab_size"], "hidden": sizes["step"]["hidden_size"],
                  "layers": sizes["step"]["num_layers"], "intermediate": sizes["step"]["intermediate_size"],
                  "dtype": cfgs["dipo_fused"].model_dtype, "block": block, "rows": rows, "tokens_per_step": tokens,
                  "flops_per_token": flops, "ds_config": cfgs["dipo_fused"].ds_config_name},
        "warmup": sizes["warmup"], "reps": sizes["reps"], "variants": variants, "engine_gib": measured["engine_gib"],
        "reserved_gib": measured["reserved_gib"],
        "ratios": {"dipo_fused_over_sft_step_time": ratio("dipo_fused", "sft", "step_seconds"),
                   "dipo_fused_over_sft_fused_step_time": ratio("dipo_fused", "sft_fused", "step_seconds"),
                   "dipo_fused_over_sft_mfu": ratio("dipo_fused", "sft", "mfu"),
                   "fused_over_logits_dipo_step_peak_memory": ratio("dipo_fused", "dipo_logits", "step_peak_gib"),
                   "fused_over_logits_sft_step_peak_memory": ratio("sft_fused", "sft", "step_peak_gib")},
        "memory_vs_plan": memory,
    }


IN_PROCESS = {"environment": environment_facts, "assets": build_assets, "figures": measure_figures}
# what a part needs from those before it (evaluate and attack take the initial model when unlearn made none)
NEEDS = {"unlearn": ["assets"], "reference": ["assets"], "evaluate": ["assets"], "attack": ["assets"],
         "figures": ["assets", "reference"]}


def run_part(ctx: dict, name: str, limit: float) -> dict:
    if name in IN_PROCESS:
        return run_part_process(ctx, name, limit)
    return {"unlearn": part_unlearn, "reference": part_reference, "evaluate": part_evaluate,
            "attack": part_attack}[name](ctx, limit)


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def part_summary(name: str, part: dict) -> str:
    """One line of what a part showed."""
    if part["status"] != "ok":
        return (part.get("error") or "")[:300]
    if name == "environment":
        return (f"{part.get('gpu') or 'CPU'}; python {part['python']}, torch {part['torch']} "
                f"({'CUDA ' + part['cuda'] if part.get('cuda') else 'no CUDA'}), "
                f"transformers {part['transformers']}, deepspeed {part['deepspeed']} ({part['deepspeed_accelerator']} "
                f"accelerator), ray {part.get('ray')}, bitsandbytes {part.get('bitsandbytes')}")
    if name == "assets":
        return (f"small {_params(part['small_parameters'])} parameters ({part['small_seconds']:.0f} s), "
                f"step {_params(part['step_parameters'])} ({part['step_seconds']:.0f} s)")
    if name == "unlearn":
        return (f"worker killed after checkpoint {part['killed_after_checkpoint']} "
                f"({part['first_checkpoint_seconds']:.0f} s in), a new one in {part['kill_to_new_worker_seconds']:.0f} s "
                f"resumed from step {part['resumed_from_step']}; steps 1..{part['steps']} once each, evaluations at "
                f"steps {part['eval_steps']}, checkpoints {part['checkpoints']}, {part['exported_tensors']} exported "
                f"tensors finite; median step {part['step_time_s_median']:.3f} s")
    if name == "reference":
        return "; ".join(f"{form}: {r['tokens']} tokens, {_fmt(r['tokens_per_second_computing'], ',.0f')} tokens/s "
                         f"computing, {r['bytes_per_token']} bytes/token, {r['seconds']:.0f} s as a command"
                         for form, r in part.items() if isinstance(r, dict) and "tokens" in r)
    if name == "evaluate":
        rate = part.get("generation_tokens_per_second")
        return (f"on {part['model']}; " + (f"generation {rate:,.0f} tokens/s" if rate else
                                           "every generate loop under evaluate's 1 s resolution (no rate)")
                + f"; {', '.join(f'{k} {v:.3g}' for k, v in part['metrics'].items() if k in ('knowmem_f', 'mia_auc'))}")
    if name == "attack":
        return f"on {part['model']}; " + ", ".join(f"{k} {v:.3g}" for k, v in part["metrics_after"].items()
                                                  if not k.endswith("_recovery"))[:200]
    if name == "figures":
        r = part["ratios"]
        return (f"dipo_fused over sft: step time {_fmt(r['dipo_fused_over_sft_step_time'])}, "
                f"MFU {_fmt(r['dipo_fused_over_sft_mfu'])}")
    return ""


def render_section(result: dict, json_name: str | None = None) -> str:
    """docs/benchmarks.md's "GPU check" section, from the JSON."""
    dry, parts = result["dry_run"], result["parts"]
    lines = [DOCS_HEADING, ""]
    if dry:
        lines += ["**Dry run on CPU (not a GPU measurement):** `benchmarks/gpu_check.sh --dry-run` checked that",
                  "every part runs, with the sizes scaled down; the figures below are CPU figures of toy models",
                  "and say nothing about a GPU.", ""]
    ok = sum(p["status"] == "ok" for p in parts.values())
    lines += [f"`{result['command']}` (what each part does and measures: `benchmarks/gpu_check.py`'s docstring), run",
              f"{result['date_utc']} on {result['device']}"
              + (f" (commit {result['commit'][:10]}{' with uncommitted changes' * result['commit'].endswith('-dirty')})"
                 if result.get("commit") else "")
              + f", {result['wall_seconds']:.0f} s in the script"
              + (f" after {result['setup_seconds']:.0f} s of set-up"
                 + (" (the wheels' install included)" if result.get("wheels_installed") else "")
                 if result.get("setup_seconds") else "")
              + f": **{ok} of {len(parts)} parts passed.**", "",
              "| part | status | seconds | what it showed |", "|---|---|---:|---|"]
    for name, part in parts.items():
        lines.append(f"| {name} | {part['status']} | {_fmt(part.get('seconds'), '.0f')} | "
                     f"{part_summary(name, part).replace('|', '/')} |")
    fig = parts.get("figures", {})
    if fig.get("status") == "ok":
        m, v = fig["model"], fig["variants"]
        size = _params(m["parameters"])
        lines += ["", f"**The step** (part `figures`): random-init Llama shape, {size} parameters (vocabulary "
                      f"{m['vocab']}, hidden {m['hidden']}, {m['layers']} layers), {m['dtype']}, DeepSpeed ZeRO-3 "
                      f"(`{m['ds_config']}`) on one {'GPU' if not dry else 'CPU worker'}; {m['rows']} forget + "
                      f"{m['rows']} retain rows of {m['block']} tokens per step ({m['tokens_per_step']} tokens); "
                      f"medians of {fig['reps']} steps after {fig['warmup']}; MFU against {fig['peak_tflops']:g} "
                      f"TFLOPS (dense bf16), {m['flops_per_token'] / 1e9:.2f} GFLOP per token.", "",
                  "| variant | step time | tokens/s | MFU | step peak (GiB over the step's start) |",
                  "|---|---:|---:|---:|---:|"]
        names = {"sft": "plain fine-tuning (logits)", "sft_fused": "plain fine-tuning, fused head",
                 "dipo_fused": "**DiPO, fused head, hidden cache**", "dipo_logits": "DiPO, logits, hidden cache"}
        for name, row in v.items():
            peak = "not measured (CPU)" if row["step_peak_gib"] is None else f"{row['step_peak_gib']:.2f}"
            lines.append(f"| {names.get(name, name)} | {row['step_seconds']:.3f} s | {row['tokens_per_second']:,.0f} "
                         f"| {100 * row['mfu']:.1f} % | {peak} |")
        r = fig["ratios"]
        lines += ["", f"- `dipo_fused_over_sft_step_time` = **{_fmt(r['dipo_fused_over_sft_step_time'])}** "
                      f"(MFU ratio {_fmt(r['dipo_fused_over_sft_mfu'])}); over fused fine-tuning "
                      f"{_fmt(r['dipo_fused_over_sft_fused_step_time'])}."]
        if r.get("fused_over_logits_dipo_step_peak_memory") is not None:
            engines = ", ".join(f"{k} {g:.2f} GiB" for k, g in fig["engine_gib"].items())
            lines.append(f"- `fused_over_logits_dipo_step_peak_memory` = "
                         f"**{r['fused_over_logits_dipo_step_peak_memory']:.2f}** (fine-tuning: "
                         f"{_fmt(r['fused_over_logits_sft_step_peak_memory'])}); engines: {engines}"
                         + (f"; the allocator's pool at the end {fig['reserved_gib']:.2f} GiB (both engines)."
                            if fig.get("reserved_gib") else "."))
        lines += ["", "Memory of one run of each variant (its engine + its step's peak) against the planner "
                      "(`dipo_scale.plan.plan_memory`):", "",
                  "| variant | measured GiB | planned GiB | planned / measured |", "|---|---:|---:|---:|"]
        for name, row in fig["memory_vs_plan"].items():
            planned = _fmt(row["planned_gib"]) if row["planned_gib"] is not None else \
                f"— ({row['plan'].get('error', 'no estimate')[:120]})"
            measured = _fmt(row["measured_single_run_gib"], ".2f", "not measured (CPU)")
            lines.append(f"| {names.get(name, name)} | {measured} | {planned} | {_fmt(row['planned_over_measured'])} |")
    failed = [(n, p) for n, p in parts.items() if p["status"] == "failed"]
    if failed:
        lines += ["", "Failures (the end of each log is in the JSON):", ""]
        lines += [f"- `{n}`: {p.get('error', '')[:500]}" for n, p in failed]
    lines += ["", f"Raw figures: the JSON the script wrote, `{json_name or result['json']}`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------
def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def git_commit() -> str | None:
    """The commit the check ran (GPU_CHECK_COMMIT where the checkout has no .git), with "-dirty" when
    tracked files differ from it."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, sizes scaled down")
    parser.add_argument("--json", default=None, help="results (default: <work>/gpu_check.json)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"),
                        help="the markdown file whose GPU section is rewritten ('' : none)")
    parser.add_argument("--work", default=None, help="models, data, runs, logs (default: a temporary directory)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="the card's dense bf16 peak")
    parser.add_argument("--deadline", type=float, default=None,
                        help="epoch seconds by which the script must have ended (gpu_check.sh sets it)")
    parser.add_argument("--docs-from", default=None, metavar="JSON",
                        help="rewrite the docs section from this JSON and exit (no run)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.part:  # a part in a process of its own (run_part_process)
        ctx = json.loads(Path(args.context).read_text())
        try:
            result = IN_PROCESS[args.part](ctx)
        except PartFailed as e:
            result = {"error": str(e), "facts": e.facts}
        except Exception as e:  # noqa: BLE001  (recorded as the part's failure)
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {one_line(e)}"}
        write_json(Path(args.result), result)
        return 0

    if args.docs_from:
        result = json.loads(Path(args.docs_from).read_text())
        write_doc_section(Path(args.docs), "gpu_check", render_section(result, json_name=args.docs_from))
        return 0

    t_start = time.time()
    dry = args.dry_run
    if dry:
        os.environ["DS_ACCELERATOR"] = "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json or work / "gpu_check.json").resolve()
    deadline = args.deadline or t_start + sum(LIMITS.values())
    ctx = {"work": str(work), "dry": dry, "sizes": "dry" if dry else "gpu", "peak_tflops": args.peak_tflops,
           "parts": {}}
    shown_args = [a for a in (sys.argv[1:] if argv is None else argv)]
    if "--deadline" in shown_args:  # gpu_check.sh's own argument, not the user's
        del shown_args[shown_args.index("--deadline"):shown_args.index("--deadline") + 2]
    result = {"dry_run": dry, "command": " ".join(["benchmarks/gpu_check.sh", *shown_args]),
              "commit": git_commit(), "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": "cpu" if dry else "unknown", "setup_seconds": float(os.environ.get("GPU_CHECK_SETUP_S") or 0),
              "wheels_installed": os.environ.get("GPU_CHECK_WHEELS_INSTALLED") == "1",
              "deadline_seconds": round(deadline - t_start), "json": str(json_path), "work": str(work),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
              "parts": {}}
    interrupted = False
    for name in PARTS:
        missing = [n for n in NEEDS.get(name, ()) if n not in ctx["parts"]]
        left = deadline - time.time() - 10  # the JSON and the docs after the last part
        t0 = time.time()
        if missing:
            part = {"status": "skipped", "error": f"needs the {' and '.join(missing)} part{'s' * (len(missing) > 1)}"}
        elif left < 20:
            part = {"status": "skipped", "error": f"{left:.0f} s left of the check's time"}
        else:
            print(f"gpu_check: {name} (limit {min(LIMITS[name], left):.0f} s)", flush=True)
            try:
                facts = run_part(ctx, name, min(LIMITS[name], left))
                part = {"status": "ok", **facts}
                ctx["parts"][name] = facts
                if name == "assets":
                    ctx["assets"] = facts
            except PartFailed as e:
                part = {"status": "failed", "error": str(e), **e.facts, "log_tail": tail(e.log)}
            except KeyboardInterrupt:  # gpu_check.sh's time limit (or Ctrl-C): stop what runs, keep the JSON
                for proc in RUNNING:
                    stop(proc, grace=5.0)
                part = {"status": "failed", "error": "interrupted: the whole check's time limit"}
                interrupted = True
            except Exception as e:  # noqa: BLE001  (a bug of the check itself: recorded, the rest still runs)
                part = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500],
                        "traceback": traceback.format_exc()[-3000:]}
        part["seconds"] = round(time.time() - t0, 1)
        result["parts"][name] = part
        if name == "environment" and part.get("gpu"):
            result["device"] = part["gpu"]
        print(f"gpu_check: {name}: {part['status']} in {part['seconds']:.0f} s"
              + (f": {part.get('error')}" if part["status"] != "ok" else ""), flush=True)
        result["wall_seconds"] = round(time.time() - t_start, 1)
        write_json(json_path, result)
        if interrupted:
            break
    shutil.rmtree(command_env()["RAY_TMPDIR"], ignore_errors=True)  # the commands' Ray files (their logs are in work)
    result["machine"]["load_average"] = list(os.getloadavg())
    result["wall_seconds"] = round(time.time() - t_start, 1)
    write_json(json_path, result)
    if args.docs:
        write_doc_section(Path(args.docs), "gpu_check", render_section(result))
    print(json.dumps({n: {k: p.get(k) for k in ("status", "seconds", "error")} for n, p in result["parts"].items()},
                     indent=1))
    return 0 if all(p["status"] == "ok" for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
