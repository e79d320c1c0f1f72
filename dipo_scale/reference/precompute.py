"""The precompute: write (or finish) a reference cache (`dipo-scale reference`).

`precompute_reference` is a distributed job over the shards still to write (the format:
`dipo_scale.reference.cache`):
* `reference.mode=actors`: Ray Data batch inference, `map_batches` over the shard list with a
  pool of `reference.num_workers` model actors of `reference.cpus_per_worker` CPUs each (torch
  threads = its CPUs; unset: one actor per node using all its cores, one per GPU with
  `train.use_gpu`, never more actors than shards: `pool_size`); one model each, for models that
  fit a device (on GPUs: one per GPU, loaded on it in `model.dtype`); `reference.quantize` loads
  them with bitsandbytes 8-bit or 4-bit;
* `reference.mode=zero3`: `reference.num_workers` Ray Train workers holding one DeepSpeed ZeRO-3
  inference engine between them (for models that do not fit one device; the engine set-up is
  `dipo_scale.unlearn`'s). Every rank runs the same number of forwards (ZeRO-3 gathers parameters
  collectively): a rank with fewer blocks to do runs padding forwards whose output is dropped.
  On GPUs the workers use nccl and DeepSpeed's CUDA accelerator; `DS_ACCELERATOR=cpu` is set only
  for CPU runs (a GPU worker that finds another accelerator stops with one line).
The unit of work is a shard, of as many blocks as fit in `reference.shard_bytes` (`shard_rows`).

Each worker reads only the packed blocks of its shards and runs `reference.batch_size` blocks per
forward of `ReferenceForward`: for `hidden` the decoder trunk alone (no logits are computed),
checked once per worker to give bitwise the tensor the model's own forward hands its LM head
(otherwise the full forward runs and a hook captures the head's input, so it is exact for any
architecture); for `topk` the trunk, the head and the top K. Each batch goes to a writer thread
(`ShardWriter`, a bounded queue) that streams it into the shard's temporary file and the sha256
of each of its rows while the next batch's forward runs; the file is renamed when complete, then
its `.json` is written (the checksums of `dipo_scale.reference.cache`, tokens, start and end times).

Before anything starts, the driver checks its inputs (`check_model`, `check_prepared`,
`check_output_dir`: one-line errors), marks the output directory as this command's and writes
`fingerprints.json`. A stopped job resumes: a rerun keeps every shard whose `.json` exists and
whose bytes all match its checksums (read on the driver, a thread per core), removes leftover
temporary files and computes only the rest. A rerun with other fingerprints (or another shard
size) into the same `cache_dir` is refused (choose another directory or remove it). While workers
run, the driver prints progress lines (shards done/total, rate, ETA, tokens/s) from the shard
records they write. When they are done, the driver checks each shard's size and index (the rows
were hashed as they were written) and writes `manifest.json`.
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
from dipo_scale.config import UnlearnConfig
from dipo_scale.engine import TORCH_DTYPES, use_accelerator
from dipo_scale.errors import UserInputError, first_line, run_user_error
from dipo_scale.files import atomic_write_json, check_output_dir, follow_umask, mark_output_dir, sha256_file
from dipo_scale.memory import steady_allocator
from dipo_scale.preflight import check_model, check_prepared, trained_splits
from dipo_scale.reference.cache import (CACHE_VERSION, bytes_per_token, describe_difference, needed_splits,
                                        read_cache_manifest, reference_path, run_fingerprints, shard_layout)

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
    """The reference for the actor-pool precompute in `model.dtype` (resolved: `cfg.model_dtype`),
    optionally quantised with bitsandbytes; with `train.use_gpu` loaded straight onto the process's
    GPU (cuda:0, the one Ray assigned it), never through a CPU copy."""
    from transformers import AutoModelForCausalLM

    load: dict[str, Any] = dict(dtype=TORCH_DTYPES[cfg.model_dtype],
                                trust_remote_code=cfg.model.trust_remote_code)
    if cfg.train.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.use_gpu: this reference worker sees no CUDA device "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
        load["device_map"] = {"": 0}
    if cfg.reference.quantize != "none":
        from dipo_scale.eval.generation import quantization_config

        try:
            load["quantization_config"] = quantization_config(cfg.reference.quantize, load["dtype"])
        except UserInputError as e:
            raise UserInputError(f"reference.quantize={cfg.reference.quantize}: {e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(reference_path(cfg), **load)
    except Exception as e:  # noqa: BLE001  (a backend that cannot run here: one line, not a trace)
        if cfg.reference.quantize == "none":
            raise
        raise UserInputError(f"reference.quantize={cfg.reference.quantize}: bitsandbytes could not load "
                             f"{reference_path(cfg)} here: {first_line(e)}") from None
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
        self.store = TORCH_DTYPES[cfg.reference_dtype]
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
            return torch.tensor(int(same), device=input_ids.device)
        if self.via_decoder:
            hidden = self._trunk(input_ids, attention_mask)
            logits = None if self.form == "hidden" else self.model.get_output_embeddings()(hidden)
        else:
            hidden, logits = self._full(input_ids, attention_mask)
        if self.form == "hidden":
            return {"hidden": hidden.to(self.store)}
        from dipo_scale.reference.topk import topk_statistics

        top, ids, lse = topk_statistics(logits, self.k)
        return {"topk_logits": top.to(self.store), "topk_ids": ids.to(torch.int32), "lse": lse.to(torch.float32)}


def probe_input(device) -> dict[str, torch.Tensor]:
    """A short input for `ReferenceForward`'s probe (ids 0..7: valid in any vocabulary)."""
    ids = torch.arange(8, device=device).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "probe": True}


def stored_specs(cfg: UnlearnConfig, rows: int, block_size: int, hidden_size: int) -> dict[str, tuple]:
    """{name: (dtype, shape)} of a shard's computed tensors, in the order `ReferenceForward` returns them."""
    r = cfg.reference
    store = TORCH_DTYPES[cfg.reference_dtype]
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
    temporary file and feeds the checksums as it goes (the index's: header and fixed tensors; and
    one per row of the computed tensors, `dipo_scale.reference.cache`): writing and hashing
    overlap the next batch's forward, and no shard is read back. `close` waits for the thread,
    syncs the file and renames it into place; it returns {bytes, index_bytes, index_sha256,
    row_sha256}. Safetensors readers find tensors by their offsets, so this order reads like any
    other."""

    def __init__(self, path: Path, fixed: dict[str, torch.Tensor], computed: dict[str, tuple],
                 metadata: dict, depth: int = 2):
        import queue

        self.path = path
        self.names = list(computed)
        self.rows = computed[self.names[0]][1][0]
        assert all(shape[0] == self.rows for _, shape in computed.values()), computed
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
        self.index, self.row_sha = hashlib.sha256(), [hashlib.sha256() for _ in range(self.rows)]
        self.row = 0  # the next row of the streamed tensor
        self.written = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._write(len(text).to_bytes(8, "little") + text, self.index)
        self.index_bytes = len(text) + 8
        self.written = 0  # counts the data section
        for t in fixed.values():
            data = _raw_bytes(t)
            self._write(data, self.index)
            self.index_bytes += len(data)
        self.thread = threading.Thread(target=self._run, name=f"write {path.name}", daemon=True)
        self.thread.start()

    def _write(self, data, sha=None) -> None:
        self.file.write(data)
        if sha is not None:
            sha.update(data)
        self.written += len(data)

    def _write_rows(self, t: torch.Tensor, first: int) -> None:
        """Rows first.. of a computed tensor, each row's bytes into that row's sha256."""
        data = _raw_bytes(t)
        per = len(data) // max(1, t.shape[0])
        for i in range(t.shape[0]):
            self.row_sha[first + i].update(data[i * per:(i + 1) * per])
        self._write(data)

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is not None:
                continue  # drain: the producer learns of the error at its next put
            try:
                self._write_rows(batch[self.stream], self.row)
                self.row += batch[self.stream].shape[0]
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

    def close(self) -> dict:
        self.queue.put(None)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            for chunks in self.later.values():
                self._write_rows(torch.cat(chunks), 0)
            if self.written != self.expected:
                raise RuntimeError(f"{self.path}: wrote {self.written} data bytes, the header says {self.expected}")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            follow_umask(self.tmp)  # (safetensors' files are 0600 whatever the umask)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return {"bytes": self.path.stat().st_size, "index_bytes": self.index_bytes,
                "index_sha256": self.index.hexdigest(), "row_sha256": [h.hexdigest() for h in self.row_sha]}

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
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard_metadata(item: dict) -> dict:
    return {"split": item["split"], "first_block": item["first_block"], "rows": item["rows"], "key": item["key"]}


def _write_record(cache: Path, item: dict, checksums: dict, tokens: int, started: float,
                  delay: float = 0.0, cpu_started: float | None = None) -> None:
    """The shard's .json (written after the shard: its presence means the shard is complete): its
    checksums (`ShardWriter.close`; the LM head: bytes and sha256), its wall times and the CPU
    seconds of the worker process meanwhile (all its threads)."""
    path = cache / item["file"]
    finished = time.time()
    cpu = None if cpu_started is None else round(time.process_time() - cpu_started, 4)
    atomic_write_json(path.with_suffix(".json"), {
        "file": item["file"], "split": item["split"], "first_block": item["first_block"],
        "rows": item["rows"], "key": item["key"], **checksums, "tokens": tokens,
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
    _write_record(cache, item, {"bytes": path.stat().st_size, "sha256": sha256_file(path)}, tokens=0, started=t0)


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
    checksums = writer.close()
    _write_record(Path(cfg.reference.cache_dir), item, checksums, int(blocks["attention_mask"].sum()), t0, delay,
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
        use_accelerator(cfg.train.use_gpu)
        if not cfg.train.use_gpu:
            steady_allocator()  # the forwards' activations stay mapped between batches
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.model = load_reference_model(cfg)
        self.device = next(self.model.parameters()).device
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


def pool_size(cfg: UnlearnConfig, items: int, nodes: list[dict] | None = None) -> tuple[int, int]:
    """(workers, CPUs per worker) of the precompute, from the resources of the cluster's nodes
    (`nodes`: each alive node's resources, {"CPU": 96.0, "GPU": 8.0, ...}; None: `ray.nodes()`).

    Without GPUs, `reference.cpus_per_worker` unset is the CPUs of the largest node (divided among
    `reference.num_workers` when that is set), so one worker uses a whole node and its torch
    threads all of its cores; `reference.num_workers` unset is what the nodes hold of such workers
    (one per node here). With `train.use_gpu`: one worker per GPU, each with the CPUs its node has
    per GPU (the fewest over the GPU nodes: every worker must fit on the node it lands on; nodes
    without GPUs do not count). The actor pool never starts more actors than it has shards to
    compute (each loads the whole model). Workers the nodes cannot hold are refused in one line,
    not left waiting for resources that never come."""
    r = cfg.reference
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if cfg.train.use_gpu:
        gpu_nodes = [(int(n.get("CPU", 0)), int(n.get("GPU", 0))) for n in nodes if int(n.get("GPU", 0)) > 0]
        if not gpu_nodes:
            raise UserInputError("train.use_gpu: the Ray cluster has no GPUs for the reference precompute")
        cpus = r.cpus_per_worker or max(1, min(c // g for c, g in gpu_nodes))
        fits = sum(min(g, c // cpus) for c, g in gpu_nodes)
        workers = r.num_workers or sum(g for _, g in gpu_nodes)
        shape = " + ".join(f"{c} CPUs/{g} GPUs" for c, g in gpu_nodes)
    else:
        node_cpus = [int(n.get("CPU", 0)) for n in nodes if int(n.get("CPU", 0)) > 0] or [1]
        cpus = r.cpus_per_worker or max(1, max(node_cpus) // (r.num_workers or 1))
        fits = sum(c // cpus for c in node_cpus)
        workers = r.num_workers or max(1, fits)
        shape = " + ".join(f"{c} CPUs" for c in node_cpus)
    if r.mode == "actors":
        workers = max(1, min(workers, items))
    if workers > fits:
        raise UserInputError(f"reference: {workers} workers of {cpus} CPUs{' + 1 GPU' if cfg.train.use_gpu else ''} "
                             f"do not fit the cluster's nodes ({shape}: {fits} fit); set reference.num_workers "
                             "or reference.cpus_per_worker")
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


def zero3_ds_config(cfg: UnlearnConfig, world: int) -> dict:
    """The DeepSpeed config of the ZeRO-3 precompute engine: training's (`engine.load_ds_config`:
    ZeRO stage 3, on GPUs bf16 as `model.dtype` says) with `reference.batch_size` blocks per rank
    and no optimizer."""
    from dipo_scale.engine import inference_ds_config, load_ds_config

    bs = cfg.reference.batch_size
    train = cfg.train.model_copy(update={"global_batch_size": bs * world, "micro_batch_size": bs})
    return inference_ds_config(load_ds_config(cfg.model_copy(update={"train": train}), world))


def _check_accelerator(cfg: UnlearnConfig) -> None:
    """A GPU worker runs DeepSpeed on CUDA: one line when its environment says otherwise (e.g.
    `DS_ACCELERATOR=cpu` in the job's runtime_env), rather than a ZeRO-3 engine on the CPU."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if cfg.train.use_gpu and (name != "cuda" or not torch.cuda.is_available()):
        raise UserInputError(f"train.use_gpu: a reference worker's DeepSpeed accelerator is {name} (DS_ACCELERATOR="
                             f"{os.environ.get('DS_ACCELERATOR')}, CUDA available: {torch.cuda.is_available()}); "
                             "remove DS_ACCELERATOR from the GPU job's runtime_env")


def zero3_worker(config: dict) -> None:
    """Ray Train worker of `reference.mode=zero3`: one ZeRO-3 inference engine over all ranks (the
    engine set-up of training: `unlearn.init_distributed` (nccl on GPUs), `load_zero3_model`,
    `frozen_engine`)."""
    cfg = UnlearnConfig.model_validate(config["cfg"])
    use_accelerator(cfg.train.use_gpu)  # before DeepSpeed is imported
    if not cfg.train.use_gpu:
        steady_allocator()
    import deepspeed
    import ray.train

    from dipo_scale.collectives import sum_over_ranks
    from dipo_scale.engine import frozen_engine, init_distributed, load_zero3_model

    _check_accelerator(cfg)
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    init_distributed(cfg)
    ds = zero3_ds_config(cfg, world)
    model = load_zero3_model(cfg, ds, reference_path(cfg))
    forward = ReferenceForward(model, cfg)
    engine = frozen_engine(forward, ds)
    with torch.no_grad():  # every rank runs the probe (ZeRO-3 gathers collectively); all must take
        same = float(engine(**probe_input(engine.device)))  # the same path after it, so they agree
    forward.via_decoder = sum_over_ranks({"same": same}, engine.device)["same"] == world
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
    from dipo_scale.engine import torch_trainer

    cache = Path(cfg.reference.cache_dir)
    trainer = torch_trainer(
        zero3_worker, {"cfg": cfg.model_dump(by_alias=True), "items": todo, "delay": _test_delay(), "threads": cpus,
                       **sizes},
        num_workers=workers, use_gpu=cfg.train.use_gpu, name=f"reference-{int(time.time())}",
        storage_path=cache / ".ray", resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.train.use_gpu else {})})
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
def shard_rows(cfg: UnlearnConfig, row_bytes: int) -> int:
    """Blocks per cache shard: as many as fit in `reference.shard_bytes` (`row_bytes` each: block
    size × bytes per token), at least one, at most `reference.rows_per_shard` when set."""
    r = cfg.reference
    rows = max(1, r.shard_bytes // row_bytes)
    return min(rows, r.rows_per_shard) if r.rows_per_shard else rows


def plan_shards(cfg: UnlearnConfig, prepared: dict, key: str, rows_per_shard: int) -> list[dict]:
    """Every file of the cache: the LM head (hidden form), then each split's shards in block order."""
    items = [{"split": "lm_head", "file": "lm_head.safetensors", "first_block": 0, "rows": 0, "key": key}] \
        if cfg.reference.form == "hidden" else []
    for split in needed_splits(cfg):
        blocks = prepared["splits"][split]["blocks"]
        for i, first in enumerate(range(0, blocks, rows_per_shard)):
            items.append({"split": split, "file": f"{split}/part-{i:05d}.safetensors", "first_block": first,
                          "rows": min(rows_per_shard, blocks - first), "key": key})
    return items


def _rows_match(path: Path, record: dict, size: int) -> bool:
    """Whether every statistics row of the shard at `path` matches its sha256 in `record` (reads
    the statistics once, front to back)."""
    with open(path, "rb") as f:
        index = f.read(record["index_bytes"])
        layout = shard_layout(path, index, record["rows"], size)
        hashes = [hashlib.sha256() for _ in range(record["rows"])]
        for _, _, _, offset, nbytes in layout:
            f.seek(offset)
            for h in hashes:
                data = f.read(nbytes)
                if len(data) != nbytes:
                    return False
                h.update(data)
    return [h.hexdigest() for h in hashes] == record["row_sha256"]


def _completed(cache: Path, item: dict, full: bool = True) -> dict | None:
    """A shard's .json record when the shard is complete and matches it, else None: its size and
    index (header and block ids) always; with `full`, every byte (each row's sha256; the LM head's
    whole-file sha256)."""
    path, record_path = cache / item["file"], (cache / item["file"]).with_suffix(".json")
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    same = all(record.get(k) == item[k] for k in ("file", "first_block", "rows", "key"))
    size = path.stat().st_size
    if not same or size != record.get("bytes"):
        return None
    try:
        if item["split"] == "lm_head":
            return record if not full or sha256_file(path) == record.get("sha256") else None
        with open(path, "rb") as f:
            if hashlib.sha256(f.read(record["index_bytes"])).hexdigest() != record["index_sha256"]:
                return None
        return record if not full or _rows_match(path, record, size) else None
    except (KeyError, UserInputError):  # a record of another format, a header that is no shard's
        return None


def _all_completed(cache: Path, plan: list[dict], full: bool) -> list[dict | None]:
    """`_completed` of every item of `plan`, a thread per core (hashing and reading release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(plan), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda item: _completed(cache, item, full), plan))


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
    from dipo_scale.config import absolute_paths

    r = cfg.reference
    if r.form == "online":
        raise UserInputError("reference.form: online needs no cache; set reference.form=hidden or topk")
    if not cfg.needs_reference():
        raise UserInputError(f"method={cfg.method} with loss.retain={cfg.loss.retain} uses no reference")
    if not cfg.data.prepared_dir:
        raise UserInputError("data.prepared_dir: not set (run `dipo-scale prepare` first)")
    model = check_model(reference_path(cfg), "model.reference_path" if cfg.model.reference_path else "model.path",
                        trust_remote_code=cfg.model.trust_remote_code)
    check_prepared(cfg.data.prepared_dir, model=model, trains_on=trained_splits(cfg))
    check_output_dir(r.cache_dir, "reference", flag="reference.cache_dir",
                     inputs=[("model.path", reference_path(cfg)), ("data.prepared_dir", cfg.data.prepared_dir)])
    cfg = absolute_paths(cfg)
    r = cfg.reference
    prepared = read_manifest(cfg.data.prepared_dir)
    vocab, hidden = _model_sizes(reference_path(cfg))
    if r.form == "topk" and r.k > vocab:
        raise UserInputError(f"reference.k: {r.k} exceeds the vocabulary size of {reference_path(cfg)} ({vocab})")
    fingerprints = run_fingerprints(cfg)
    per_token = bytes_per_token(r.form, hidden_size=hidden, k=r.k, dtype=cfg.reference_dtype)
    rows_per_shard = shard_rows(cfg, prepared["block_size"] * per_token)
    layout = {"version": CACHE_VERSION, "fingerprints": fingerprints, "rows_per_shard": rows_per_shard,
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

    plan = plan_shards(cfg, prepared, key, rows_per_shard)
    # shards an earlier run finished: every byte checked (a corrupt one is computed again)
    todo = [item for item, done in zip(plan, _all_completed(cache, plan, full=True)) if done is None]
    if not todo and (cache / "manifest.json").is_file():
        return read_cache_manifest(cache)  # finished before: nothing to do
    t0 = time.time()
    workers = cpus = None
    if todo:
        # DS_ACCELERATOR=cpu for CPU runs only: the job's env reaches every worker, and a GPU
        # worker must find DeepSpeed's CUDA accelerator
        init_ray(uses_train=r.mode == "zero3", log_to_driver=False,
                 **({} if cfg.train.use_gpu else {"runtime_env": {"env_vars": {"DS_ACCELERATOR": "cpu"}}}))
        workers, cpus = pool_size(cfg, len(todo))
        if r.mode == "zero3":
            zero3_ds_config(cfg, workers)  # its errors (e.g. bf16 vs model.dtype) before workers start
        with _shard_progress(cache, todo):
            try:
                (_run_zero3 if r.mode == "zero3" else _run_actor_pool)(
                    cfg, todo, {"block_size": prepared["block_size"], "hidden_size": hidden}, workers, cpus)
            except Exception as e:  # a worker's UserInputError: its one line, not Ray's trace
                user = run_user_error(e)
                if user is None:
                    raise
                raise UserInputError(str(user)) from None
    seconds = time.time() - t0

    records = {}  # the shards computed now were hashed as they were written: size and index suffice
    for item, record in zip(plan, _all_completed(cache, plan, full=False)):
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
        shards = [{k: records[i["file"]][k] for k in ("file", "first_block", "rows", "bytes", "index_bytes",
                                                        "index_sha256", "row_sha256")}
                  for i in plan if i["split"] == split]
        splits[split] = {"blocks": prepared["splits"][split]["blocks"],
                         "tokens": prepared["splits"][split]["tokens"], "shards": shards}
    manifest = {
        "version": CACHE_VERSION, "form": r.form, "k": r.k if r.form == "topk" else None, "dtype": cfg.reference_dtype,
        "vocab_size": vocab, "hidden_size": hidden, "block_size": prepared["block_size"],
        "rows_per_shard": rows_per_shard, "shard_bytes": r.shard_bytes, "bytes_per_token": per_token,
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
