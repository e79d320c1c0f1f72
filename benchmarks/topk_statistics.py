"""CPU top-K statistics benchmark: introselect over whole rows against the grouped top-K.

    .venv/bin/python benchmarks/topk_statistics.py --json /tmp/topk_statistics.json --doc

`dipo_scale.reference.topk.topk_statistics` (what the `topk` reference cache stores: the top-K logits,
their ids, the log-sum-exp) on float32 logits of a vocabulary V, for V = 1024 (the demo model),
32000, 50257 and 128256, with `--k` (default 32, `reference.k`'s default), on as many rows as
keep ~2-4 M logits (a `reference.batch_size` of 8 blocks of 256 tokens at V = 1024), with 1 and
2 torch threads. Per case, side by side in one process and interleaved: the median wall time of
`--reps` calls (after one warm-up) with `group=0` (numpy's introselect over whole rows) and with
the grouped top-K (groups of 64, and of 8 where V allows it), and which of them `topk_group`
picks by default. Every grouped result is checked equal to introselect's (values, ids, lse).
`--doc` writes the table into docs/benchmarks.md between `<!-- topk_statistics:begin -->` and
`<!-- topk_statistics:end -->`.
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

import torch  # noqa: E402

from bench_assets import command_line, machine_facts, write_doc_section  # noqa: E402
from dipo_scale.files import atomic_write_json  # noqa: E402
from dipo_scale.reference.topk import topk_group, topk_statistics  # noqa: E402

CASES = [(1024, 2048), (32000, 128), (50257, 64), (128256, 32)]  # (V, rows)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(k: int, reps: int, cases=CASES) -> list[dict]:
    rows_out = []
    for vocab, rows in cases:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(rows, 128, generator=g) @ (torch.randn(vocab, 128, generator=g) * 0.3).T
        groups = [group for group in (64, 8) if vocab % group == 0 and vocab // group >= k]
        flat = topk_statistics(logits, k, group=0)
        for group in groups:
            out = topk_statistics(logits, k, group=group)
            if not (torch.equal(out[0], flat[0]) and torch.equal(out[1], flat[1])
                    and torch.allclose(out[2], flat[2])):
                raise AssertionError(f"V={vocab} group={group}: the grouped top-K differs from introselect")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times: dict[int, list[float]] = {group: [] for group in [0, *groups]}
            for _ in range(3):  # interleaved: the machine's drift hits every variant alike
                for group in times:
                    times[group].append(median_ms(lambda: topk_statistics(logits, k, group=group), reps))
            ms = {group: min(t) for group, t in times.items()}
            rows_out.append({"vocab": vocab, "rows": rows, "k": k, "threads": threads,
                             "introselect_ms": ms[0], **{f"group{g}_ms": ms[g] for g in groups},
                             "default_group": topk_group(vocab, k),
                             "default_speedup": ms[0] / ms[topk_group(vocab, k)]})
            print(json.dumps(rows_out[-1]), flush=True)
    return rows_out


def doc_section(result: dict) -> str:
    lines = [f"### CPU top-K statistics ({result['date_utc'][:10]}, `{result['command']}`)", "",
             "Milliseconds per `topk_statistics` call (the best of 3 interleaved rounds, each the median of "
             f"{result['reps']} calls), "
             f"k = {result['k']}, float32 logits; `default` is what `topk_group` picks "
             "(0: introselect), its speed-up over introselect in the last column.", "",
             "| V | rows | threads | introselect | groups of 64 | groups of 8 | default | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cell = lambda key: f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
        lines.append(f"| {r['vocab']} | {r['rows']} | {r['threads']} | {cell('introselect_ms')} | "
                     f"{cell('group64_ms')} | {cell('group8_ms')} | {r['default_group']} | "
                     f"{r['default_speedup']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--doc", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    threads = torch.get_num_threads()
    try:
        rows = run(args.k, args.reps)
    finally:
        torch.set_num_threads(threads)
    result = {"command": command_line("topk_statistics.py", argv), "k": args.k, "reps": args.reps, "rows": rows, **machine_facts(load)}
    atomic_write_json(Path(args.json), result)
    if args.doc:
        write_doc_section(ROOT / "docs" / "benchmarks.md", "topk_statistics", doc_section(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
