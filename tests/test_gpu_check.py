"""benchmarks/gpu_check.sh runs end to end on CPU with --dry-run (sizes scaled down): the JSON
has every figure, the docs section is replaced and the rest of the file kept. (On a GPU machine
the same script measures; docs/benchmarks.md, "GPU check".)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_json_and_the_docs_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Loss\n\nkept\n\n<!-- gpu_check:begin -->\n## GPU check\n\nold text\n"
                    "<!-- gpu_check:end -->\n\n## After\n\nkept too\n")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--json", str(out), "--docs", str(docs),
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    assert set(result["variants"]) == {"sft", "sft_fused", "dipo_fused", "dipo_logits"}
    for row in result["variants"].values():
        assert row["step_seconds"] > 0 and row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1
        assert len(row["step_seconds_all"]) == result["reps"]
    assert result["ratios"]["dipo_fused_over_sft_step_time"] > 0
    assert result["model"]["flops_per_token"] > 6 * result["model"]["parameters"] / 2
    assert result["precompute"]["tokens"] > 0
    e = result["evaluate"]
    assert "--device cpu" in e["command"]
    if e["exit_code"] == 0:  # the dry run's loops are shorter than evaluate's 1 s resolution: no rate
        assert e["generated_tokens"] > 0 and set(e["generate_loops"]) >= {"verbmem_f", "knowmem_f", "knowmem_r"}
        assert e["generation_tokens_per_second"] is None or e["generation_tokens_per_second"] > 0
    else:  # `evaluate --device` not there yet: the failure is recorded, the rest still measured
        assert e["error"]
    text = docs.read_text()
    assert "old text" not in text and "## Loss\n\nkept\n" in text and text.endswith("## After\n\nkept too\n")
    assert "## GPU check\n\n**Dry run on CPU (not a GPU measurement)" in text
    assert text.count("## GPU check") == 1


def test_the_gpu_section_renders_a_gpu_run(tmp_path):
    """The branch a GPU run takes (memory figures, generation rate), on a made-up result: it cannot
    run here, so its rendering is checked without a GPU."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    row = lambda t, mem: {"step_seconds": t, "tokens_per_second": 8192 / t, "mfu": 0.4 * 0.25 / t,  # noqa: E731
                          "step_peak_gib": mem, "absolute_peak_gib": 40.0 + mem}
    result = {"dry_run": False, "device": "NVIDIA H200", "peak_tflops": 989.0, "date_utc": "2027-01-01T00:00:00+00:00",
              "wall_seconds": 300.0, "warmup": 2, "reps": 5, "json": "/tmp/gpu.json",
              "model": {"parameters": 1_056_000_000, "vocab": 32000, "hidden": 2048, "layers": 18, "dtype": "bfloat16",
                        "block": 1024, "rows": 4, "tokens_per_step": 8192, "flops_per_token": 6.5e9,
                        "ds_config": "zero3_bf16.json"},
              "variants": {"sft": row(0.25, 6.0), "sft_fused": row(0.27, 3.0), "dipo_fused": row(0.30, 3.2),
                           "dipo_logits": row(0.29, 6.5)},
              "engine_gib": {"logits": 17.0, "fused": 17.0},
              "ratios": {"dipo_fused_over_sft_step_time": 1.2, "dipo_fused_over_sft_fused_step_time": 1.11,
                         "fused_over_logits_dipo_step_peak_memory": 0.49, "fused_over_logits_sft_step_peak_memory": 0.5},
              "evaluate": {"command": "dipo-scale evaluate --device cuda", "exit_code": 0, "wall_seconds": 60.0,
                           "generated_tokens": 47104, "generate_seconds": 20.0, "generation_tokens_per_second": 2355.2},
              "precompute": {"tokens": 4096, "seconds": 30.0}}
    text = gpu_check.render_section(result)
    assert "Dry run" not in text and "1.056 B parameters" in text and "NVIDIA H200" in text
    assert "`fused_over_logits_dipo_step_peak_memory` = **0.49**" in text and "46.50 GiB" in text
    assert "**2,355 tokens/s**" in text and "| **DiPO, fused head, hidden cache** | 0.300 s | 27,307 | 33.3 % | 3.20 |" in text
    docs = tmp_path / "b.md"
    docs.write_text("# Benchmarks\n\n<!-- gpu_check:begin -->\n## GPU check\n\nold\n<!-- gpu_check:end -->\n")
    gpu_check.write_doc_section(docs, "gpu_check", text)
    assert docs.read_text() == f"# Benchmarks\n\n<!-- gpu_check:begin -->\n{text.rstrip()}\n<!-- gpu_check:end -->\n"
