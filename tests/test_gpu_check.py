"""benchmarks/gpu_check.sh runs every part end to end on CPU with --dry-run (sizes scaled down):
the JSON has every part passed with its figures, the docs section is replaced and the rest of the
file kept. (On a GPU machine the same script checks the real path and measures; docs/benchmarks.md,
"GPU check".) And benchmarks/gpu_wheels.py's slimming keeps a wheel installable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_gpu_check_dry_run_passes_every_part_and_writes_the_docs_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Loss\n\nkept\n\n<!-- gpu_check:begin -->\n## GPU check\n\nold text\n"
                    "<!-- gpu_check:end -->\n\n## After\n\nkept too\n")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--json", str(out), "--docs", str(docs),
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    result = json.loads(out.read_text())
    parts = result["parts"]
    failed = {n: (p.get("error"), p.get("log_tail")) for n, p in parts.items() if p["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:] + proc.stderr[-3000:])
    assert result["dry_run"] and result["device"] == "cpu"
    assert list(parts) == ["environment", "assets", "unlearn", "reference", "evaluate", "attack", "figures"]
    assert parts["environment"]["deepspeed_accelerator"] == "cpu"

    u = parts["unlearn"]  # killed after checkpoint 4, a new worker resumed it, each step once
    assert u["command"].startswith("dipo-scale unlearn ") and "train.max_failures=1" in u["command"]
    assert u["killed_after_checkpoint"] == 4 and u["resumed_from_step"] == 4 and u["resume_line_seen"]
    assert u["checkpoints"] == [4, 8] and u["eval_steps"] == [2, 4, 6, 8]
    assert u["exported_tensors"] > 0 and u["non_finite_tensors"] == []

    for form in ("hidden", "topk"):
        assert parts["reference"][form]["tokens"] > 0 and "train.use_gpu=false" in parts["reference"][form]["command"]
    e = parts["evaluate"]
    assert "--device cpu" in e["command"] and e["model"] == "the unlearn part's export"
    assert e["generated_tokens"] > 0 and set(e["generate_loops"]) >= {"verbmem_f", "knowmem_f", "knowmem_r"}
    assert "knowmem_f@quantize4" in parts["attack"]["metrics_after"]

    f = parts["figures"]
    assert set(f["variants"]) == {"sft", "sft_fused", "dipo_fused", "dipo_logits"}
    for row in f["variants"].values():
        assert row["step_seconds"] > 0 and row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1
        assert len(row["step_seconds_all"]) == f["reps"]
    assert f["ratios"]["dipo_fused_over_sft_step_time"] > 0
    assert f["model"]["flops_per_token"] > 6 * f["model"]["parameters"] / 2
    for row in f["memory_vs_plan"].values():  # the planner's estimate, or why there is none
        assert row["measured_single_run_gib"] is None  # no CUDA allocator on CPU
        assert row["planned_gib"] is not None or row["plan"]["error"]

    text = docs.read_text()
    assert "old text" not in text and "## Loss\n\nkept\n" in text and text.endswith("## After\n\nkept too\n")
    assert "## GPU check\n\n**Dry run on CPU (not a GPU measurement)" in text
    assert "**7 of 7 parts passed.**" in text and text.count("## GPU check") == 1


def _gpu_result() -> dict:
    """A made-up GPU run: the branch the GPU takes (memory figures, a failed part) rendered here."""
    row = lambda t, mem: {"step_seconds": t, "tokens_per_second": 8192 / t, "mfu": 0.4 * 0.25 / t,  # noqa: E731
                          "step_peak_gib": mem, "absolute_peak_gib": 40.0 + mem}
    memory = lambda measured, planned: {"measured_single_run_gib": measured, "planned_gib": planned,  # noqa: E731
                                        "planned_over_measured": planned / measured, "plan": {"total_bytes": 1}}
    return {
        "dry_run": False, "device": "NVIDIA H100 80GB HBM3", "date_utc": "2027-01-01T00:00:00+00:00",
        "command": "benchmarks/gpu_check.sh --json /tmp/out/gpu_check.json --docs ''", "commit": "0123456789abcdef",
        "wall_seconds": 420.0, "setup_seconds": 25.0, "wheels_installed": True, "json": "/tmp/out/gpu_check.json",
        "parts": {
            "environment": {"status": "ok", "seconds": 9.0, "gpu": "NVIDIA H100 80GB HBM3", "python": "3.12.3",
                            "torch": "2.11.0+cu130", "cuda": "13.0", "transformers": "5.17.0", "deepspeed": "0.19.8",
                            "deepspeed_accelerator": "cuda", "ray": "2.60.0", "bitsandbytes": "0.50.2"},
            "assets": {"status": "ok", "seconds": 20.0, "small_parameters": 20_000_000, "small_seconds": 3.0,
                       "step_parameters": 1_056_000_000, "step_seconds": 15.0},
            "unlearn": {"status": "failed", "seconds": 80.0, "error": "the run exited 1 after the kill: boom"},
            "reference": {"status": "ok", "seconds": 50.0,
                          "hidden": {"tokens": 4096, "tokens_per_second_computing": 90000.0, "bytes_per_token": 4096,
                                     "seconds": 25.0},
                          "topk": {"tokens": 4096, "tokens_per_second_computing": 60000.0, "bytes_per_token": 260,
                                   "seconds": 25.0}},
            "evaluate": {"status": "ok", "seconds": 30.0, "model": "the initial small model (the unlearn part exported none)",
                         "generation_tokens_per_second": 2355.2, "metrics": {"knowmem_f": 1.0, "mia_auc": 0.5}},
            "attack": {"status": "skipped", "seconds": 0.0, "error": "12 s left of the check's time"},
            "figures": {"status": "ok", "seconds": 120.0, "peak_tflops": 989.0, "warmup": 2, "reps": 5,
                        "model": {"parameters": 1_056_000_000, "vocab": 32000, "hidden": 2048, "layers": 18,
                                  "dtype": "bfloat16", "block": 1024, "rows": 4, "tokens_per_step": 8192,
                                  "flops_per_token": 6.5e9, "ds_config": "zero3_bf16.json"},
                        "variants": {"sft": row(0.25, 6.0), "sft_fused": row(0.27, 3.0), "dipo_fused": row(0.30, 3.2),
                                     "dipo_logits": row(0.29, 6.5)},
                        "engine_gib": {"logits": 17.0, "fused": 17.0},
                        "ratios": {"dipo_fused_over_sft_step_time": 1.2, "dipo_fused_over_sft_fused_step_time": 1.11,
                                   "dipo_fused_over_sft_mfu": 0.83, "fused_over_logits_dipo_step_peak_memory": 0.49,
                                   "fused_over_logits_sft_step_peak_memory": 0.5},
                        "memory_vs_plan": {"sft": memory(23.0, 26.0), "sft_fused": memory(20.0, 22.0),
                                           "dipo_fused": memory(20.2, 23.0),
                                           "dipo_logits": {"measured_single_run_gib": 23.5, "planned_gib": None,
                                                           "planned_over_measured": None,
                                                           "plan": {"error": "plan_memory: ValueError: no"}}}}}}


def test_the_gpu_section_renders_a_gpu_run(tmp_path):
    import gpu_check

    text = gpu_check.render_section(_gpu_result(), json_name="benchmarks/results/gpu_check.json")
    assert "Dry run" not in text and "**5 of 7 parts passed.**" in text and "NVIDIA H100 80GB HBM3" in text
    assert "(commit 0123456789)" in text and "after 25 s of set-up (the wheels' install included)" in text
    assert "| unlearn | failed | 80 | the run exited 1 after the kill: boom |" in text
    assert "| attack | skipped | 0 |" in text and "- `unlearn`: the run exited 1 after the kill: boom" in text
    assert "1.056 B parameters" in text and "`fused_over_logits_dipo_step_peak_memory` = **0.49**" in text
    assert "| **DiPO, fused head, hidden cache** | 0.300 s | 27,307 | 33.3 % | 3.20 |" in text
    assert "| **DiPO, fused head, hidden cache** | 20.20 | 23.00 | 1.14 |" in text
    assert "| DiPO, logits, hidden cache | 23.50 | — (plan_memory: ValueError: no) | — |" in text
    assert "generation 2,355 tokens/s" in text and "`benchmarks/results/gpu_check.json`" in text
    docs = tmp_path / "b.md"
    docs.write_text("# Benchmarks\n\n<!-- gpu_check:begin -->\n## GPU check\n\nold\n<!-- gpu_check:end -->\n")
    gpu_check.write_doc_section(docs, "gpu_check", text)
    assert docs.read_text() == f"# Benchmarks\n\n<!-- gpu_check:begin -->\n{text.rstrip()}\n<!-- gpu_check:end -->\n"


def test_slimming_a_wheel_keeps_modes_and_drops_the_removed_files_from_record(tmp_path):
    import gpu_wheels

    src = tmp_path / "src" / "demo-1.0-py3-none-any.whl"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as z:
        tool = zipfile.ZipInfo("demo/bin/tool")
        tool.external_attr = 0o755 << 16
        z.writestr(tool, b"#!/bin/sh\n")
        z.writestr("demo/__init__.py", "")
        z.writestr("demo/jars/big.jar", b"x" * 1000)
        z.writestr("demo-1.0.dist-info/RECORD", "demo/bin/tool,sha256=a,10\ndemo/__init__.py,sha256=b,0\n"
                                                  "demo/jars/big.jar,sha256=c,1000\ndemo-1.0.dist-info/RECORD,,\n")
    (tmp_path / "out").mkdir()
    slimmed, removed = gpu_wheels.slim(src, tmp_path / "out", lambda path: path.startswith("demo/jars/"))
    assert removed == 1000
    with zipfile.ZipFile(slimmed) as z:
        assert sorted(z.namelist()) == ["demo-1.0.dist-info/RECORD", "demo/__init__.py", "demo/bin/tool"]
        assert "big.jar" not in z.read("demo-1.0.dist-info/RECORD").decode()
        assert z.getinfo("demo/bin/tool").external_attr >> 16 == 0o755  # executables stay executable
