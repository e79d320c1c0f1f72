"""Reference statistics: precompute the reference model's statistics once, read them while training.

DiPO (and NPO, and the `kl` retain term) need the reference model's logits at every position of
a batch. The `online` form runs a frozen reference engine every step (`dipo_scale.unlearn`);
this module writes a cache once (`dipo-scale reference`, `ray_jobs/precompute_reference.py`) in
one of two forms (docs/DIPO.md, "Reference statistics"):

* `hidden` (exact): the reference's final hidden state at every position — the input of its LM
  head, captured with a forward pre-hook on the output embedding, so it is exact for any
  architecture — plus one copy of the frozen LM-head weight (`lm_head.safetensors`, float32).
  The losses rebuild the logits chunk by chunk (`dipo_scale.losses.HiddenReference`).
* `topk` (approximate; K = `reference.k`): the K largest logits, their ids (int32) and the
  log-sum-exp over the whole vocabulary (float32). The rest of the row is rebuilt with the
  left-over probability mass spread uniformly over the other V − K ids, so the stored ids keep
  their exact log-probabilities and K = V is exact (`dipo_scale.losses.TopKReference`).

Bytes per stored position: `hidden` H·s, `topk` K·(s + 4) + 4, with s = 4 (float32) or 2
(bfloat16, `reference.dtype`); full float32 logits would be 4·V.

Layout of `reference.cache_dir` (the packed blocks of `data.prepared_dir`, shard by shard):

    fingerprints.json                 what the shards are computed for (written first)
    lm_head.safetensors (+ .json)     hidden form: the LM-head weight [V, H] (and bias [V])
    forget/part-00000.safetensors     block_id [R] and the statistics of blocks
    forget/part-00000.json            first_block .. first_block + R - 1, in block order;
    ...                               the .json holds the shard's sha256, written after it
    retain/...                        when the run's retain term is `kl`
    manifest.json                     written last: form, sizes, bytes_per_token, fingerprints,
                                      every shard's sha256 (a cache without it is unfinished)

Every position of every block is stored (padding too), aligned with the block's `input_ids`:
position t holds the statistics of the reference logits at t (which predict token t + 1).

Precompute (`precompute_reference`) is a distributed job over the shards still to write:
* `reference.mode=actors`: Ray Data batch inference, `map_batches` over the shard list with a
  pool of `reference.num_workers` model actors (one model each; for models that fit a device;
  `reference.quantize` loads them with bitsandbytes 8-bit or 4-bit);
* `reference.mode=zero3`: `reference.num_workers` Ray Train workers holding one DeepSpeed ZeRO-3
  inference engine between them (for models that do not fit one device). Every rank runs the
  same number of forwards (ZeRO-3 gathers parameters collectively): a rank with fewer blocks to
  do runs padding forwards whose output is dropped.
Each worker reads only the packed blocks of its shards, runs `reference.batch_size` blocks per
forward and writes each shard to a temporary name, renamed when complete, then its `.json`.
A stopped job resumes: a rerun keeps every shard whose `.json` exists and whose sha256 matches
it, removes leftover temporary files and computes only the rest. A rerun with other
fingerprints into the same `cache_dir` is refused (choose another directory or remove it).

Fingerprints: the reference weights (sha256 of its config and weight files), the tokenizer (of
the packed data), the packed data (the prepared manifest's data fingerprint and block counts)
and the settings that change the statistics (form, k, storage dtype, quantisation, the
reference's compute dtype). Training (`unlearn.validate_run`, on the driver) compares them with
the run's and refuses a cache that differs, in one line naming what differs.

Training reads only what it needs: each worker, at each micro step, reads the rows of its own
block ids from the shards holding them (`ReferenceCache.reference`): the shard file is
memory-mapped and only those rows are copied. The first time a worker touches a shard it checks
the file's sha256 against manifest.json; a truncated or corrupt shard is an error, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dipo_scale.config import UnlearnConfig, resolve_ds_config_path
from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_write_json, check_output_dir, mark_output_dir, sha256_file, weights_fingerprint
from dipo_scale.preflight import check_model, check_prepared

CACHE_VERSION = 1
SLOW_ENV = "DIPO_SCALE_REFERENCE_SHARD_DELAY_S"  # tests: seconds to wait after each shard


# ------------------------------------------------------------------------------------------
# What a run needs, and the fingerprints of a cache
# ------------------------------------------------------------------------------------------
def reference_path(cfg: UnlearnConfig) -> str:
    return cfg.model.reference_path or cfg.model.path


def needed_splits(cfg: UnlearnConfig) -> list[str]:
    """Splits whose reference statistics the run uses: forget for DiPO/NPO, retain for `kl`."""
    splits = ["forget"] if cfg.method in ("dipo", "npo") else []
    return splits + (["retain"] if cfg.loss.retain == "kl" else [])


def cache_settings(cfg: UnlearnConfig) -> dict:
    """The settings that change what a cache holds."""
    r = cfg.reference
    return {"form": r.form, "k": r.k if r.form == "topk" else None, "dtype": r.dtype,
            "quantize": r.quantize, "reference_dtype": cfg.model.dtype}


def run_fingerprints(cfg: UnlearnConfig) -> dict:
    """The fingerprints a cache must carry to be used by this run (or written by this precompute)."""
    from dipo_scale.prepare import read_manifest

    prepared = read_manifest(cfg.data.prepared_dir)
    data = {"data_fingerprint": prepared["data_fingerprint"], "block_size": prepared["block_size"],
            "blocks": {s: prepared["splits"][s]["blocks"] for s in sorted(prepared["splits"])}}
    return {
        "reference_weights": weights_fingerprint(reference_path(cfg)),
        "tokenizer": prepared["tokenizer_fingerprint"],
        "packed_data": hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16],
        "settings": cache_settings(cfg),
    }


FINGERPRINT_NAMES = {"reference_weights": "reference weights", "tokenizer": "tokenizer",
                     "packed_data": "packed data", "settings": "settings"}


def describe_difference(cached: dict, run: dict) -> str | None:
    """'reference weights, settings (form: hidden vs topk)' or None when they agree."""
    parts = []
    for key, name in FINGERPRINT_NAMES.items():
        a, b = cached.get(key), run.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(set(a) | set(b))
            name += " (" + ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)) + ")"
        else:
            name += f" ({str(a)[:8]} vs {str(b)[:8]})"
        parts.append(name)
    return ", ".join(parts) or None


def bytes_per_token(form: str, *, hidden_size: int, k: int, dtype: str) -> int:
    """Bytes stored per position: hidden H·s; topk K·(s + 4) + 4 (logits, int32 ids, float32 lse)."""
    s = 2 if dtype == "bfloat16" else 4
    return hidden_size * s if form == "hidden" else k * (s + 4) + 4


# ------------------------------------------------------------------------------------------
# Reading a cache (training)
# ------------------------------------------------------------------------------------------
def read_cache_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        hint = " (unfinished: rerun `dipo-scale reference` to complete it)" if (
            Path(cache_dir) / "fingerprints.json").is_file() else " (run `dipo-scale reference`)"
        raise UserInputError(f"reference.cache_dir {cache_dir}: no manifest.json{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None


def check_cache(cfg: UnlearnConfig) -> dict:
    """Refuse (UserInputError, one line) a cache that does not match the run; returns its manifest."""
    r = cfg.reference
    manifest = read_cache_manifest(r.cache_dir)
    diff = describe_difference(manifest.get("fingerprints", {}), run_fingerprints(cfg))
    if diff:
        raise UserInputError(f"reference.cache_dir {r.cache_dir}: built for a different run — differs in "
                             f"{diff}; rerun `dipo-scale reference` with this config")
    missing = [s for s in needed_splits(cfg) if s not in manifest["splits"]]
    if missing:
        raise UserInputError(f"reference.cache_dir {r.cache_dir}: has no {', '.join(missing)} statistics "
                             "(the retain split is cached when loss.retain=kl); rerun `dipo-scale reference`")
    if r.form == "topk" and cfg.method == "dipo" and cfg.dipo.select == "topk" and cfg.dipo.k > r.k:
        raise UserInputError(f"dipo.k: {cfg.dipo.k} exceeds reference.k ({r.k}), the logits the cache keeps")
    ReferenceCache(r.cache_dir).verify(needed_splits(cfg))  # every shard the run reads, before workers start
    return manifest


class ReferenceCache:
    """A finished cache, read by block id. Shards are verified (sha256) the first time they are read."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        self.manifest = read_cache_manifest(self.root)
        self.form = self.manifest["form"]
        self.vocab_size = self.manifest["vocab_size"]
        self._verified: set[str] = set()
        self._head = None

    def _verified_path(self, entry: dict) -> Path:
        path = self.root / entry["file"]
        if entry["file"] not in self._verified:
            if not path.is_file():
                raise UserInputError(f"{path}: shard listed in manifest.json is missing")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise UserInputError(f"{path}: checksum does not match manifest.json (truncated or corrupt "
                                     "shard); rerun `dipo-scale reference` to recompute it")
            self._verified.add(entry["file"])
        return path

    def verify(self, splits: list[str]) -> None:
        """Check every shard of `splits` (and the LM head) against the manifest now."""
        for split in splits:
            for entry in self.manifest["splits"][split]["shards"]:
                self._verified_path(entry)
        if self.manifest.get("lm_head"):
            self._verified_path(self.manifest["lm_head"])

    def read(self, split: str, block_ids) -> dict[str, torch.Tensor]:
        """The statistics of `block_ids` (in that order): tensors [len(block_ids), T, ...]."""
        from safetensors import safe_open

        info = self.manifest["splits"].get(split)
        if info is None:
            raise UserInputError(f"{self.root}: no {split} statistics in this cache")
        per_shard = self.manifest["rows_per_shard"]
        block_ids = np.asarray(block_ids, dtype=np.int64)
        if len(block_ids) and (block_ids.min() < 0 or block_ids.max() >= info["blocks"]):
            raise ValueError(f"block ids outside 0..{info['blocks'] - 1}")
        parts: dict[str, list] = {}
        order = []
        for shard_index in sorted(set((block_ids // per_shard).tolist())):
            entry = info["shards"][shard_index]
            wanted = block_ids[block_ids // per_shard == shard_index]
            with safe_open(self._verified_path(entry), framework="pt") as f:
                for name in f.keys():
                    if name == "block_id":
                        continue
                    sl = f.get_slice(name)
                    rows = [sl[i - entry["first_block"]:i - entry["first_block"] + 1] for i in wanted.tolist()]
                    parts.setdefault(name, []).append(torch.cat(rows))
            order.append(wanted)
        out = {name: torch.cat(chunks) for name, chunks in parts.items()}
        # back to the order asked for
        position = {b: i for i, b in enumerate(np.concatenate(order).tolist())} if order else {}
        index = torch.as_tensor([position[b] for b in block_ids.tolist()], dtype=torch.long)
        return {name: t[index] for name, t in out.items()}

    def lm_head(self, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen LM-head weight [V, H] (and bias) of the hidden form, loaded once per device."""
        from safetensors.torch import load_file

        device = torch.device(device or "cpu")
        if self._head is None or self._head[0].device != device:
            tensors = load_file(self._verified_path(self.manifest["lm_head"]))
            self._head = (tensors["weight"].to(device), None if "bias" not in tensors else tensors["bias"].to(device))
        return self._head

    def reference(self, split: str, block_ids, device=None):
        """The reference of these blocks as a loss input (HiddenReference / TopKReference)."""
        from dipo_scale.losses import HiddenReference, TopKReference

        t = {k: v.to(device) for k, v in self.read(split, block_ids).items()}
        if self.form == "hidden":
            return HiddenReference(t["hidden"], *self.lm_head(device))
        return TopKReference(t["topk_logits"], t["topk_ids"], t["lse"], self.vocab_size)

    def references(self, device=None, **block_ids) -> dict:
        """{split: reference or None} for split=ids keyword arguments (None: not needed)."""
        return {split: None if ids is None else self.reference(split, ids, device)
                for split, ids in block_ids.items()}


# ------------------------------------------------------------------------------------------
# Computing statistics (both precompute modes)
# ------------------------------------------------------------------------------------------
def read_block_range(prepared_dir: str | Path, split: str, first: int, rows: int,
                     verified: set | None = None) -> dict[str, np.ndarray]:
    """Blocks first .. first + rows - 1 of a prepared split, reading only the parquet shards that
    hold them (each shard's sha256 is checked once per `verified` set)."""
    import pyarrow.parquet as pq

    from dipo_scale.prepare import read_manifest

    root = Path(prepared_dir)
    manifest = read_manifest(root)
    verified = set() if verified is None else verified
    out: dict[str, list] = {"input_ids": [], "attention_mask": []}
    start = 0
    for shard in manifest["splits"][split]["shards"]:
        lo, hi = max(first, start), min(first + rows, start + shard["rows"])
        if lo < hi:
            path = root / shard["file"]
            if shard["file"] not in verified:
                if not path.is_file() or sha256_file(path) != shard["sha256"]:
                    raise UserInputError(f"{path}: missing or checksum does not match manifest.json")
                verified.add(shard["file"])
            table = pq.read_table(path, columns=["input_ids", "attention_mask"]).slice(lo - start, hi - lo)
            for key in out:
                col = table.column(key).combine_chunks()
                out[key].append(col.values.to_numpy().reshape(len(table), -1).astype(np.int64))
        start += shard["rows"]
    return {k: np.concatenate(v) for k, v in out.items()}


def load_reference_model(cfg: UnlearnConfig):
    """The reference for the actor-pool precompute, optionally quantised with bitsandbytes."""
    from transformers import AutoModelForCausalLM

    load: dict[str, Any] = dict(dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32,
                                trust_remote_code=cfg.model.trust_remote_code)
    if cfg.reference.quantize != "none":
        try:
            from transformers import BitsAndBytesConfig

            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UserInputError(f"reference.quantize={cfg.reference.quantize}: bitsandbytes is not "
                                 f"available ({e})") from None
        load["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if cfg.reference.quantize == "8bit"
                                       else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=load["dtype"]))
        if cfg.train.use_gpu:
            load["device_map"] = {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(reference_path(cfg), **load)
    except Exception as e:  # noqa: BLE001  (a backend that cannot run here: one line, not a trace)
        if cfg.reference.quantize == "none":
            raise
        raise UserInputError(f"reference.quantize={cfg.reference.quantize}: bitsandbytes could not load "
                             f"{reference_path(cfg)} here: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


class _HeadInput:
    """Captures the input of the model's LM head (the final hidden state) during a forward."""

    def __init__(self, model):
        self.value = None
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.value = args[0].detach()


def statistics(model, call, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: UnlearnConfig,
               head: _HeadInput) -> dict[str, torch.Tensor]:
    """The cached form's tensors for one batch of blocks ([b, T, ...], stored dtypes)."""
    r = cfg.reference
    store = torch.bfloat16 if r.dtype == "bfloat16" else torch.float32
    with torch.no_grad():
        logits = call(input_ids=input_ids, attention_mask=attention_mask).logits
        if r.form == "hidden":
            return {"hidden": head.value.to(store).cpu()}
        from dipo_scale.losses import topk_statistics

        top, ids, lse = topk_statistics(logits, r.k)
        return {"topk_logits": top.to(store).cpu(), "topk_ids": ids.to(torch.int32).cpu(),
                "lse": lse.to(torch.float32).cpu()}


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # one metadata entry: safetensors writes several in hash-map order, which would make the
        # bytes (and the sha256) of two identical shards differ
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"dipo_scale": json.dumps(metadata, sort_keys=True)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finish_shard(cache: Path, item: dict, tensors: dict[str, torch.Tensor], tokens: int, seconds: float,
                  delay: float = 0.0) -> None:
    """Write a shard (temp name, then rename) and then its .json with the sha256."""
    path = cache / item["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_safetensors(path, tensors, {"split": item["split"], "first_block": item["first_block"],
                                        "rows": item["rows"], "key": item["key"]})
    atomic_write_json(path.with_suffix(".json"), {
        "file": item["file"], "split": item["split"], "first_block": item["first_block"],
        "rows": item["rows"], "key": item["key"], "sha256": sha256_file(path),
        "bytes": path.stat().st_size, "tokens": tokens, "seconds": round(seconds, 4)})
    if delay:  # tests: widen the window in which a precompute can be killed midway
        time.sleep(delay)


def _write_lm_head(cache: Path, item: dict, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    tensors = {"weight": weight.detach().to(torch.float32).cpu()}
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float32).cpu()
    _finish_shard(cache, item, tensors, tokens=0, seconds=0.0)


def _compute_shard(model, call, head: _HeadInput, cfg: UnlearnConfig, item: dict, device,
                   verified: set, delay: float = 0.0) -> None:
    t0 = time.time()
    blocks = read_block_range(cfg.data.prepared_dir, item["split"], item["first_block"], item["rows"], verified)
    parts: dict[str, list] = {}
    bs = cfg.reference.batch_size
    for s in range(0, item["rows"], bs):
        ids = torch.as_tensor(blocks["input_ids"][s:s + bs]).to(device)
        mask = torch.as_tensor(blocks["attention_mask"][s:s + bs]).to(device)
        for k, v in statistics(model, call, ids, mask, cfg, head).items():
            parts.setdefault(k, []).append(v)
    tensors = {"block_id": torch.arange(item["first_block"], item["first_block"] + item["rows"], dtype=torch.int64),
               **{k: torch.cat(v) for k, v in parts.items()}}
    _finish_shard(Path(cfg.reference.cache_dir), item, tensors, int(blocks["attention_mask"].sum()),
                  time.time() - t0, delay)


class ShardActor:
    """Ray Data actor: loads the reference once, then computes and writes whole shards."""

    def __init__(self, config: dict, delay: float = 0.0):
        cfg = UnlearnConfig.model_validate(config)
        self.delay = delay
        if not cfg.train.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.cfg = cfg
        self.model = load_reference_model(cfg)
        self.device = next(self.model.parameters()).device
        if cfg.train.use_gpu and torch.cuda.is_available() and cfg.reference.quantize == "none":
            self.model.to("cuda")
            self.device = torch.device("cuda")
        self.head = _HeadInput(self.model)
        self.verified: set = set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [json.loads(s) for s in batch["item"]]
        for item in items:
            if item["split"] == "lm_head":
                out = self.model.get_output_embeddings()
                _write_lm_head(Path(self.cfg.reference.cache_dir), item, out.weight, getattr(out, "bias", None))
            else:
                _compute_shard(self.model, self.model, self.head, self.cfg, item, self.device, self.verified,
                               self.delay)
        return {"file": np.array([i["file"] for i in items])}


def _test_delay() -> float:
    return float(os.environ.get(SLOW_ENV, "0") or 0)


def _run_actor_pool(cfg: UnlearnConfig, todo: list[dict]) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"item": json.dumps(item)} for item in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(ShardActor, fn_constructor_kwargs={"config": cfg.model_dump(by_alias=True),
                                                           "delay": _test_delay()},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.reference.num_workers),
                        num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)
    done = ds.take_all()
    assert len(done) == len(todo), (len(done), len(todo))


def zero3_worker(config: dict) -> None:
    """Ray Train worker of `reference.mode=zero3`: one ZeRO-3 inference engine over all ranks."""
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = UnlearnConfig.model_validate(config["cfg"])
    if not cfg.train.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    ds = json.loads(resolve_ds_config_path(cfg.train.ds_config).read_text())
    ds = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    ds.update(train_micro_batch_size_per_gpu=cfg.reference.batch_size, gradient_accumulation_steps=1,
              train_batch_size=cfg.reference.batch_size * world)
    hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841  (keeps zero.Init on for from_pretrained)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(reference_path(cfg), dtype=dtype,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    head = _HeadInput(engine.module)
    cache = Path(cfg.reference.cache_dir)
    items = config["items"]

    head_items = [i for i in items if i["split"] == "lm_head"]
    if head_items:  # a collective: every rank gathers the head, rank 0 writes it
        out = engine.module.get_output_embeddings()
        params = [p for p in (out.weight, getattr(out, "bias", None)) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                _write_lm_head(cache, head_items[0], out.weight, getattr(out, "bias", None))

    shards = [i for i in items if i["split"] != "lm_head"]
    mine = shards[rank::world]
    forwards = [-(-i["rows"] // cfg.reference.batch_size) for i in shards]
    most = max([sum(forwards[r::world]) for r in range(world)] or [0])
    done = 0
    verified: set = set()
    for item in mine:
        _compute_shard(engine.module, engine, head, cfg, item, engine.device, verified, config["delay"])
        done += -(-item["rows"] // cfg.reference.batch_size)
    if done < most:  # padding forwards: ZeRO-3 needs every rank in every forward
        pad = torch.zeros(1, 2, dtype=torch.long, device=engine.device)
        for _ in range(most - done):
            with torch.no_grad():
                engine(input_ids=pad, attention_mask=torch.ones_like(pad))
    ray.train.report({"shards": len(mine)})


def _run_zero3(cfg: UnlearnConfig, todo: list[dict]) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cache = Path(cfg.reference.cache_dir)
    trainer = TorchTrainer(
        zero3_worker,
        train_loop_config={"cfg": cfg.model_dump(by_alias=True), "items": todo, "delay": _test_delay()},
        scaling_config=ScalingConfig(num_workers=cfg.reference.num_workers, use_gpu=cfg.train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=f"reference-{int(time.time())}", storage_path=str(cache / ".ray")),
    )
    trainer.fit()


@contextmanager
def _shard_progress(cache: Path, todo: list[dict], poll_s: float = 1.0):
    """Progress lines on the driver (shards done/total, rate, ETA, tokens/s) while the block runs,
    from the shard records the workers write: whatever the mode, and wherever workers print."""
    from dipo_scale.progress import Progress

    records = [(cache / item["file"]).with_suffix(".json") for item in todo]
    stale = {r: r.stat().st_mtime_ns for r in records if r.is_file()}  # of an earlier, unfinished run
    progress, seen, stop = Progress("reference", total=len(todo), unit="shards"), set(), threading.Event()
    tokens, t0 = 0, time.time()

    def speed() -> dict:
        return {"tokens/s": round(tokens / max(time.time() - t0, 1e-9))}

    def poll() -> None:
        nonlocal tokens
        new = [r for r in records if r not in seen and r.is_file() and r.stat().st_mtime_ns != stale.get(r)]
        seen.update(new)
        tokens += sum(json.loads(r.read_text()).get("tokens", 0) for r in new)
        progress.update(len(new), **speed())

    def watch() -> None:
        while not stop.wait(poll_s):
            poll()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    poll()
    progress.close(tokens=tokens, **speed())


# ------------------------------------------------------------------------------------------
# The precompute job (driver)
# ------------------------------------------------------------------------------------------
def plan_shards(cfg: UnlearnConfig, prepared: dict, key: str) -> list[dict]:
    """Every file of the cache: the LM head (hidden form), then each split's shards in block order."""
    r = cfg.reference
    items = [{"split": "lm_head", "file": "lm_head.safetensors", "first_block": 0, "rows": 0, "key": key}] \
        if r.form == "hidden" else []
    for split in needed_splits(cfg):
        blocks = prepared["splits"][split]["blocks"]
        for i, first in enumerate(range(0, blocks, r.rows_per_shard)):
            items.append({"split": split, "file": f"{split}/part-{i:05d}.safetensors", "first_block": first,
                          "rows": min(r.rows_per_shard, blocks - first), "key": key})
    return items


def _completed(cache: Path, item: dict) -> dict | None:
    """A shard's .json record when the shard is complete and its bytes match it, else None."""
    path, record_path = cache / item["file"], (cache / item["file"]).with_suffix(".json")
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    same = all(record.get(k) == item[k] for k in ("file", "first_block", "rows", "key"))
    if not same or path.stat().st_size != record.get("bytes") or sha256_file(path) != record.get("sha256"):
        return None
    return record


def _remove_leftovers(cache: Path) -> None:
    """Temporary files of an interrupted run (never renamed, so never trusted)."""
    for tmp in list(cache.glob(".*.tmp")) + list(cache.glob("*/.*.tmp")):
        tmp.unlink(missing_ok=True)


def _model_sizes(model_dir: str) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = getattr(config, "get_text_config", lambda: config)()
    return int(text.vocab_size), int(text.hidden_size)


def precompute_reference(cfg: UnlearnConfig) -> dict:
    """Write (or finish) the reference cache of `cfg` (module docstring); returns its manifest."""
    import ray

    from dipo_scale.prepare import read_manifest
    from dipo_scale.unlearn import absolute_paths

    r = cfg.reference
    if r.form == "online":
        raise UserInputError("reference.form: online needs no cache; set reference.form=hidden or topk")
    if not cfg.needs_reference():
        raise UserInputError(f"method={cfg.method} with loss.retain={cfg.loss.retain} uses no reference")
    if not cfg.data.prepared_dir:
        raise UserInputError("data.prepared_dir: not set (run `dipo-scale prepare` first)")
    model = check_model(reference_path(cfg), "model.reference_path" if cfg.model.reference_path else "model.path",
                        trust_remote_code=cfg.model.trust_remote_code)
    check_prepared(cfg.data.prepared_dir, model=model)
    check_output_dir(r.cache_dir, "reference", flag="reference.cache_dir",
                     inputs=[("model.path", reference_path(cfg)), ("data.prepared_dir", cfg.data.prepared_dir)])
    cfg = absolute_paths(cfg)
    r = cfg.reference
    prepared = read_manifest(cfg.data.prepared_dir)
    vocab, hidden = _model_sizes(reference_path(cfg))
    if r.form == "topk" and r.k > vocab:
        raise UserInputError(f"reference.k: {r.k} exceeds the vocabulary size of {reference_path(cfg)} ({vocab})")
    fingerprints = run_fingerprints(cfg)
    layout = {"version": CACHE_VERSION, "fingerprints": fingerprints, "rows_per_shard": r.rows_per_shard,
              "batch_size": r.batch_size, "splits": needed_splits(cfg)}
    key = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(r.cache_dir)
    started = cache / "fingerprints.json"
    has_shards = any(cache.glob("*/part-*.safetensors")) or (cache / "lm_head.safetensors").is_file()
    if started.is_file() and has_shards:  # a cache in progress: only the same run may finish it
        try:
            previous = json.loads(started.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserInputError(f"{started}: malformed JSON; choose another reference.cache_dir") from None
        diff = describe_difference(previous.get("fingerprints", {}), fingerprints)
        other = [k for k in ("version", "rows_per_shard", "batch_size", "splits") if previous.get(k) != layout[k]]
        if diff or other:
            raise UserInputError(f"reference.cache_dir {cache}: holds a cache for a different run — differs in "
                                 f"{', '.join(filter(None, [diff, *other]))}; choose another directory")
    mark_output_dir(cache, "reference")
    if not (started.is_file() and has_shards):  # a start that wrote no shard claims nothing
        atomic_write_json(started, layout)
    _remove_leftovers(cache)

    plan = plan_shards(cfg, prepared, key)
    todo = [item for item in plan if _completed(cache, item) is None]
    if not todo and (cache / "manifest.json").is_file():
        return read_cache_manifest(cache)  # finished before: nothing to do
    t0 = time.time()
    if todo:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}})
        with _shard_progress(cache, todo):
            (_run_zero3 if r.mode == "zero3" else _run_actor_pool)(cfg, todo)
    seconds = time.time() - t0

    records = {}
    for item in plan:
        record = _completed(cache, item)
        if record is None:
            raise RuntimeError(f"{cache / item['file']}: not written by the precompute")
        records[item["file"]] = record
    computed = {i["file"] for i in todo}
    tokens_now = sum(records[f]["tokens"] for f in computed)
    shard_seconds = sum(records[f]["seconds"] for f in computed)
    splits = {}
    for split in needed_splits(cfg):
        shards = [{k: records[i["file"]][k] for k in ("file", "first_block", "rows", "sha256", "bytes")}
                  for i in plan if i["split"] == split]
        splits[split] = {"blocks": prepared["splits"][split]["blocks"],
                         "tokens": prepared["splits"][split]["tokens"], "shards": shards}
    manifest = {
        "version": CACHE_VERSION, "form": r.form, "k": r.k if r.form == "topk" else None, "dtype": r.dtype,
        "vocab_size": vocab, "hidden_size": hidden, "block_size": prepared["block_size"],
        "rows_per_shard": r.rows_per_shard,
        "bytes_per_token": bytes_per_token(r.form, hidden_size=hidden, k=r.k, dtype=r.dtype),
        "full_logits_bytes_per_token": 4 * vocab,
        "total_bytes": sum(rec["bytes"] for rec in records.values()),
        "reference_path": reference_path(cfg), "prepared_dir": cfg.data.prepared_dir,
        "fingerprints": fingerprints, "splits": splits,
        "lm_head": ({k: records["lm_head.safetensors"][k] for k in ("file", "sha256", "bytes")}
                    if r.form == "hidden" else None),
        "precompute": {"mode": r.mode, "num_workers": r.num_workers, "quantize": r.quantize,
                       "batch_size": r.batch_size, "shards_computed": len([f for f in computed if f != "lm_head.safetensors"]),
                       "shards_reused": len(plan) - len(todo), "tokens_computed": tokens_now,
                       "seconds": round(seconds, 3),  # wall time of the job, start-up included
                       "tokens_per_second": round(tokens_now / seconds, 1) if tokens_now and seconds else None,
                       # time inside the workers' shard loops (reading blocks, forwards, writing)
                       "shard_seconds": round(shard_seconds, 3),
                       "tokens_per_second_per_worker": (round(tokens_now / shard_seconds, 1)
                                                        if tokens_now and shard_seconds else None)},
    }
    atomic_write_json(cache / "manifest.json", manifest)
    return manifest
