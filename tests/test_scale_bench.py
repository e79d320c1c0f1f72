"""benchmarks/scale.py's ratios and docs section, on a made-up result (the benchmark itself runs
the whole chain: minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale  # noqa: E402


def _scale(s: float, prepare_s: float, ref_s: float, rss: int, prep_rss: int) -> dict:
    tokens = int(1_000_000 * s)
    return {"scale": s, "corpus": {"num_docs": 10, "seconds": 0.1, "bytes": {"forget": 3_300_000 * s}},
            "prepare": {"tokens": tokens, "forget_tokens": tokens // 3, "retain_tokens": tokens - tokens // 3,
                        "prepare_seconds": prepare_s, "wall_seconds": prepare_s + 4, "tokens_per_second": tokens / prepare_s,
                        "seconds_per_million_tokens": prepare_s / tokens * 1e6, "peak_rss_bytes": prep_rss,
                        "cpu_seconds_per_million_tokens": 2 * prepare_s / tokens * 1e6,
                        "peak_rss_before_prepare_bytes": 300 << 20},
            "reference": {"tokens": tokens // 3, "computing_seconds": ref_s, "job_seconds": ref_s + 10,
                          "wall_seconds": ref_s + 15, "tokens_per_second_computing": tokens / 3 / ref_s,
                          "seconds_per_million_tokens": ref_s / (tokens // 3) * 1e6,
                          "wall_seconds_per_million_tokens": (ref_s + 15) / (tokens // 3) * 1e6,
                          "workers": 1, "cpus_per_worker": 2, "cache_bytes": tokens * 85, "shards": 3},
            "unlearn": {"wall_seconds": 60.0, "steps": 10, "median_step_seconds": 1.5, "tokens_per_second": 5461.0,
                        "worker_peak_rss_bytes": [rss, rss - 5], "driver_peak_rss_bytes": 400 << 20},
            "evaluate": {"wall_seconds": 30.0, "limit": 20, "metrics": {"knowmem_f": 0.5, "verbmem_f": 0.25}}}


def test_goal_ratios_take_the_largest_scale_over_the_smallest():
    small = _scale(0.25, prepare_s=1.0, ref_s=10.0, rss=1000 << 20, prep_rss=500 << 20)
    large = _scale(2.0, prepare_s=8.8, ref_s=100.0, rss=1100 << 20, prep_rss=700 << 20)
    ratios = scale.goal_ratios([large, small])
    assert ratios["prepare_seconds_per_token"] == {"value": 1.1, "goal": "<= 1.2", "met": True}
    assert ratios["reference_seconds_per_token"]["value"] == 1.25 and ratios["reference_seconds_per_token"]["met"] is False
    assert ratios["worker_peak_rss"]["value"] == 1.1 and ratios["worker_peak_rss"]["met"] is True
    assert ratios["prepare_peak_rss"]["value"] == 1.4 and "met" not in ratios["prepare_peak_rss"]  # no number
    assert ratios["prepare_peak_rss_added_by_prepare"]["value"] == 2.0  # (700 - 300) / (500 - 300)
    assert ratios["prepare_cpu_seconds_per_token"] == {"value": 1.1, "goal": None}
    assert ratios["_over"] == "2x over 0.25x"
    assert scale.goal_ratios([small]) == {}


def test_doc_section_holds_the_command_load_and_figures():
    small = _scale(0.25, 1.0, 10.0, 1000 << 20, 500 << 20)
    large = _scale(1.0, 4.0, 40.0, 1000 << 20, 500 << 20)
    result = {"command": "python benchmarks/scale.py --json x.json", "date": "Wed Dec  2 04:00:00 UTC 2026",
              "uptime_start": "load average: 2.0", "uptime_end": "load average: 3.0", "machine": "2 CPUs",
              "settings": {"block_size": 512, "steps": 10, "eval_limit": 20}, "scales_run": [0.25, 1.0],
              "not_run": "2x", "scales": [small, large], "ratios": scale.goal_ratios([small, large])}
    text = scale.doc_section(result)
    for needle in ("python benchmarks/scale.py --json x.json", "Wed Dec  2 04:00:00 UTC 2026", "load average: 3.0",
                   "Not run (of the issue's 0.25x, 1x, 2x): 2x", "| worker_peak_rss | 1.0 | <= 1.2 | yes |",
                   "first 20 items", '"scales_run"'):
        assert needle in text, needle
