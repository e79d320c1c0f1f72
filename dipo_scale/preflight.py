"""Checks on the driver, in seconds, before any Ray worker starts or anything is written.

A user should never wait for a worker's traceback to learn that a file is missing or corrupt, and
a failed check claims nothing (no output directory, no config.json), so the corrected command
just runs. Every check raises `UserInputError` (one line, exit 2) naming the input:

* `check_model`: a local model directory (or a hub name found in the local Hugging Face cache):
  config.json of an architecture this transformers knows (custom code only with
  `trust_remote_code`), every weight file the index lists present and complete (safetensors:
  header and data length; .bin: the zip directory), without reading the weights;
* `check_tokenizer`: the tokenizer loads and fits the model's vocabulary;
* `check_prepared`: the prepared manifest parses, every shard is present with its checksum, each
  split the run trains on holds tokens to train on (`trained_splits`), its tokenizer fingerprint
  is the model's, its block size fits the model's positions;
* `check_resources`: the Ray cluster has the CPUs/GPUs the workers ask for (Ray would otherwise
  wait for them without end);
* `validate_run` (all of a run's inputs, before Ray starts) and `check_workers_can_run` (on the
  cluster: resources, and for GPU runs the 8-bit optimizer and the memory plan).
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dipo_scale.errors import UserInputError, first_line

if TYPE_CHECKING:
    from dipo_scale.config import UnlearnConfig

SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


def resolve_model_dir(name: str, flag: str) -> Path:
    """The local directory of `name`: a directory, or a hub name's snapshot in the Hugging Face
    cache. Nothing is downloaded: a cluster's workers would each fetch a 7B model at start."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserInputError(f"{flag} {name}: not a directory")
    from dipo_scale.data.muse import is_hub_name

    if is_hub_name(name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not in the cache (or not a valid repo id)
            raise UserInputError(f"{flag} {name}: no such local directory, and not in the Hugging Face cache "
                                 f"(download it first: `hf download {name}`)") from None
    raise UserInputError(f"{flag} {name}: no such directory")


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserInputError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path}: malformed {what} ({' '.join(str(e).split())})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{path}: malformed {what} (expected a JSON object)")
    return value


# safetensors dtypes -> bytes per element; the floating ones hold a model's weights
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                      "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def _check_safetensors(path: Path, quantized: bool = False) -> None:
    """The header parses into tensors (dtype, shape, data_offsets) whose byte ranges match their
    shapes and dtypes and tile the data exactly to the end of the file; weights are floating point
    (an integer dtype of the same size, read as floats, gave all-zero metrics) unless the model is
    `quantized` (its config's quantization_config)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise UserInputError(f"{path}: truncated or not a safetensors file (size {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserInputError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = t["dtype"], t["shape"], t["data_offsets"]
            if not (all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int)
                    and isinstance(end, int) and dtype in SAFETENSORS_DTYPES):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise UserInputError(f"{path}: corrupt safetensors header (tensor {name!r}: {json.dumps(t)[:120]}; "
                                 "expected dtype, shape and data_offsets [begin, end])") from None
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise UserInputError(f"{path}: corrupt safetensors header (tensor {name!r}: {dtype} {shape} needs "
                                 f"{math.prod(shape) * SAFETENSORS_DTYPES[dtype]} bytes, data_offsets give {end - begin})")
        if not (quantized or dtype.startswith(("F", "BF"))):
            raise UserInputError(f"{path}: tensor {name!r} is {dtype}, not floating point (the model's config "
                                 "declares no quantization_config): not weights this model can load")
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise UserInputError(f"{path}: corrupt safetensors header (tensor data overlaps or leaves a gap at "
                                 f"byte {min(begin, covered)})")
        covered = end
    if 8 + n + covered != size:
        raise UserInputError(f"{path}: truncated or corrupt ({size} bytes; the header describes {8 + n + covered})")


def _check_bin(path: Path) -> None:
    if zipfile.is_zipfile(path):
        try:
            zipfile.ZipFile(path).close()  # reads the central directory at the end: truncation shows
        except (zipfile.BadZipFile, OSError) as e:
            raise UserInputError(f"{path}: truncated or corrupt ({e})") from None
    elif path.stat().st_size == 0:
        raise UserInputError(f"{path}: empty weight file")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files a model directory must hold: those its index lists, else *.safetensors,
    else *.bin."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            weight_map = _read_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserInputError(f"{index}: malformed weight index (no weight_map)")
            return [model_dir / name for name in sorted(set(weight_map.values()))]
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise UserInputError(f"{model_dir}: no weight files (*.safetensors or *.bin)")


def text_config(config: dict) -> dict:
    """The language model's part of a config.json (multimodal configs nest it)."""
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def check_model(name: str, flag: str, *, trust_remote_code: bool = False, tokenizer: bool = True) -> dict:
    """Check a model (module docstring); returns its config.json as a dict, with the resolved
    directory under "_dir" and (`tokenizer`) the loaded tokenizer under "_tokenizer"."""
    from transformers import CONFIG_MAPPING

    model_dir = resolve_model_dir(name, flag)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{flag} {name}: no config.json (not a Hugging Face model directory)")
    config = _read_json(config_path, "config.json")
    model_type, auto_map = config.get("model_type"), config.get("auto_map")
    if model_type not in CONFIG_MAPPING:
        if auto_map and not trust_remote_code:
            raise UserInputError(f"{flag} {name}: its architecture ({model_type}) needs the model's own code; "
                                 "set model.trust_remote_code=true if you trust it")
        if not auto_map:
            import transformers

            raise UserInputError(f"{flag} {name}: unknown architecture model_type={model_type!r} "
                                 f"(transformers {transformers.__version__})")
    for path in weight_files(model_dir):
        if not path.is_file():
            raise UserInputError(f"{path}: weight file listed in the index is missing")
        if path.suffix == ".safetensors":
            _check_safetensors(path, quantized="quantization_config" in config)
        else:
            _check_bin(path)
    config["_dir"] = model_dir
    if tokenizer:
        config["_tokenizer"] = check_tokenizer(model_dir, flag, config, trust_remote_code=trust_remote_code,
                                               shown=name)
    return config


def check_tokenizer(path: str | Path, flag: str, model_config: dict | None = None, *,
                    trust_remote_code: bool = False, shown: str | None = None):
    """The tokenizer at `path` loads, and (given the model's config) its ids fit the embedding.
    Errors name `flag` and `shown` (what the user wrote; default `path`)."""
    from transformers import AutoTokenizer

    shown = shown or path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, ... from a missing or broken tokenizer
        raise UserInputError(f"{flag} {shown}: cannot load its tokenizer ({type(e).__name__}: {first_line(e)})") from None
    vocab = text_config(model_config or {}).get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise UserInputError(f"{flag} {shown}: the tokenizer has {len(tokenizer)} tokens, more than the "
                             f"model's vocabulary ({vocab}): ids beyond it would index past the embedding")
    return tokenizer


def meta_model(name: str, flag: str, *, trust_remote_code: bool = False):
    """(config, model) of the model `name` (a local directory, where config.json alone is enough,
    or a hub name in the local cache) built on the meta device: its parameters' shapes without
    reading or allocating any weight (the memory plan, the evaluation's size check)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = resolve_model_dir(name, flag)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return config, AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, KeyError ... from a missing or foreign config
        raise UserInputError(f"{flag} {name}: cannot build the model from its config ({type(e).__name__}: "
                             f"{first_line(e)})") from None


def max_positions(config: dict) -> int | None:
    text = text_config(config)
    value = text.get("max_position_embeddings", text.get("n_positions"))
    return value if isinstance(value, int) else None


def trained_splits(cfg) -> dict[str, str]:
    """The prepared splits an unlearning run (`UnlearnConfig`) trains on, each with the setting
    that makes it train on it: forget always, retain with a retain term."""
    splits = {"forget": f"method={cfg.method} trains on it"}
    if cfg.loss.retain != "none":
        splits["retain"] = (f"loss.retain={cfg.loss.retain} trains on it; prepare data with retain documents, "
                            "or set loss.retain=none")
    return splits


def check_prepared(prepared_dir: str | Path, *, flag: str = "data.prepared_dir", model: dict | None = None,
                   trains_on: dict[str, str] | None = None) -> dict:
    """Check a prepared directory: each split of `trains_on` (split -> why the run needs it,
    `trained_splits`; default the forget split) holds tokens to train on, and (given
    `check_model`'s result) it was made with the model's tokenizer and fits its positions.
    Returns the manifest."""
    from dipo_scale.prepare import SPLITS, read_manifest, tokenizer_fingerprint, verified_shard

    root = Path(prepared_dir)
    manifest = read_manifest(root)
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            verified_shard(root, shard)
    for split, why in (trains_on or {"forget": "every run trains on it"}).items():
        info = manifest["splits"][split]
        if not info.get("loss_tokens", info["tokens"]):  # (an old empty split: one padding block, 0 tokens)
            raise UserInputError(f"{flag} {prepared_dir}: the {split} split holds no tokens to train on ({why})")
    if model is not None:
        tokenizer = model.get("_tokenizer")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != manifest["tokenizer_fingerprint"]:
            raise UserInputError(f"{flag} {prepared_dir}: prepared with another tokenizer than the model's "
                                 f"({model['_dir']}); run `dipo-scale prepare --tokenizer {model['_dir']}`")
        limit = max_positions(model)
        if limit is not None and manifest["block_size"] > limit:
            raise UserInputError(f"{flag} {prepared_dir}: block size {manifest['block_size']} exceeds the "
                                 f"model's {limit} positions")
    return manifest


def check_resources(num_workers: int, *, use_gpu: bool, flag: str = "train.num_workers",
                    extra_cpus: float = 0.0) -> None:
    """The Ray cluster has a CPU (and a GPU) per worker, plus `extra_cpus`: the initialised one,
    or, before `init_ray` starts a local one, this machine (which a local cluster gets all of). A
    cluster to be joined (RAY_ADDRESS) is checked once joined. Ray would wait for missing resources
    without end (an autoscaling cluster may add them: this check counts the nodes there now)."""
    import ray

    if ray.is_initialized():
        have, where = ray.cluster_resources(), "the Ray cluster has"
    elif os.environ.get("RAY_ADDRESS", "local") in ("", "local"):
        import torch
        from ray._private.utils import get_num_cpus  # what `ray.init` gives a local cluster

        have = {"CPU": float(get_num_cpus()), "GPU": float(torch.cuda.device_count())}
        where = "this machine has (all a local Ray cluster would get)"
    else:
        return
    need = {"CPU": num_workers + extra_cpus, **({"GPU": num_workers} if use_gpu else {})}
    for resource, amount in need.items():
        if have.get(resource, 0) < amount:
            raise UserInputError(f"{flag}={num_workers}: needs {amount:g} {resource}s (one per worker"
                                 f"{' plus the drivers' if extra_cpus else ''}) but {where} "
                                 f"{have.get(resource, 0):g}")


# ----------------------------------------------------------------------------------------------
# A whole unlearning run, on the driver (`unlearn.run_unlearning`, the sweep)
# ----------------------------------------------------------------------------------------------
def wandb_credentials() -> bool:
    """Whether wandb can log online: an API key in the environment or a `wandb login` (~/.netrc)."""
    return bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().is_file()


def validate_run(cfg: UnlearnConfig) -> None:
    """Everything that can be checked before workers start, on the driver, in seconds (one-line
    errors, exit 2): the models, their tokenizer against the prepared data, every shard, the
    reference cache, and the settings (`validate_settings`)."""
    if not cfg.model.path:
        raise UserInputError("model.path: not set (the model to unlearn)")
    if not cfg.data.prepared_dir:
        raise UserInputError("data.prepared_dir: not set (run `dipo-scale prepare` first)")
    model = check_model(cfg.model.path, "model.path", trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.reference_path and cfg.needs_reference() and not cfg.reference_cached():
        check_model(cfg.model.reference_path, "model.reference_path", trust_remote_code=cfg.model.trust_remote_code,
                    tokenizer=False)
    check_prepared(cfg.data.prepared_dir, model=model, trains_on=trained_splits(cfg))
    validate_settings(cfg)
    if cfg.reference_cached():
        from dipo_scale.reference.cache import check_cache

        check_cache(cfg)  # fingerprints, manifest, each shard's size and header (rows: as workers read them)


def validate_settings(cfg: UnlearnConfig) -> None:
    """A run's settings that need no prepared data (a sequential series checks them for requests
    whose blocks are not prepared yet): the DeepSpeed config against the batch and workers, the
    optimizer, the fused head, the evaluation data, wandb's credentials."""
    from dipo_scale.engine import check_fused_head, check_optimizer, load_ds_config

    load_ds_config(cfg, cfg.train.worker_range[1])  # any size of an elastic group splits a batch the largest can
    if not cfg.train.use_gpu:  # a GPU run's optimizer is checked where its workers run (check_workers_can_run)
        check_optimizer(cfg)
    if cfg.loss.fused:
        check_fused_head(cfg)
    if cfg.eval.every:
        from dipo_scale.data.muse import load_muse_dir

        load_muse_dir(cfg.eval.data_dir, need_raw=False)
    if cfg.logging.wandb == "online" and not wandb_credentials():
        raise UserInputError("logging.wandb=online: no wandb credentials (set WANDB_API_KEY or run `wandb login`), "
                             "or use logging.wandb=offline")


def note_build_locks(root: str | Path | None = None, stale_s: float = 600.0) -> list[Path]:
    """DeepSpeed builds its CPU ops (the shared-memory collective of CPU runs) on first use under
    torch's extensions directory, holding a `lock` file meanwhile; a build stopped by Ctrl-C or a
    kill leaves it, and every later run's workers wait on it without end, in silence. A lock older
    than `stale_s` is said in one `note:` line on stderr (a build may still be running elsewhere:
    it is not removed). Returns the locks noted."""
    import sys
    import time

    root = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    stale = [lock for lock in sorted(root.glob("*/*/lock")) if time.time() - lock.stat().st_mtime > stale_s]
    for lock in stale:
        print(f"note: {lock} is {(time.time() - lock.stat().st_mtime) / 60:.0f} min old: a DeepSpeed op build "
              "that was stopped leaves it, and workers then wait on it without end; if no build is running, "
              "remove it", file=sys.stderr, flush=True)
    return stale


def check_workers_can_run(cfg: UnlearnConfig) -> None:
    """On the Ray cluster (initialised): enough resources for the workers, and for a GPU run the
    8-bit optimizer on a GPU node (the driver may have none) and the memory plan: a run whose
    estimated per-GPU peak exceeds the cluster's GPUs is refused in one line (`dipo-scale plan`)."""
    import ray

    from dipo_scale.engine import check_optimizer, gpu_memory_bytes
    from dipo_scale.errors import user_error_behind

    low = cfg.train.worker_range[0]  # an elastic group starts with its min (and shrunk, holds the largest partitions)
    check_resources(low, use_gpu=cfg.train.use_gpu)
    if not cfg.train.use_gpu:
        note_build_locks()
        return
    if cfg.train.optimizer == "adamw_8bit":
        try:
            ray.get(ray.remote(num_gpus=1, max_retries=0)(check_optimizer).remote(cfg))
        except UserInputError as e:  # a task's error carries its traceback: keep the cause's one line
            raise UserInputError(str(user_error_behind(e))) from None
    from dipo_scale.plan import check_fits

    check_fits(cfg, num_workers=low, gpu_memory_bytes=gpu_memory_bytes())
