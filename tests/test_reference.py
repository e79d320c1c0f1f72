"""Reference-statistics cache: precompute (Ray Data actor pool, ZeRO-3 workers), resume after a
kill, fingerprint refusal, shard sizes from the byte budget, verification of exactly the rows read
(and of headers only on the driver), worker sizing per node, and a ZeRO-3 training run that reads
the cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dipo_scale.cli import main
from dipo_scale.config import load_unlearn_config
from dipo_scale.errors import UserInputError
from dipo_scale.losses import TopKReference
from dipo_scale.reference import ReferenceCache, check_cache, precompute_reference
from dipo_scale.reference.precompute import SLOW_ENV, _completed
from dipo_scale.preflight import validate_run

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_SHARD = 6
ROW_BYTES = 64 * 64 * 4  # hidden form: a 64-token block of H = 64 float32 values
SHARD_BYTES = ROWS_PER_SHARD * ROW_BYTES + ROW_BYTES // 2  # the budget holds 6.5 rows: 6 per shard


def _settings(tiny_assets, cache_dir, *extra):
    return [f"model.path={tiny_assets['target']}", f"data.prepared_dir={tiny_assets['prepared']}",
            "method=dipo", "loss.retain=kl", "reference.form=hidden", f"reference.cache_dir={cache_dir}",
            f"reference.shard_bytes={SHARD_BYTES}", "reference.batch_size=4", *extra]


def _cfg(tiny_assets, cache_dir, *extra):
    return load_unlearn_config(None, _settings(tiny_assets, cache_dir, *extra))


def _model_logits(tiny_assets, split, block_ids):
    from transformers import AutoModelForCausalLM

    from dipo_scale.prepare import read_blocks

    blocks = read_blocks(tiny_assets["prepared"], split)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["target"]).eval()
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(blocks["input_ids"][block_ids]),
                     attention_mask=torch.as_tensor(blocks["attention_mask"][block_ids])).logits


@pytest.fixture(scope="module")
def hidden_cache(tiny_assets, ray_cluster, tmp_path_factory):
    """A hidden-form cache of forget + retain, written by the Ray Data actor pool (2 actors)."""
    cache = tmp_path_factory.mktemp("ref") / "hidden"
    manifest = precompute_reference(_cfg(tiny_assets, cache, "reference.num_workers=2"))
    return cache, manifest


def test_actor_pool_precompute_writes_shards_aligned_with_the_blocks(tiny_assets, hidden_cache):
    from safetensors import safe_open

    cache, manifest = hidden_cache
    prepared = json.loads((tiny_assets["prepared"] / "manifest.json").read_text())
    assert manifest["form"] == "hidden" and manifest["bytes_per_token"] == 64 * 4  # H = 64, float32
    assert manifest["version"] == 2 and manifest["rows_per_shard"] == ROWS_PER_SHARD  # from the byte budget
    assert set(manifest["fingerprints"]) == {"reference_weights", "tokenizer", "packed_data", "settings"}
    for split in ("forget", "retain"):
        info = manifest["splits"][split]
        assert info["blocks"] == prepared["splits"][split]["blocks"]
        assert len(info["shards"]) == math.ceil(info["blocks"] / ROWS_PER_SHARD)
        for i, shard in enumerate(info["shards"]):
            # the statistics of a shard stay within the budget; the rest is its header and block ids
            assert shard["bytes"] - shard["index_bytes"] == shard["rows"] * ROW_BYTES <= SHARD_BYTES
            assert len(shard["row_sha256"]) == shard["rows"]
            with safe_open(cache / shard["file"], framework="pt") as f:
                ids = f.get_tensor("block_id").tolist()
                hidden = f.get_tensor("hidden")
            assert ids == list(range(i * ROWS_PER_SHARD, i * ROWS_PER_SHARD + shard["rows"]))
            # a row's sha256 is that of the block's bytes
            assert shard["row_sha256"][1 % shard["rows"]] == hashlib.sha256(
                hidden[1 % shard["rows"]].contiguous().numpy().tobytes()).hexdigest()
    assert manifest["precompute"]["shards_computed"] == sum(len(manifest["splits"][s]["shards"])
                                                            for s in ("forget", "retain"))
    # the rebuilt logits are the model's logits, for blocks in any order and across shards
    reader = ReferenceCache(cache)
    ids = [7, 0, ROWS_PER_SHARD + 1]
    ref = reader.reference("forget", ids)
    rebuilt = ref.logits(ref.hidden.reshape(-1, ref.hidden.shape[-1])).reshape(ref.shape)
    assert torch.allclose(rebuilt, _model_logits(tiny_assets, "forget", ids), rtol=1e-5, atol=1e-5)


def test_zero3_precompute_topk_with_k_vocab_is_exact(tiny_assets, ray_cluster, tmp_path):
    cfg = _cfg(tiny_assets, tmp_path / "topk", "reference.form=topk", "reference.k=320",
               "reference.mode=zero3", "reference.num_workers=2", "loss.retain=none",
               f"reference.shard_bytes={64 * (320 * 8 + 4) * 6}")
    manifest = precompute_reference(cfg)
    assert manifest["form"] == "topk" and manifest["k"] == 320 and manifest["bytes_per_token"] == 320 * 8 + 4
    assert manifest["rows_per_shard"] == 6
    assert list(manifest["splits"]) == ["forget"]  # retain statistics only for loss.retain=kl
    ids = list(range(manifest["splits"]["forget"]["blocks"]))[-3:]
    ref = ReferenceCache(tmp_path / "topk").reference("forget", ids)
    assert isinstance(ref, TopKReference)
    flat = [t.reshape(-1, *t.shape[2:]) for t in ref.per_position()]
    dense = ref.logits(*flat).reshape(ref.shape)
    expected = torch.log_softmax(_model_logits(tiny_assets, "forget", ids), -1)
    assert torch.allclose(torch.log_softmax(dense, -1), expected, atol=1e-5)


def test_killed_precompute_resumes_and_equals_an_uninterrupted_one(tiny_assets, hidden_cache, tmp_path):
    import ray

    cache_a, manifest_a = hidden_cache
    cache_b = tmp_path / "resumed"
    env = {**os.environ, SLOW_ENV: "1.0", "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "dipo_scale.cli", "reference", *[a for s in _settings(tiny_assets, cache_b)
                                                                   for a in ("--set", s)]]
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list(cache_b.glob("*/part-*.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a real kill, midway
        proc.wait()
    assert not (cache_b / "manifest.json").exists(), "the precompute finished before it was killed"
    done_at_kill = len(list(cache_b.glob("*/part-*.json")))
    assert done_at_kill >= 1
    # Ray ends the dead driver's actors: wait (with a deadline) until their CPUs are free again.
    deadline = time.time() + 120
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)

    manifest_b = precompute_reference(_cfg(tiny_assets, cache_b, "reference.num_workers=2"))
    assert manifest_b["precompute"]["shards_reused"] >= done_at_kill  # finished shards not recomputed
    assert manifest_b["precompute"]["shards_computed"] >= 1
    assert not list(cache_b.glob("**/.*.tmp"))
    for split in ("forget", "retain"):
        assert manifest_b["splits"][split] == manifest_a["splits"][split]  # same bytes (sha256), same layout
    assert manifest_b["lm_head"]["sha256"] == manifest_a["lm_head"]["sha256"]

    # a corrupt shard is not counted as finished by a rerun: it would be recomputed
    item = {**json.loads((cache_b / "forget" / "part-00001.json").read_text())}
    assert _completed(cache_b, item) is not None
    shard = cache_b / "forget" / "part-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _completed(cache_b, item) is None
    assert _completed(cache_b, item, full=False) is not None  # (the cheap check: size and header only)


def _copy(hidden_cache, tmp_path):
    cache = tmp_path / "copy"
    shutil.copytree(hidden_cache[0], cache)
    return cache, json.loads((cache / "manifest.json").read_text())


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


class _HashSpy:
    """Counts the bytes `dipo_scale.reference.cache` hashes (sha256)."""

    def __init__(self, monkeypatch):
        from types import SimpleNamespace

        from dipo_scale.reference import cache

        self.bytes = 0
        spy = self

        class Counting:
            def __init__(self, data=b""):
                self.h = hashlib.sha256()
                self.update(data)

            def update(self, data):
                spy.bytes += memoryview(data).nbytes
                self.h.update(data)

            def hexdigest(self):
                return self.h.hexdigest()

        monkeypatch.setattr(cache, "hashlib", SimpleNamespace(sha256=Counting))


def test_a_reader_hashes_only_the_rows_it_reads(hidden_cache, tmp_path, monkeypatch):
    cache, manifest = _copy(hidden_cache, tmp_path)
    shards = manifest["splits"]["forget"]["shards"]
    spy = _HashSpy(monkeypatch)
    reader = ReferenceCache(cache)
    ids = [ROWS_PER_SHARD + 2, 1, ROWS_PER_SHARD + 2]  # two shards; one block asked for twice
    out = reader.read("forget", ids)
    assert out["hidden"].shape == (3, 64, 64) and torch.equal(out["hidden"][0], out["hidden"][2])
    expected = shards[0]["index_bytes"] + shards[1]["index_bytes"] + 2 * ROW_BYTES  # each row read once
    assert spy.bytes == reader.bytes_read == expected
    reader.read("forget", [ROWS_PER_SHARD + 3])  # a shard's index is checked once per reader
    assert spy.bytes == reader.bytes_read == expected + ROW_BYTES
    assert reader.bytes_read < shards[1]["bytes"] + shards[0]["bytes"] - 2 * ROW_BYTES


def test_a_corrupt_row_is_refused_when_and_only_when_it_is_read(tiny_assets, hidden_cache, tmp_path, monkeypatch):
    cache, manifest = _copy(hidden_cache, tmp_path)
    entry = manifest["splits"]["forget"]["shards"][1]
    block = entry["first_block"] + 3
    _flip(cache / entry["file"], entry["index_bytes"] + 3 * ROW_BYTES + 100)  # inside block 3 of the shard
    from dipo_scale.reference import cache as cache_module

    readers = []

    class Recording(cache_module.ReferenceCache):
        def __init__(self, *args):
            super().__init__(*args)
            readers.append(self)

    monkeypatch.setattr(cache_module, "ReferenceCache", Recording)
    assert check_cache(_cfg(tiny_assets, cache)) == manifest  # the driver's check reads no statistics
    total_index = sum(e["index_bytes"] for s in ("forget", "retain") for e in manifest["splits"][s]["shards"])
    assert len(readers) == 1 and readers[0].bytes_read == total_index
    reader = ReferenceCache(cache)
    assert reader.read("forget", [0, block - 1, block + 1])["hidden"].shape[0] == 3  # the other rows: fine
    with pytest.raises(UserInputError) as e:
        reader.read("forget", [0, block])
    assert "\n" not in str(e.value)
    assert f"{entry['file']}: block {block} (row 3) does not match its sha256" in str(e.value)


def test_truncated_or_corrupt_shard_is_refused_on_read(tiny_assets, hidden_cache, tmp_path):
    cache, manifest = _copy(hidden_cache, tmp_path)
    second = cache / manifest["splits"]["forget"]["shards"][1]["file"]
    second.write_bytes(second.read_bytes()[:-100])  # truncated
    reader = ReferenceCache(cache)
    assert reader.read("forget", [0, 2])["hidden"].shape[0] == 2  # shard 0 only: still readable
    with pytest.raises(UserInputError, match=r"part-00001.safetensors: \d+ bytes, manifest.json says \d+ \(truncated"):
        reader.read("forget", [0, ROWS_PER_SHARD])
    with pytest.raises(UserInputError, match="part-00001.safetensors: .* bytes, manifest.json says"):
        check_cache(_cfg(tiny_assets, cache))
    (cache / "manifest.json").unlink()
    with pytest.raises(UserInputError, match="unfinished"):
        ReferenceCache(cache)


def test_a_cache_of_the_old_format_is_refused_in_one_line(hidden_cache, tmp_path):
    cache, manifest = _copy(hidden_cache, tmp_path)
    (cache / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(UserInputError, match="cache format version 1, this dipo-scale reads version 2") as e:
        ReferenceCache(cache)
    assert "\n" not in str(e.value)


def test_a_corrupt_shard_header_is_refused_before_workers_start(tiny_assets, hidden_cache, tmp_path, capsys):
    cache, manifest = _copy(hidden_cache, tmp_path)
    entry = manifest["splits"]["forget"]["shards"][1]
    _flip(cache / entry["file"], entry["index_bytes"] - 3)  # in the block ids
    sets = _settings(tiny_assets, cache, f"out_dir={tmp_path / 'run'}")
    code = main(["unlearn", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "part-00001.safetensors: header or block ids do not match index_sha256" in err[0], err
    assert not (tmp_path / "run").exists()  # the driver's check: nothing claimed, no worker started


def test_fingerprint_mismatch_is_refused_in_one_line(tiny_assets, hidden_cache, capsys):
    cache, _ = hidden_cache
    validate_run(_cfg(tiny_assets, cache))  # the matching run is accepted
    with pytest.raises(UserInputError, match=r"differs in reference weights \(") as e:
        validate_run(_cfg(tiny_assets, cache, f"model.reference_path={tiny_assets['retrain']}"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserInputError, match=r"differs in settings \(form: hidden vs topk, k: None vs 32\)"):
        validate_run(_cfg(tiny_assets, cache, "reference.form=topk"))
    # through the CLI: exit 2, one line, before any worker starts
    code = main(["unlearn", *[a for s in _settings(tiny_assets, cache, "model.dtype=bfloat16") for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "settings (dtype: float32 vs bfloat16, reference_dtype: float32 vs bfloat16)" in err[0]


def test_two_worker_zero3_training_reads_the_hidden_cache(tiny_assets, hidden_cache, tmp_path):
    from dipo_scale.unlearn import run_unlearning

    cache, _ = hidden_cache
    cfg = _cfg(tiny_assets, cache, f"out_dir={tmp_path / 'run'}", "train.num_workers=2", "train.steps=2",
               "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=2e-3", "dipo.alpha=3.0",
               "logging.wandb=disabled")
    run_unlearning(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # step 1 is at θ = ref: if the cached statistics belong to the right blocks, the DiPO margin is 0,
    # the loss is (2/β)·log 2 and the KL to the reference on retain is 0
    beta = cfg.dipo.beta
    assert log[0]["forget_loss"] == pytest.approx(2 / beta * math.log(2), rel=1e-5)
    assert abs(log[0]["dipo_margin"]) < 1e-3
    assert abs(log[0]["retain_loss"]) < 1e-5
    assert log[1]["dipo_margin"] > 1e-3  # and it unlearns from there


# ------------------------------------------------------------------------------------------
# Pieces of the precompute, without Ray
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_writer_streams_a_safetensors_file_with_its_checksums(tmp_path, dtype):
    """Batches written as they arrive (the first tensor streamed, the others at the end), read
    back by safetensors as written; the checksums computed while writing are those of the file's
    index (header and block ids) and of each row's bytes (every statistics tensor, file order)."""
    from safetensors import safe_open

    from dipo_scale.reference.precompute import ShardWriter

    data = {"topk_logits": torch.randn(5, 4, 3).to(dtype), "topk_ids": torch.randint(0, 9, (5, 4, 3), dtype=torch.int32),
            "lse": torch.randn(5, 4)}
    computed = {k: (v.dtype, tuple(v.shape)) for k, v in data.items()}
    writer = ShardWriter(tmp_path / "s.safetensors", {"block_id": torch.arange(10, 15)}, computed, {"x": 1})
    for s in range(0, 5, 2):
        writer.put({k: v[s:s + 2] for k, v in data.items()})
    sums = writer.close()
    raw = (tmp_path / "s.safetensors").read_bytes()
    assert sums["bytes"] == len(raw) and sums["index_bytes"] == 8 + int.from_bytes(raw[:8], "little") + 5 * 8
    assert sums["index_sha256"] == hashlib.sha256(raw[:sums["index_bytes"]]).hexdigest()
    row = lambda t, r: t[r].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # noqa: E731
    assert sums["row_sha256"] == [hashlib.sha256(b"".join(row(data[k], r) for k in data)).hexdigest()
                                  for r in range(5)]
    with safe_open(tmp_path / "s.safetensors", framework="pt") as f:
        assert f.get_tensor("block_id").tolist() == list(range(10, 15))
        assert f.metadata() == {"dipo_scale": '{"x": 1}'}
        for k, v in data.items():
            assert torch.equal(f.get_tensor(k), v) and torch.equal(f.get_slice(k)[1:3], v[1:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temporary file left

    # fewer rows than the header promises: refused, nothing renamed into place, no temporary file
    writer = ShardWriter(tmp_path / "short.safetensors", {}, {"hidden": (torch.float32, (2, 2))}, {})
    writer.put({"hidden": torch.zeros(1, 2)})
    with pytest.raises(RuntimeError, match="wrote 8 data bytes, the header says 16"):
        writer.close()
    writer = ShardWriter(tmp_path / "aborted.safetensors", {}, {"hidden": (torch.float32, (2, 2))}, {})
    writer.put({"hidden": torch.zeros(1, 2)})
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_reference_forward_uses_the_trunk_only_where_it_is_the_heads_input(tiny_assets, one_thread):
    """The trunk's output is bitwise the full forward's head input (hidden) and head(trunk) its
    logits' statistics (topk); a model that rescales its logits after the head fails the probe
    and keeps the full forward."""
    from transformers import AutoModelForCausalLM

    from dipo_scale.reference.precompute import ReferenceForward, probe_input

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["target"]).eval()
    ids = torch.randint(0, 320, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    for form in ("hidden", "topk"):
        forward = ReferenceForward(model, _cfg(tiny_assets, "/tmp/unused", f"reference.form={form}", "reference.k=7"))
        with torch.no_grad():
            assert bool(forward(**probe_input("cpu")))
            fast = forward(input_ids=ids, attention_mask=mask)
            forward.via_decoder = False
            full = forward(input_ids=ids, attention_mask=mask)
        assert fast.keys() == full.keys() and all(torch.equal(fast[k], full[k]) for k in fast)

    class Rescaled(torch.nn.Module):  # a head input the trunk does not give
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_decoder(self):
            return self.inner.get_decoder()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask, use_cache=False):
            hidden = self.inner.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
            return type("Out", (), {"logits": self.get_output_embeddings()(2 * hidden)})()

    forward = ReferenceForward(Rescaled(model), _cfg(tiny_assets, "/tmp/unused"))
    with torch.no_grad():
        assert not bool(forward(**probe_input("cpu")))


def test_pool_size_uses_the_cluster_cores_by_default(tiny_assets):
    from dipo_scale.reference.precompute import pool_size

    nodes = [{"CPU": 16.0}, {"CPU": 16.0}]
    cfg = lambda *extra: _cfg(tiny_assets, "/tmp/unused", *extra)  # noqa: E731
    assert pool_size(cfg(), items=10, nodes=nodes) == (2, 16)  # one actor per node, all its cores
    assert pool_size(cfg(), items=1, nodes=nodes) == (1, 16)  # never more actors than shards
    assert pool_size(cfg("reference.num_workers=4"), items=10, nodes=nodes) == (4, 4)
    assert pool_size(cfg("reference.cpus_per_worker=8"), items=10, nodes=nodes) == (4, 8)
    assert pool_size(cfg("reference.mode=zero3"), items=1, nodes=nodes) == (2, 16)  # every rank joins the forwards
    with pytest.raises(UserInputError, match=r"3 workers of 16 CPUs do not fit the cluster's nodes .*: 2 fit"):
        pool_size(cfg("reference.num_workers=3", "reference.cpus_per_worker=16"), items=10, nodes=nodes)


def test_pool_size_on_gpus_gives_each_worker_its_nodes_cpus_per_gpu(tiny_assets):
    """Two nodes of 8 GPUs and 96 CPUs and a head node of 64 CPUs without GPUs: 16 workers of at
    most 12 CPUs (96 / 8), never (96·2 + 64) / 16 = 16, which no GPU node can place 8 times."""
    from dipo_scale.reference.precompute import pool_size

    nodes = [{"CPU": 96.0, "GPU": 8.0}, {"CPU": 96.0, "GPU": 8.0}, {"CPU": 64.0}]
    cfg = lambda *extra: _cfg(tiny_assets, "/tmp/unused", "train.use_gpu=true", *extra)  # noqa: E731
    for mode in ("actors", "zero3"):
        workers, cpus = pool_size(cfg(f"reference.mode={mode}"), items=100, nodes=nodes)
        assert (workers, cpus) == (16, 12)
        assert workers <= sum(min(n.get("GPU", 0), n["CPU"] // cpus) for n in nodes)  # all of them fit
    # uneven GPU nodes: the fewest CPUs per GPU
    assert pool_size(cfg(), items=100, nodes=[{"CPU": 32.0, "GPU": 4.0}, {"CPU": 64.0, "GPU": 4.0}]) == (8, 8)
    assert pool_size(cfg(), items=3, nodes=nodes) == (3, 12)  # the actor pool: no more actors than shards
    with pytest.raises(UserInputError, match=r"16 workers of 24 CPUs \+ 1 GPU do not fit .*: 8 fit"):
        pool_size(cfg("reference.cpus_per_worker=24"), items=100, nodes=nodes)
    with pytest.raises(UserInputError, match="the Ray cluster has no GPUs"):
        pool_size(cfg(), items=100, nodes=[{"CPU": 64.0}])


def test_shard_rows_follow_the_byte_budget(tiny_assets):
    """A 7B-like model (H = 4096, float32) at 2048-token blocks: 32 MiB per block, so a 1 GiB
    shard holds 32 blocks (never 256 blocks, 8 GiB); `rows_per_shard` caps it; a block larger
    than the budget makes a one-block shard."""
    from dipo_scale.reference.cache import bytes_per_token
    from dipo_scale.reference.precompute import shard_rows

    cfg = lambda *extra: _cfg(tiny_assets, "/tmp/unused", "reference.shard_bytes=1073741824", *extra)  # noqa: E731
    row = 2048 * bytes_per_token("hidden", hidden_size=4096, k=0, dtype="float32")
    assert row == 32 << 20 and shard_rows(cfg(), row) == 32 and shard_rows(cfg(), row) * row <= 1 << 30
    assert shard_rows(cfg("reference.rows_per_shard=8"), row) == 8
    assert shard_rows(cfg("reference.shard_bytes=1000"), row) == 1
    from dipo_scale.config import ReferenceConfig

    assert ReferenceConfig().shard_bytes == 1 << 30 and ReferenceConfig().rows_per_shard is None  # the defaults


def test_gpu_runs_never_force_the_cpu_accelerator(tiny_assets, tmp_path, monkeypatch):
    """The precompute's Ray job gets DS_ACCELERATOR=cpu for CPU runs only; a GPU worker whose
    DeepSpeed accelerator is not CUDA stops in one line."""
    from dipo_scale.reference import precompute

    seen = []

    class Stop(Exception):
        pass

    def fake_init_ray(**kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(precompute, "init_ray", fake_init_ray)
    for use_gpu in ("false", "true"):
        with pytest.raises(Stop):
            precompute_reference(_cfg(tiny_assets, tmp_path / use_gpu, f"train.use_gpu={use_gpu}"))
    assert seen[0]["runtime_env"] == {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    assert "runtime_env" not in seen[1]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # (this process's accelerator is the CPU one)
    precompute._check_accelerator(_cfg(tiny_assets, tmp_path))  # a CPU run: fine
    with pytest.raises(UserInputError, match=r"accelerator is cpu \(DS_ACCELERATOR=cpu.*remove DS_ACCELERATOR"):
        precompute._check_accelerator(_cfg(tiny_assets, tmp_path, "train.use_gpu=true"))


def test_shard_actor_runs_all_its_torch_work_on_one_thread(tiny_assets, tmp_path, monkeypatch, one_thread):
    """Ray Data constructs the actor on one thread and calls it on another: the model's load,
    probe and shard forwards must still share one thread (one OpenMP team), and the shard is
    written."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from dipo_scale.reference import precompute

    threads: list[int] = []
    load = precompute.load_reference_model

    def recording_load(cfg):
        model = load(cfg)
        model.get_decoder().register_forward_pre_hook(lambda *_: threads.append(threading.get_ident()))
        return model

    monkeypatch.setattr(precompute, "load_reference_model", recording_load)
    cfg = _cfg(tiny_assets, tmp_path / "cache")
    manifest = json.loads((Path(tiny_assets["prepared"]) / "manifest.json").read_text())
    actor = precompute.ShardActor(cfg.model_dump(by_alias=True), block_size=manifest["block_size"],
                                  hidden_size=64, threads=1)
    assert len(threads) >= 1  # the probe ran
    item = {"split": "forget", "file": "forget/part-00000.safetensors", "first_block": 0, "rows": 2, "key": "k"}
    with ThreadPoolExecutor(1) as caller:  # as Ray Data calls the actor: from a thread of its own
        out = caller.submit(actor, {"item": np.array([json.dumps(item)])}).result()
    assert list(out["file"]) == [item["file"]]
    assert len(threads) >= 2 and len(set(threads)) == 1 and threads[0] != threading.get_ident()
    assert (tmp_path / "cache" / "forget" / "part-00000.json").is_file()


@pytest.mark.parametrize("edit,fragment", [
    (lambda raw: raw.replace(b'"form"', b'"f\xffrm"', 1), "not UTF-8 text (byte 0xff"),
    (lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "splits"}).encode(), "no dict 'splits'"),
    (lambda raw: json.dumps([json.loads(raw)]).encode(), "a JSON list"),
    (lambda raw: json.dumps({**json.loads(raw), "splits": {"forget": {"blocks": 3}}}).encode(),
     "split 'forget' lacks blocks or shards"),
], ids=["not-utf8", "no-splits", "a-list", "split-without-shards"])
def test_a_damaged_cache_manifest_is_one_line(hidden_cache, tmp_path, edit, fragment):
    """A cache manifest with non-UTF-8 bytes or without the shape its readers use (a traceback
    before): one line naming the file."""
    from dipo_scale.errors import UserInputError
    from dipo_scale.reference.cache import read_cache_manifest

    cache, _ = hidden_cache
    (tmp_path / "manifest.json").write_bytes(edit((cache / "manifest.json").read_bytes()))
    with pytest.raises(UserInputError) as e:
        read_cache_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value) and fragment in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
