"""The precompute: write (or finish) a reference cache (`dipo-scale reference`).

`precompute_reference` is a distributed job over the shards still to write (the format:
`dipo_scale.reference.cache`):
* `reference.mode=actors`: Ray Data batch inference, `map_batches` over the shard list with a
  pool of `reference.num_workers` model actors of `reference.cpus_per_worker` CPUs each (torch
  threads = its CPUs; unset: one actor per node using all its cores, one per GPU with
  `train.use_gpu`, never more actors than shards: `pool_size`); one model each, for models that
  fit a device; `reference.quantize` loads them with bitsandbytes 8-bit or 4-bit;
* `reference.mode=zero3`: `reference.num_workers` Ray Train workers holding one DeepSpeed ZeRO-3
  inference engine between them (for models that do not fit one device; the engine set-up is
  `dipo_scale.unlearn`'s). Every rank runs the same number of forwards (ZeRO-3 gathers parameters
  collectively): a rank with fewer blocks to do runs padding forwards whose output is dropped.

Each worker reads only the packed blocks of its shards and runs `reference.batch_size` blocks per
forward of `ReferenceForward`: for `hidden` the decoder trunk alone (no logits are computed),
checked once per worker to give bitwise the tensor the model's own forward hands its LM head
(otherwise the full forward runs and a hook captures the head's input, so it is exact for any
architecture); for `topk` the trunk, the head and the top K. Each batch goes to a writer thread
(`ShardWriter`, a bounded queue) that streams it into the shard's temporary file and its sha256
while the next batch's forward runs; the file is renamed when complete, then its `.json` is
written (sha256, tokens, start and end times).

Before anything starts, the driver checks its inputs (`check_model`, `check_prepared`,
`check_output_dir`: one-line errors), marks the output directory as this command's and writes
`fingerprints.json`. A stopped job resumes: a rerun keeps every shard whose `.json` exists and
whose sha256 matches it, removes leftover temporary files and computes only the rest. A rerun
with other fingerprints into the same `cache_dir` is refused (choose another directory or remove
it). While workers run, the driver prints progress lines (shards done/total, rate, ETA,
tokens/s) from the shard records they write.
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

from dipo_scale.cluster import init_ray
from dipo_scale.config import UnlearnConfig, resolve_ds_config_path
from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_write_json, check_output_dir, mark_output_dir, sha256_file
from dipo_scale.memory import steady_allocator
from dipo_scale.preflight import check_model, check_prepared
from dipo_scale.reference.cache import (CACHE_VERSION, bytes_per_token, describe_difference, needed_splits,
                                        read_cache_manifest, reference_path, run_fingerprints)

SLOW_ENV = "DIPO_SCALE_REFERENCE_SHARD_DELAY_S"  # tests: seconds to wait after each shard


# ------------------------------------------------------------------------------------------
# Computing statistics (both precompute modes)
# ------------------------------------------------------------------------------------------
_LAST_TABLE: dict = {}  # the parquet shard read last in this process (its sha256 checked)


def read_block_range(prepared_dir: str | Path, split: str, first: int, rows: int,
                     verified: set | None = None) -> dict[str, np.ndarray]:
    """Blocks first .. first + rows - 1 of a prepared split, reading only the parquet shards that
    hold them (each shard's sha256 is checked once per `verified` set)."""
    import pyarrow.parquet as pq

    from dipo_scale.prepare import read_manifest, verified_shard

    root = Path(prepared_dir)
    manifest = read_manifest(root)
    verified = set() if verified is None else verified
    out: dict[str, list] = {"input_ids": [], "attention_mask": []}
    start = 0
    for shard in manifest["splits"][split]["shards"]:
        lo, hi = max(first, start), min(first + rows, start + shard["rows"])
        if lo < hi:
            path = verified_shard(root, shard, verify=shard["file"] not in verified)
            verified.add(shard["file"])
            if _LAST_TABLE.get("key") != (path, shard["sha256"]):  # a worker's consecutive shards share one
                _LAST_TABLE.update(key=(path, shard["sha256"]),
                                   table=pq.read_table(path, columns=["input_ids", "attention_mask"]))
            table = _LAST_TABLE["table"].slice(lo - start, hi - lo)
            for key in out:
                col = table.column(key).combine_chunks()
                out[key].append(col.values.to_numpy().reshape(len(table), -1).astype(np.int64))
        start += shard["rows"]
    return {k: np.concatenate(v) for k, v in out.items()}


def load_reference_model(cfg: UnlearnConfig):
    """The reference for the actor-pool precompute, optionally quantised with bitsandbytes."""
    from transformers import AutoModelForCausalLM

    load: dict[str, Any] = dict(dtype=torch.bfloat16 if cfg.model_dtype == "bfloat16" else torch.float32,
                                trust_remote_code=cfg.model.trust_remote_code)
    if cfg.reference.quantize != "none":
        from dipo_scale.eval.generation import quantization_config

        try:
            load["quantization_config"] = quantization_config(cfg.reference.quantize, load["dtype"])
        except UserInputError as e:
            raise UserInputError(f"reference.quantize={cfg.reference.quantize}: {e}") from None
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


class ReferenceForward(torch.nn.Module):
    """One reference forward to the statistics a cache stores, for a batch of blocks.

    `hidden`: the final hidden states (the LM head's input) from the decoder trunk alone; the
    logits are never computed. `topk`: the trunk, then the LM head and the top-K logits, their ids
    and the log-sum-exp. A ZeRO-3 engine wraps this module (`reference.mode=zero3`), so the
    parameters it uses are gathered around its forward.

    Taking the trunk's output as the head's input holds for heads that are a plain linear map of
    `get_decoder()(...)[0]` (Llama, Mistral, Qwen, ...). `probe` checks it on the model itself: the
    trunk's output must be bitwise the tensor the model's own forward hands its LM head, and the
    head applied to it bitwise the model's logits. Where either differs, `via_decoder` is turned
    off and every batch runs the model's full forward, the head's input captured by a hook (exact
    for any architecture, at the cost of the logits)."""

    def __init__(self, model, cfg: UnlearnConfig):
        super().__init__()
        self.model = model
        self.form, self.k = cfg.reference.form, cfg.reference.k
        self.store = torch.bfloat16 if cfg.reference_dtype == "bfloat16" else torch.float32
        self.via_decoder = True

    def _full(self, input_ids, attention_mask):
        """The model's own forward: (LM head input, logits)."""
        captured = []
        handle = self.model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: captured.append(args[0]))
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            handle.remove()
        return captured[0], logits

    def _trunk(self, input_ids, attention_mask):
        return self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    def forward(self, input_ids, attention_mask, probe: bool = False):
        if probe:  # (a forward, so that ZeRO-3 gathers what it uses)
            head_input, logits = self._full(input_ids, attention_mask)
            hidden = self._trunk(input_ids, attention_mask)
            same = torch.equal(hidden, head_input) and torch.equal(self.model.get_output_embeddings()(hidden), logits)
            return torch.tensor(same)
        if self.via_decoder:
            hidden = self._trunk(input_ids, attention_mask)
            logits = None if self.form == "hidden" else self.model.get_output_embeddings()(hidden)
        else:
            hidden, logits = self._full(input_ids, attention_mask)
        if self.form == "hidden":
            return {"hidden": hidden.to(self.store)}
        from dipo_scale.losses import topk_statistics

        top, ids, lse = topk_statistics(logits, self.k)
        return {"topk_logits": top.to(self.store), "topk_ids": ids.to(torch.int32), "lse": lse.to(torch.float32)}


def probe_input(device) -> dict[str, torch.Tensor]:
    """A short input for `ReferenceForward`'s probe (ids 0..7: valid in any vocabulary)."""
    ids = torch.arange(8, device=device).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "probe": True}


def stored_specs(cfg: UnlearnConfig, rows: int, block_size: int, hidden_size: int) -> dict[str, tuple]:
    """{name: (dtype, shape)} of a shard's computed tensors, in the order `ReferenceForward` returns them."""
    r = cfg.reference
    store = torch.bfloat16 if cfg.reference_dtype == "bfloat16" else torch.float32
    if r.form == "hidden":
        return {"hidden": (store, (rows, block_size, hidden_size))}
    return {"topk_logits": (store, (rows, block_size, r.k)), "topk_ids": (torch.int32, (rows, block_size, r.k)),
            "lse": (torch.float32, (rows, block_size))}


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32",
                       torch.int64: "I64"}


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes one cache shard (a safetensors file) while its batches are still being computed.

    The header is known before the first batch (`fixed` tensors, e.g. block_id, and the shapes of
    the computed ones), so the file is written front to back: header, fixed tensors, then the
    first computed tensor (`hidden`, or `topk_logits`) batch by batch as the batches arrive, then
    the other computed tensors (small: top-K ids, log-sum-exp), kept until the last batch. A
    writer thread takes the batches from a bounded queue (`depth` batches), writes them to a
    temporary file and feeds the sha256 as it goes: writing and hashing overlap the next batch's
    forward, and no shard is read back. `close` waits for the thread, syncs the file and renames
    it into place; it returns (sha256, bytes). Safetensors readers find tensors by their offsets,
    so this order reads like any other."""

    def __init__(self, path: Path, fixed: dict[str, torch.Tensor], computed: dict[str, tuple],
                 metadata: dict, depth: int = 2):
        import queue

        self.path = path
        self.names = list(computed)
        self.stream, self.later = self.names[0], {name: [] for name in self.names[1:]}
        header: dict[str, Any] = {"__metadata__": {"dipo_scale": json.dumps(metadata, sort_keys=True)}}
        offset = 0
        entries = [(n, t.dtype, tuple(t.shape)) for n, t in fixed.items()] + \
                  [(n, dtype, tuple(shape)) for n, (dtype, shape) in computed.items()]
        for name, dtype, shape in entries:
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        self.expected = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # as safetensors' own writer: the data starts 8-aligned
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.written = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._write(len(text).to_bytes(8, "little") + text)
        self.written = 0  # counts the data section
        for t in fixed.values():
            self._write(_raw_bytes(t))
        self.thread = threading.Thread(target=self._run, name=f"write {path.name}", daemon=True)
        self.thread.start()

    def _write(self, data) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.written += len(data)

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is not None:
                continue  # drain: the producer learns of the error at its next put
            try:
                self._write(_raw_bytes(batch[self.stream]))
                for name in self.later:
                    self.later[name].append(batch[name].detach().cpu())
            except BaseException as e:  # noqa: BLE001  (re-raised in the producer's thread)
                self.error = e

    def put(self, batch: dict[str, torch.Tensor]) -> None:
        """Hand over one batch's computed tensors (rows in order); blocks while `depth` wait."""
        if self.error is not None:
            self.abort()
            raise self.error
        self.queue.put(batch)

    def close(self) -> tuple[str, int]:
        self.queue.put(None)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            for chunks in self.later.values():
                self._write(_raw_bytes(torch.cat(chunks)))
            if self.written != self.expected:
                raise RuntimeError(f"{self.path}: wrote {self.written} data bytes, the header says {self.expected}")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.sha.hexdigest(), self.path.stat().st_size

    def abort(self) -> None:
        """Stop (after a failure elsewhere): the temporary file goes, nothing is renamed."""
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            self.queue.put(None)
            self.thread.join()
        if not self.file.closed:
            self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


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


def _shard_metadata(item: dict) -> dict:
    return {"split": item["split"], "first_block": item["first_block"], "rows": item["rows"], "key": item["key"]}


def _write_record(cache: Path, item: dict, sha256: str, size: int, tokens: int, started: float,
                  delay: float = 0.0, cpu_started: float | None = None) -> None:
    """The shard's .json (written after the shard: its presence means the shard is complete), with
    its wall times and the CPU seconds of the worker process meanwhile (all its threads)."""
    path = cache / item["file"]
    finished = time.time()
    cpu = None if cpu_started is None else round(time.process_time() - cpu_started, 4)
    atomic_write_json(path.with_suffix(".json"), {
        "file": item["file"], "split": item["split"], "first_block": item["first_block"],
        "rows": item["rows"], "key": item["key"], "sha256": sha256, "bytes": size, "tokens": tokens,
        "seconds": round(finished - started, 4), "started": round(started, 4), "finished": round(finished, 4),
        "cpu_seconds": cpu})
    if delay:  # tests: widen the window in which a precompute can be killed midway
        time.sleep(delay)


def _write_lm_head(cache: Path, item: dict, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    t0 = time.time()
    tensors = {"weight": weight.detach().to(torch.float32).cpu()}
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float32).cpu()
    path = cache / item["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_safetensors(path, tensors, _shard_metadata(item))
    _write_record(cache, item, sha256_file(path), path.stat().st_size, tokens=0, started=t0)


def compute_shard(call, cfg: UnlearnConfig, item: dict, device, block_size: int, hidden_size: int,
                  verified: set, delay: float = 0.0) -> None:
    """Compute one shard's statistics, `reference.batch_size` blocks per forward of `call` (a
    `ReferenceForward`, or the ZeRO-3 engine wrapping one), each batch handed to a `ShardWriter`
    that writes it while the next batch runs; then the shard's record."""
    t0, cpu0 = time.time(), time.process_time()
    blocks = read_block_range(cfg.data.prepared_dir, item["split"], item["first_block"], item["rows"], verified)
    rows = item["rows"]
    writer = ShardWriter(Path(cfg.reference.cache_dir) / item["file"],
                         fixed={"block_id": torch.arange(item["first_block"], item["first_block"] + rows)},
                         computed=stored_specs(cfg, rows, block_size, hidden_size), metadata=_shard_metadata(item))
    try:
        bs = cfg.reference.batch_size
        for s in range(0, rows, bs):
            ids = torch.as_tensor(blocks["input_ids"][s:s + bs]).to(device)
            mask = torch.as_tensor(blocks["attention_mask"][s:s + bs]).to(device)
            with torch.no_grad():
                out = call(input_ids=ids, attention_mask=mask)
            writer.put({k: v.cpu() for k, v in out.items()})
    except BaseException:
        writer.abort()
        raise
    sha256, size = writer.close()
    _write_record(Path(cfg.reference.cache_dir), item, sha256, size, int(blocks["attention_mask"].sum()), t0, delay,
                  cpu0)


class ShardActor:
    """Ray Data actor: loads the reference once (`threads` torch threads: the CPUs Ray gave it),
    then computes and writes whole shards.

    All torch work (loading, the probe, every shard) runs on one thread of the actor's own. Ray
    Data calls `__init__` on the actor's main thread but `__call__` on a thread of its own, and
    OpenMP keeps a team of threads per calling thread: two teams on the same cores make libgomp
    stop spin-waiting between parallel regions (it sleeps and wakes its threads at every op),
    which cost the CPU forward about a third of its speed here."""

    def __init__(self, config: dict, block_size: int, hidden_size: int, threads: int, delay: float = 0.0):
        from concurrent.futures import ThreadPoolExecutor

        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference")
        self.thread.submit(self._load, config, block_size, hidden_size, threads, delay).result()

    def _load(self, config: dict, block_size: int, hidden_size: int, threads: int, delay: float) -> None:
        cfg = UnlearnConfig.model_validate(config)
        self.delay, self.block_size, self.hidden_size = delay, block_size, hidden_size
        if not cfg.train.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            steady_allocator()  # the forwards' activations stay mapped between batches
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.model = load_reference_model(cfg)
        self.device = next(self.model.parameters()).device
        if cfg.train.use_gpu and torch.cuda.is_available() and cfg.reference.quantize == "none":
            self.model.to("cuda")
            self.device = torch.device("cuda")
        self.forward = ReferenceForward(self.model, cfg)
        with torch.no_grad():
            self.forward.via_decoder = bool(self.forward(**probe_input(self.device)))
        self.verified: set = set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.thread.submit(self._compute, [json.loads(s) for s in batch["item"]]).result()

    def _compute(self, items: list[dict]) -> dict[str, np.ndarray]:
        for item in items:
            if item["split"] == "lm_head":
                out = self.model.get_output_embeddings()
                _write_lm_head(Path(self.cfg.reference.cache_dir), item, out.weight, getattr(out, "bias", None))
            else:
                compute_shard(self.forward, self.cfg, item, self.device, self.block_size, self.hidden_size,
                              self.verified, self.delay)
        return {"file": np.array([i["file"] for i in items])}


def _test_delay() -> float:
    return float(os.environ.get(SLOW_ENV, "0") or 0)


def pool_size(cfg: UnlearnConfig, items: int) -> tuple[int, int]:
    """(workers, CPUs per worker) of the precompute on the Ray cluster (initialised).

    Unset, `reference.cpus_per_worker` is the CPUs of the cluster's largest node (divided among
    `reference.num_workers` when that is set), so one worker uses a whole node and its torch
    threads all of its cores; unset, `reference.num_workers` is what the nodes hold of such
    workers (one per node here), or one per GPU with `train.use_gpu`. The actor pool never starts
    more actors than it has shards to compute (each loads the whole model)."""
    import ray

    r = cfg.reference
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = [int(n.get("CPU", 0)) for n in nodes] or [1]
    if cfg.train.use_gpu:
        workers = r.num_workers or max(1, int(sum(n.get("GPU", 0) for n in nodes)))
        cpus = r.cpus_per_worker or max(1, sum(node_cpus) // workers)
    else:
        cpus = r.cpus_per_worker or max(1, max(node_cpus) // (r.num_workers or 1))
        workers = r.num_workers or max(1, sum(c // cpus for c in node_cpus))
    if r.mode == "actors":
        workers = max(1, min(workers, items))
    return workers, cpus


def _run_actor_pool(cfg: UnlearnConfig, todo: list[dict], sizes: dict, workers: int, cpus: int) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"item": json.dumps(item)} for item in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(ShardActor, fn_constructor_kwargs={"config": cfg.model_dump(by_alias=True), **sizes,
                                                           "threads": cpus, "delay": _test_delay()},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=cpus, num_gpus=1 if cfg.train.use_gpu else 0)
    done = ds.take_all()
    assert len(done) == len(todo), (len(done), len(todo))


def zero3_worker(config: dict) -> None:
    """Ray Train worker of `reference.mode=zero3`: one ZeRO-3 inference engine over all ranks (the
    engine set-up of training: `unlearn.init_distributed`, `load_zero3_model`, `frozen_engine`)."""
    import deepspeed
    import ray.train

    from dipo_scale.unlearn import frozen_engine, inference_ds_config, init_distributed, load_zero3_model

    cfg = UnlearnConfig.model_validate(config["cfg"])
    if not cfg.train.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        steady_allocator()
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    init_distributed(cfg)
    ds = inference_ds_config(json.loads(resolve_ds_config_path(cfg.ds_config_name).read_text()))
    ds.update(train_micro_batch_size_per_gpu=cfg.reference.batch_size, gradient_accumulation_steps=1,
              train_batch_size=cfg.reference.batch_size * world)
    model = load_zero3_model(cfg, ds, reference_path(cfg))
    forward = ReferenceForward(model, cfg)
    engine = frozen_engine(forward, ds)
    with torch.no_grad():  # every rank runs the probe (a collective) and reaches the same answer
        forward.via_decoder = bool(engine(**probe_input(engine.device)))
    cache = Path(cfg.reference.cache_dir)
    items = config["items"]

    head_items = [i for i in items if i["split"] == "lm_head"]
    if head_items:  # a collective: every rank gathers the head, rank 0 writes it
        out = model.get_output_embeddings()
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
        compute_shard(engine, cfg, item, engine.device, config["block_size"], config["hidden_size"], verified,
                      config["delay"])
        done += -(-item["rows"] // cfg.reference.batch_size)
    if done < most:  # padding forwards: ZeRO-3 needs every rank in every forward
        pad = torch.zeros(1, 2, dtype=torch.long, device=engine.device)
        for _ in range(most - done):
            with torch.no_grad():
                engine(input_ids=pad, attention_mask=torch.ones_like(pad))
    ray.train.report({"shards": len(mine)})


def _run_zero3(cfg: UnlearnConfig, todo: list[dict], sizes: dict, workers: int, cpus: int) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cache = Path(cfg.reference.cache_dir)
    trainer = TorchTrainer(
        zero3_worker,
        train_loop_config={"cfg": cfg.model_dump(by_alias=True), "items": todo, "delay": _test_delay(),
                           "threads": cpus, **sizes},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.train.use_gpu else {})}),
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
    from dipo_scale.prepare import read_manifest
    from dipo_scale.unlearn import absolute_paths  # (unlearn never imports the precompute)

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
    workers = cpus = None
    if todo:
        init_ray(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}})
        workers, cpus = pool_size(cfg, len(todo))
        with _shard_progress(cache, todo):
            (_run_zero3 if r.mode == "zero3" else _run_actor_pool)(
                cfg, todo, {"block_size": prepared["block_size"], "hidden_size": hidden}, workers, cpus)
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
    # from the first shard's start to the last shard's end, over every worker: the job less its
    # start-up (Ray, loading the model into each worker)
    spans = [(records[f]["started"], records[f]["finished"]) for f in computed if "started" in records[f]]
    computing = max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0
    splits = {}
    for split in needed_splits(cfg):
        shards = [{k: records[i["file"]][k] for k in ("file", "first_block", "rows", "sha256", "bytes")}
                  for i in plan if i["split"] == split]
        splits[split] = {"blocks": prepared["splits"][split]["blocks"],
                         "tokens": prepared["splits"][split]["tokens"], "shards": shards}
    manifest = {
        "version": CACHE_VERSION, "form": r.form, "k": r.k if r.form == "topk" else None, "dtype": cfg.reference_dtype,
        "vocab_size": vocab, "hidden_size": hidden, "block_size": prepared["block_size"],
        "rows_per_shard": r.rows_per_shard,
        "bytes_per_token": bytes_per_token(r.form, hidden_size=hidden, k=r.k, dtype=cfg.reference_dtype),
        "full_logits_bytes_per_token": 4 * vocab,
        "total_bytes": sum(rec["bytes"] for rec in records.values()),
        "reference_path": reference_path(cfg), "prepared_dir": cfg.data.prepared_dir,
        "fingerprints": fingerprints, "splits": splits,
        "lm_head": ({k: records["lm_head.safetensors"][k] for k in ("file", "sha256", "bytes")}
                    if r.form == "hidden" else None),
        "precompute": {"mode": r.mode, "num_workers": workers, "cpus_per_worker": cpus, "quantize": r.quantize,
                       "batch_size": r.batch_size, "shards_computed": len([f for f in computed if f != "lm_head.safetensors"]),
                       "shards_reused": len(plan) - len(todo), "tokens_computed": tokens_now,
                       "seconds": round(seconds, 3),  # wall time of the job, start-up included
                       "tokens_per_second": round(tokens_now / seconds, 1) if tokens_now and seconds else None,
                       "computing_seconds": round(computing, 3),
                       "tokens_per_second_computing": (round(tokens_now / computing, 1)
                                                       if tokens_now and computing else None),
                       # time inside the workers' shard loops (reading blocks, forwards, writing)
                       "shard_seconds": round(shard_seconds, 3),
                       "tokens_per_second_per_worker": (round(tokens_now / shard_seconds, 1)
                                                        if tokens_now and shard_seconds else None)},
    }
    atomic_write_json(cache / "manifest.json", manifest)
    return manifest
