"""Progress lines: count, percentage, rate, ETA and fields, on a clock the test drives (no sleeps)."""

import io
from types import SimpleNamespace

import numpy as np

from dipo_scale import progress as progress_module
from dipo_scale.progress import Progress


def _clocked(monkeypatch, *args, **kwargs):
    """A Progress writing to a buffer, and a function that moves its clock forward."""
    now = [100.0]
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    out = io.StringIO()

    def advance(seconds):
        now[0] += seconds

    return Progress(*args, stream=out, **kwargs), advance, out


def test_line_has_count_rate_eta_and_fields(monkeypatch):
    p, advance, out = _clocked(monkeypatch, "unlearn", total=40, unit="steps", every_s=0)
    advance(6.0)
    p.update(12, loss=0.51234, epoch=2, lr=np.float32(1e-3))
    assert out.getvalue() == "unlearn: 12/40 steps (30%), 2 steps/s, ETA 14 s, loss=0.5123, epoch=2, lr=0.001\n"


def test_slow_items_long_eta_and_no_total(monkeypatch):
    p, advance, _ = _clocked(monkeypatch, "reference", total=100, unit="shards")
    advance(120.0)
    p.done = 4
    assert p.line() == "reference: 4/100 shards (4%), 30 s each, ETA 48.0 min"
    q, advance, _ = _clocked(monkeypatch, "scan")
    assert q.line() == "scan: 0"  # nothing done yet: no rate, no ETA
    advance(2.0)
    q.done = 5
    assert q.line(file="a") == "scan: 5, 2.5 items/s, file=a"


def test_lines_only_every_interval_and_a_final_line(monkeypatch):
    p, advance, out = _clocked(monkeypatch, "train target model", total=10, unit="steps", every_s=10)
    for _ in range(4):
        advance(3.0)
        p.update(loss=1.0)
    assert out.getvalue().splitlines() == ["train target model: 4/10 steps (40%), 3 s each, ETA 18 s, loss=1"]
    advance(100.0)
    p.close(loss=0.25)
    assert out.getvalue().splitlines()[-1] == "train target model: done, 4 steps in 1.9 min, loss=0.25"


def test_resumed_progress_counts_its_own_rate(monkeypatch):
    p, advance, _ = _clocked(monkeypatch, "unlearn", total=10, unit="steps", done=6)
    advance(4.0)
    p.done = 8
    assert p.line() == "unlearn: 8/10 steps (80%), 2 s each, ETA 4 s"


def test_reference_precompute_counts_the_shards_its_workers_record(tmp_path, capsys):
    """The driver's lines come from the shard records (.json) written while the block runs; a
    record left by an earlier run is not counted until it is rewritten."""
    from dipo_scale.reference.precompute import _shard_progress

    todo = [{"file": f"forget/part-{i:05d}.safetensors"} for i in range(3)]
    (tmp_path / "forget").mkdir()
    stale = tmp_path / "forget" / "part-00002.json"
    stale.write_text('{"tokens": 1000}')
    with _shard_progress(tmp_path, todo, poll_s=0.01):
        for i, tokens in ((0, 10), (1, 20)):
            (tmp_path / "forget" / f"part-{i:05d}.json").write_text(f'{{"tokens": {tokens}}}')
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("reference: done, 2 shards in ") and ", tokens=30, tokens/s=" in last
