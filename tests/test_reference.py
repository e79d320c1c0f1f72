"""Reference-statistics cache: precompute (Ray Data actor pool, ZeRO-3 workers), resume after a
kill, fingerprint refusal, shard verification, and a ZeRO-3 training run that reads the cache."""

from __future__ import annotations

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
from dipo_scale.reference import ReferenceCache, precompute_reference
from dipo_scale.reference.precompute import SLOW_ENV, _completed
from dipo_scale.unlearn import validate_run

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_SHARD = 6


def _settings(tiny_assets, cache_dir, *extra):
    return [f"model.path={tiny_assets['target']}", f"data.prepared_dir={tiny_assets['prepared']}",
            "method=dipo", "loss.retain=kl", "reference.form=hidden", f"reference.cache_dir={cache_dir}",
            f"reference.rows_per_shard={ROWS_PER_SHARD}", "reference.batch_size=4", *extra]


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
    assert set(manifest["fingerprints"]) == {"reference_weights", "tokenizer", "packed_data", "settings"}
    for split in ("forget", "retain"):
        info = manifest["splits"][split]
        assert info["blocks"] == prepared["splits"][split]["blocks"]
        assert len(info["shards"]) == math.ceil(info["blocks"] / ROWS_PER_SHARD)
        for i, shard in enumerate(info["shards"]):
            with safe_open(cache / shard["file"], framework="pt") as f:
                ids = f.get_tensor("block_id").tolist()
            assert ids == list(range(i * ROWS_PER_SHARD, i * ROWS_PER_SHARD + shard["rows"]))
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
               "reference.mode=zero3", "reference.num_workers=2", "loss.retain=none")
    manifest = precompute_reference(cfg)
    assert manifest["form"] == "topk" and manifest["k"] == 320 and manifest["bytes_per_token"] == 320 * 8 + 4
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


def test_truncated_or_corrupt_shard_is_refused_on_read(tiny_assets, hidden_cache, tmp_path):
    cache = tmp_path / "copy"
    shutil.copytree(hidden_cache[0], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    second = cache / manifest["splits"]["forget"]["shards"][1]["file"]
    second.write_bytes(second.read_bytes()[:-100])  # truncated
    reader = ReferenceCache(cache)
    assert reader.read("forget", [0, 2])["hidden"].shape[0] == 2  # shard 0 only: still readable
    with pytest.raises(UserInputError, match="part-00001.safetensors: checksum does not match"):
        reader.read("forget", [0, ROWS_PER_SHARD])
    (cache / "manifest.json").unlink()
    with pytest.raises(UserInputError, match="unfinished"):
        ReferenceCache(cache)


def test_flipped_byte_in_a_cache_shard_is_refused_before_workers_start(tiny_assets, hidden_cache, tmp_path, capsys):
    cache = tmp_path / "copy"
    shutil.copytree(hidden_cache[0], cache)
    shard = cache / json.loads((cache / "manifest.json").read_text())["splits"]["forget"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    sets = _settings(tiny_assets, cache, f"out_dir={tmp_path / 'run'}")
    code = main(["unlearn", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "part-00001.safetensors: checksum does not match" in err[0], err
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
    assert code == 2 and len(err) == 1 and "settings (reference_dtype: float32 vs bfloat16)" in err[0]


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
def test_shard_writer_streams_a_safetensors_file_with_its_sha256(tmp_path, dtype):
    """Batches written as they arrive (the first tensor streamed, the others at the end), read
    back by safetensors as written; the sha256 computed while writing is the file's."""
    from safetensors import safe_open

    from dipo_scale.files import sha256_file
    from dipo_scale.reference.precompute import ShardWriter

    data = {"topk_logits": torch.randn(5, 4, 3).to(dtype), "topk_ids": torch.randint(0, 9, (5, 4, 3), dtype=torch.int32),
            "lse": torch.randn(5, 4)}
    computed = {k: (v.dtype, tuple(v.shape)) for k, v in data.items()}
    writer = ShardWriter(tmp_path / "s.safetensors", {"block_id": torch.arange(10, 15)}, computed, {"x": 1})
    for s in range(0, 5, 2):
        writer.put({k: v[s:s + 2] for k, v in data.items()})
    sha, size = writer.close()
    assert (sha, size) == (sha256_file(tmp_path / "s.safetensors"), (tmp_path / "s.safetensors").stat().st_size)
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


def test_pool_size_uses_the_cluster_cores_by_default(tiny_assets, monkeypatch):
    import ray

    from dipo_scale.reference.precompute import pool_size

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0}}, {"Alive": True, "Resources": {"CPU": 16.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cfg = lambda *extra: _cfg(tiny_assets, "/tmp/unused", *extra)  # noqa: E731
    assert pool_size(cfg(), items=10) == (2, 16)  # one actor per node, all its cores
    assert pool_size(cfg(), items=1) == (1, 16)  # never more actors than shards
    assert pool_size(cfg("reference.num_workers=4"), items=10) == (4, 4)
    assert pool_size(cfg("reference.cpus_per_worker=8"), items=10) == (4, 8)
    assert pool_size(cfg("reference.mode=zero3"), items=1) == (2, 16)  # every rank joins the forwards
    nodes[0]["Resources"]["GPU"] = 2.0
    assert pool_size(cfg("train.use_gpu=true"), items=10) == (2, 16)  # one per GPU


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
