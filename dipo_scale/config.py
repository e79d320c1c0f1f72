"""One typed config tree for every stage: YAML in, validated by pydantic, dotted overrides.

    cfg = load_config("configs/unlearn.yaml", overrides=["dipo.alpha=2.0", "train.steps=50"])

Every invalid value is reported at once, in one line, as a `UserInputError` (exit code 2),
before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dipo_scale.errors import UserInputError
from dipo_scale.files import absolute_if_local

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


class _Strict(BaseModel):
    # inf and nan are refused for every float (`train.lr=.inf` diverged into an all-NaN export)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data):
        """`train.steps: true` is a mistake, not 1 (pydantic would take a bool for a number)."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(field.alias or name, data.get(name))
                numeric = field.annotation in (int, float, Optional[int], Optional[float])
                if numeric and isinstance(value, bool):
                    raise ValueError(f"{field.alias or name}: expected a number, got {str(value).lower()}")
        return data


class ModelConfig(_Strict):
    path: str = ""                         # model to unlearn (local dir or hub name)
    reference_path: Optional[str] = None   # frozen reference; defaults to `path`
    # auto: bfloat16 on GPUs (train.use_gpu), float32 on CPUs (UnlearnConfig.model_dtype)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    trust_remote_code: bool = False


class DataConfig(_Strict):
    prepared_dir: str = ""                 # output of `dipo-scale prepare`
    block_size: int = Field(256, gt=1)


class DipoConfig(_Strict):
    select: Literal["topk", "label", "topp"] = "topk"
    k: int = Field(1, ge=1)
    p: float = 0.9      # in (0, 1]; 1 puts the whole vocabulary in S (the margin is then 0)
    alpha: float = 1.0  # in (0, 1000]
    beta: float = Field(0.1, gt=0)
    reduction: Literal["sum", "mean"] = "sum"
    source: Literal["reference", "policy"] = "reference"

    @field_validator("alpha", "p")
    @classmethod
    def _in_range(cls, value: float, info) -> float:
        """α in (0, 1000]: the loss is computed stably at any α (docs/DIPO.md, "Numerics"), and
        each position whose log-odds of the mass on S are below α − 37 in magnitude already gets,
        in float64, the pair of α = ∞; a larger value is a typo, inf or nan. p in (0, 1]: a
        probability mass (nan refused too)."""
        high = {"alpha": 1000.0, "p": 1.0}[info.field_name]
        if not 0 < value <= high:
            raise ValueError(f"must be in (0, {high:g}], got {value}")
        return value


class NpoConfig(_Strict):
    beta: float = Field(0.1, gt=0)


class LossConfig(_Strict):
    retain: Literal["none", "gd", "kl"] = "gd"
    gamma: float = Field(1.0, ge=0)        # weight of the forget term
    lam: float = Field(1.0, ge=0, alias="lambda")  # weight of the retain term
    chunk_size: Optional[int] = Field(None, ge=1)  # positions per chunk in the losses (None: by vocab size)
    fused: bool = False  # LM head + loss chunk by chunk: the [B, T, V] logits never exist (engine.FusedHeadModel)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


class TrainConfig(_Strict):
    # N workers, or [min, max]: an elastic group that starts with what it can get, shrinks when a
    # node is lost and grows back (the global batch, schedule and LR curve do not change)
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    # a file in ds_configs/ (or a path); auto: zero3_bf16.json on GPUs, zero3_cpu.json on CPUs
    ds_config: str = "auto"
    # recompute each decoder layer's activations in the backward instead of keeping them: at 7B and
    # 2048-token blocks the kept activations alone exceed an 80 GB GPU (`dipo-scale plan`)
    gradient_checkpointing: bool = False
    steps: int = Field(20, ge=1)
    global_batch_size: int = Field(8, ge=1)  # forget blocks per optimizer step (and as many retain)
    micro_batch_size: int = Field(4, ge=1)   # per worker per forward
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw_8bit: bitsandbytes 8-bit optimizer states
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)   # steps between checkpoints (0: only the final one)
    keep_checkpoints: int = Field(2, ge=1)   # the last K are kept in storage
    max_failures: int = Field(0, ge=-1)      # worker-group restarts from the last checkpoint (-1: unlimited)
    storage_path: Optional[str] = None       # Ray Train storage (shared on clusters); default <out_dir>/ray
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    resize_check_s: float = Field(60.0, gt=0)  # elastic: how often Ray looks for capacity to grow into

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if isinstance(low, bool) or isinstance(high, bool) or not 1 <= low <= high:
            raise ValueError(f"expected N >= 1 or [min, max] with 1 <= min <= max, got {value}")
        return value

    @model_validator(mode="after")
    def _elastic_restarts(self):
        if isinstance(self.num_workers, tuple) and self.max_failures == 0:
            raise ValueError("max_failures: an elastic group (num_workers=[min, max]) restarts after a lost node; "
                             "set train.max_failures > 0 (or -1, unlimited)")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size group."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else tuple(n)


class LoggingConfig(_Strict):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "dipo-scale"


class EvalConfig(_Strict):
    verbmem_max_new_tokens: int = Field(128, ge=1)
    knowmem_max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    limit: Optional[int] = Field(None, ge=1)   # evaluate on the first N items of each set
    # Evaluation during unlearning (rank 0, on the consolidated weights) and checkpoint selection.
    every: int = Field(0, ge=0)                # steps between evaluations (0: none)
    data_dir: Optional[str] = None             # MUSE-layout directory to evaluate on
    select: Literal["none", "muse", "knowmem_r"] = "none"
    retrain_knowmem_f: Optional[float] = None  # `muse`: first evaluation with knowmem_f <= this
    forget_target: Optional[float] = None      # `knowmem_r`: best knowmem_r with knowmem_f <= this
    # Where evaluations outside training run (`demo`, the sweep's target model, `sequential` /
    # `scalability` after each request; dipo_scale/eval/workers.py). During unlearning the training
    # workers evaluate on their own devices, inside their engines, and these do not apply.
    # A model above 1B parameters is evaluated on CPUs only with device=cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA + bfloat16 where a GPU is visible
    num_workers: int = Field(1, ge=1)          # Ray actors, each scoring a share of the items
    # GPUs each actor asks Ray for (> 0: actors even for 1); auto: 1 where the Ray cluster has GPUs, else 0
    gpus_per_worker: Union[Literal["auto"], float] = "auto"

    @field_validator("gpus_per_worker", mode="before")
    @classmethod
    def _gpus(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise ValueError(f"expected auto or a number >= 0, got {str(value).lower()}")
        return value

    @model_validator(mode="after")
    def _placement(self):
        if self.gpus_per_worker == "auto":
            return self
        if self.device == "cpu" and self.gpus_per_worker > 0:
            raise ValueError(f"gpus_per_worker: {self.gpus_per_worker:g} GPUs with device=cpu would stay idle")
        if self.device == "cuda" and self.gpus_per_worker == 0 and self.num_workers > 1:
            raise ValueError("gpus_per_worker: device=cuda on Ray actors needs gpus_per_worker > 0 "
                             "(Ray shows an actor a GPU only when it asks for one)")
        return self

    def muse_settings(self) -> dict:
        """The keyword arguments of `eval.muse.evaluate_muse` these settings fix."""
        return dict(limit=self.limit, batch_size=self.batch_size,
                    verbmem_max_new_tokens=self.verbmem_max_new_tokens,
                    knowmem_max_new_tokens=self.knowmem_max_new_tokens)

    def placement(self) -> dict:
        """The keyword arguments of `eval.workers.muse_item_scores` that say where it runs."""
        return dict(device=self.device, num_workers=self.num_workers, gpus_per_worker=self.gpus_per_worker)


class ReferenceConfig(_Strict):
    """Where the reference statistics come from (docs/DIPO.md, "Reference statistics").

    `online`: a frozen reference engine runs a forward every step. `hidden` / `topk`: read from a
    cache written once by `dipo-scale reference` into `cache_dir` (dipo_scale/reference/)."""
    form: Literal["online", "hidden", "topk"] = "online"
    k: int = Field(32, ge=1)                 # topk: logits kept per position
    cache_dir: Optional[str] = None          # hidden/topk: the cache (`dipo-scale reference` writes it)
    # stored hidden states / top-K logits; auto: the model's dtype (UnlearnConfig.reference_dtype)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Precompute (`dipo-scale reference`) only:
    quantize: Literal["none", "8bit", "4bit"] = "none"  # load the reference with bitsandbytes
    mode: Literal["actors", "zero3"] = "actors"  # Ray Data actor pool, or ZeRO-3 workers (Ray Train)
    # actors, or ZeRO-3 workers, and the CPUs (torch threads) of each; unset: one worker per node
    # using all its CPUs, or with train.use_gpu one per GPU with its node's CPUs per GPU (the
    # fewest over the GPU nodes); see dipo_scale.reference.precompute.pool_size
    num_workers: Optional[int] = Field(None, ge=1)
    cpus_per_worker: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)         # blocks per reference forward
    # A cache shard (the unit of work and of resumption) holds as many blocks as fit in
    # `shard_bytes` (at least one), and at most `rows_per_shard` when that is set. Readers verify
    # and read single blocks (a sha256 per block), so the shard size bounds the precompute's files
    # and its resumption, not what training reads.
    shard_bytes: int = Field(1 << 30, ge=1)  # bytes per cache shard (default 1 GiB)
    rows_per_shard: Optional[int] = Field(None, ge=1)  # optional cap on blocks per shard (finer work units)


class UnlearnConfig(_Strict):
    # relearn: gradient descent on the forget blocks' NLL, the relearning attack (dipo_scale/eval/attacks.py)
    method: Literal["dipo", "npo", "ga", "relearn"] = "dipo"
    out_dir: str = "runs/unlearn"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    dipo: DipoConfig = DipoConfig()
    npo: NpoConfig = NpoConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
    reference: ReferenceConfig = ReferenceConfig()

    @property
    def run_name(self) -> str:
        """MUSE-style method name plus the key hyperparameters, e.g. dipo_gdr-a1.0-b0.1-lr1e-05."""
        name = self.method + {"none": "", "gd": "_gdr", "kl": "_klr"}[self.loss.retain]
        if self.method == "dipo":
            name += f"-a{self.dipo.alpha:g}-b{self.dipo.beta:g}-{self.dipo.select}"
        elif self.method == "npo":
            name += f"-b{self.npo.beta:g}"
        return f"{name}-lr{self.train.lr:g}-s{self.train.steps}"

    @model_validator(mode="after")
    def _check_eval_selection(self):
        e = self.eval
        if e.every and not e.data_dir:
            raise ValueError("eval.every needs eval.data_dir (a MUSE-layout directory)")
        if e.select == "muse" and e.retrain_knowmem_f is None:
            raise ValueError("eval.select=muse needs eval.retrain_knowmem_f (the retrain model's knowmem_f)")
        if e.select == "knowmem_r" and e.forget_target is None:
            raise ValueError("eval.select=knowmem_r needs eval.forget_target (the knowmem_f to reach)")
        if e.select != "none" and not e.every:
            raise ValueError(f"eval.select={e.select} needs eval.every > 0")
        if self.reference.form != "online" and not self.reference.cache_dir:
            raise ValueError(f"reference.form={self.reference.form} needs reference.cache_dir "
                             "(written by `dipo-scale reference`)")
        if self.reference.quantize != "none" and self.reference.mode == "zero3":
            raise ValueError("reference.quantize needs reference.mode=actors (bitsandbytes models "
                             "are not partitioned by ZeRO-3)")
        return self

    @property
    def model_dtype(self) -> str:
        """`model.dtype` resolved: auto is bfloat16 on GPUs, float32 on CPUs."""
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bfloat16" if self.train.use_gpu else "float32"

    @property
    def reference_dtype(self) -> str:
        """`reference.dtype` resolved: auto stores the cache in the model's dtype."""
        return self.model_dtype if self.reference.dtype == "auto" else self.reference.dtype

    @property
    def ds_config_name(self) -> str:
        """`train.ds_config` resolved: auto is zero3_bf16.json on GPUs, zero3_cpu.json on CPUs."""
        return resolved_ds_config_name(self.train.ds_config, self.train.use_gpu)

    def needs_reference(self) -> bool:
        return self.method in ("dipo", "npo") or self.loss.retain == "kl"

    def reference_cached(self) -> bool:
        """The reference comes from a `dipo-scale reference` cache, not a reference engine."""
        return self.needs_reference() and self.reference.form != "online"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserInputError(f"--set {dotted}: '{key}' is not a section")
    node[leaf] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings; values are parsed as YAML (2.0, true, null, topk, [1, 2])."""
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"--set {item!r}: expected key=value, e.g. dipo.alpha=2.0")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise UserInputError(f"--set {item}: malformed value ({getattr(e, 'problem', None) or 'not YAML'})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _error_source(where: str, msg: str, overrides: list[str]) -> str | None:
    """The `--set` item that gave the value at dotted location `where` (or, for a check across
    keys, one named in `msg`); None: the YAML file."""
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if where == key or where.startswith(key + ".") or key.startswith(where + ".") or (
                where == "config" and key in msg):
            return item
    return None


def validation_errors(err: ValidationError) -> list[tuple[str, str]]:
    """(dotted location, message) of each error."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:  # a model-level check that names its key itself
            where, msg = ".".join(filter(None, [where, head])), rest
        parts.append((where or "config", msg))
    return parts


def format_validation_error(err: ValidationError) -> str:
    return "; ".join(f"{where}: {msg}" for where, msg in validation_errors(err))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type[BaseModel] = UnlearnConfig, base: dict | None = None,
                raw_checks: Callable[[dict], list[str]] | None = None) -> Any:
    """YAML file (optional) + `base` dict + dotted overrides -> validated config.

    `raw_checks` inspects the merged tree and returns further error messages (checks that need
    more than the schema); they are reported together with the schema's errors.
    """
    tree: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"{path}: config file not found")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise UserInputError(f"{path}: expected a mapping at the top level")
        tree = _deep_merge(tree, loaded)
    overrides = overrides or []
    apply_overrides(tree, overrides)
    errors = [(msg.split(": ", 1)[0], msg) for msg in (raw_checks(tree) if raw_checks else [])]
    try:
        cfg = cls.model_validate(tree)
    except ValidationError as e:
        errors = [(where, msg if where == "config" else f"{where}: {msg}")
                  for where, msg in validation_errors(e)] + errors
    if errors:  # each error under its source: the --set item that gave the value, or the file
        sources = [_error_source(where, msg, overrides) for where, msg in errors]
        from_file = [msg for (_, msg), src in zip(errors, sources) if src is None]
        from_set = [f"--set {src}: {msg}" for (_, msg), src in zip(errors, sources) if src is not None]
        parts = ([f"{path}: invalid config: {'; '.join(from_file)}"] if path and from_file else
                 [f"invalid config: {'; '.join(from_file)}"] if from_file else []) + from_set
        raise UserInputError("; ".join(parts))
    return cfg


class _DuplicateKey(yaml.MarkedYAMLError):
    """A key given twice in one mapping (`problem_mark`: the second)."""


def _mappings(node: yaml.Node, where: tuple[str, ...] = (), seen: set | None = None):
    """Each mapping node of a composed YAML document with its dotted location (an alias, which
    may refer to itself, is visited once)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        yield node, where
        for key, value in node.value:
            yield from _mappings(value, (*where, str(key.value)), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _mappings(item, (*where, str(i)), seen)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    and drops the first unread, invalid values included. Keys merged in with `<<: *anchor` may
    be overridden, as YAML means. (Checked on the composed document, before construction
    flattens the merges.)"""

    def construct_document(self, node):
        for mapping, where in _mappings(node):
            first_line: dict = {}
            for key_node, _ in mapping.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first_line:
                    raise _DuplicateKey(problem=f"duplicate key '{'.'.join((*where, str(key)))}' "
                                                f"(first at line {first_line[key]})", problem_mark=key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_document(node)


def read_yaml(path: Path) -> Any:
    """The YAML document of a config file. Refused in one line naming the file (and the line):
    unreadable, not UTF-8 (with the offset of the first bad byte), malformed, or with a key given
    twice in one mapping."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserInputError(f"{path}:{line}: not UTF-8 text "
                             f"(byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise UserInputError(f"{path}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (control characters)
        line = text.count("\n", 0, e.position) + 1
        raise UserInputError(f"{path}:{line}: malformed YAML: character #x{e.character:04x} ({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        what = ", ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
        raise UserInputError(f"{path}{line}: malformed YAML: {' '.join(what.split())}") from None


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolved_ds_config_name(name: str, use_gpu: bool) -> str:
    """A `ds_config` setting with `auto` resolved for the device the engines run on."""
    if name != "auto":
        return name
    return "zero3_bf16.json" if use_gpu else "zero3_cpu.json"


def resolve_ds_config_path(name: str) -> Path:
    candidates = [Path(name), Path.cwd() / "ds_configs" / name, DS_CONFIG_DIR / name]
    path = next((p for p in candidates if p.is_file()), candidates[-1])
    if not path.is_file():
        raise UserInputError(f"train.ds_config: {name} not found (looked in {DS_CONFIG_DIR})")
    return path


def _model_vocab_size(model_path: str) -> int | None:
    """vocab_size from a local model's config.json (None when unknown or not local)."""
    config = Path(model_path) / "config.json"
    if not model_path or not config.is_file():
        return None
    try:
        return int(yaml.safe_load(config.read_text()).get("vocab_size"))
    except (yaml.YAMLError, TypeError, ValueError, AttributeError):
        return None


def _vocab_checks(tree: dict) -> list[str]:
    """dipo.k must not exceed the vocabulary of the model being unlearned (when it is local)."""
    dipo, model = tree.get("dipo"), tree.get("model")
    if not isinstance(dipo, dict) or not isinstance(model, dict):
        return []
    vocab, k = _model_vocab_size(str(model.get("path") or "")), dipo.get("k")
    if vocab is not None and isinstance(k, int) and k > vocab:
        return [f"dipo.k: {k} exceeds the vocabulary size of {model['path']} ({vocab})"]
    return []


def load_unlearn_config(path: str | Path | None, overrides: list[str] | None = None,
                        base: dict | None = None) -> UnlearnConfig:
    """`load_config` for unlearning runs, with the model-dependent check (k ≤ vocab)."""
    return load_config(path, overrides, UnlearnConfig, base, raw_checks=_vocab_checks)


class RelearnConfig(_Strict):
    """The relearning attack (`dipo-scale attack --kind relearn`, `evaluate --attacks relearn`):
    fine-tune the model for `steps` steps on a slice of its forget set, then rerun the criteria on
    the rest (dipo_scale/eval/attacks.py). The engine is unlearning's (Ray Train + ZeRO-3,
    method=relearn); the last six keys are its `train.*` settings."""
    steps: int = Field(20, ge=1)
    fraction: float = 0.1                  # of the forget documents (TOFU: QA pairs) relearned, in (0, 1)
    data: Optional[str] = None             # a related set to relearn on instead (a raw file: .txt/.jsonl/.json/.parquet)
    seed: int = 0                          # which documents make the slice
    block_size: int = Field(256, gt=1)
    lr: float = Field(1e-5, gt=0)
    global_batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    num_workers: int = Field(2, ge=1)
    use_gpu: Union[Literal["auto"], bool] = "auto"  # auto: GPU workers where the Ray cluster has GPUs
    ds_config: str = "auto"                # auto: zero3_bf16.json on GPUs, else zero3_cpu.json

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _use_gpu(cls, value):
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"expected auto, true or false, got {value!r}")
        return value

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"must be in (0, 1), got {value}")
        return value


class AttackConfig(_Strict):
    """`--set relearn.KEY=VALUE` of `dipo-scale attack` / `evaluate --attacks`."""
    relearn: RelearnConfig = RelearnConfig()


# ------------------------------------------------------------------------------------------
# Sweeps (`dipo-scale sweep`) and series of runs (`dipo-scale sequential` / `scalability`)
# ------------------------------------------------------------------------------------------
class SearchSpace(_Strict):
    """The values one hyperparameter takes in a sweep: exactly one of these."""
    grid: Optional[list[Any]] = None                   # every value (grid search)
    choice: Optional[list[Any]] = None                 # sampled uniformly
    uniform: Optional[tuple[float, float]] = None      # [low, high]
    loguniform: Optional[tuple[float, float]] = None   # [low, high], low > 0

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        if (self.grid or self.choice) == []:
            raise ValueError(f"{given[0]}: empty list")
        return self


class ObjectiveConfig(_Strict):
    """What the sweep optimises: `metric` (mode min or max), among trials whose `constraint` metric
    keeps at least `min_fraction` of the target model's value and (MUSE, optional) whose |privleak|
    is at most `max_abs_privleak`.

    kind=muse (default): the lowest knowmem_f with knowmem_r >= 0.9 x the target's. kind=tofu: TOFU's
    reading, the highest forget_quality with model_utility >= 0.95 x the target's (these defaults
    apply to the keys not given). `after: quantize4` (quantize8, relearn) ranks by the metric after
    that attack (`<metric>@<attack>`, dipo_scale/eval/attacks.py) instead of the plain one.

    Trials are ranked by the evaluations made during unlearning (`unlearn.eval`, MUSE data), or,
    with `data_dir`, by one evaluation of each finished trial's model on that MUSE or TOFU data
    (`dipo-scale evaluate`'s code, with `reference_model`: TOFU's retain model for forget quality,
    MUSE's retrain model for privleak). TOFU, `after` and `max_abs_privleak` need `data_dir`."""
    kind: Literal["muse", "tofu"] = "muse"
    metric: str = "knowmem_f"
    mode: Literal["min", "max"] = "min"
    constraint: Optional[str] = "knowmem_r"
    min_fraction: float = Field(0.9, ge=0)
    target_value: Optional[float] = None   # the target model's `constraint` value (None: evaluated first)
    max_abs_privleak: Optional[float] = Field(None, gt=0)
    after: Literal["none", "quantize8", "quantize4", "relearn"] = "none"
    data_dir: Optional[str] = None         # evaluate each finished trial's model on this data
    reference_model: Optional[str] = None  # TOFU: the retain model; MUSE: the retrain model
    forget: str = "forget10"               # TOFU: the forget split evaluated
    relearn: RelearnConfig = RelearnConfig()  # after=relearn: the attack's settings

    @model_validator(mode="before")
    @classmethod
    def _tofu_defaults(cls, data):
        if isinstance(data, dict) and data.get("kind") == "tofu":
            data = {"metric": "forget_quality", "mode": "max", "constraint": "model_utility", "min_fraction": 0.95,
                    **data}
        return data

    @model_validator(mode="after")
    def _needs(self):
        needs = [why for why, given in (("kind=tofu", self.kind == "tofu"), (f"after={self.after}", self.after != "none"),
                                        ("max_abs_privleak", self.max_abs_privleak is not None)) if given]
        if needs and not self.data_dir:
            raise ValueError(f"data_dir: {needs[0]} ranks trials by an evaluation of each finished model; "
                             "set objective.data_dir (MUSE or TOFU data)")
        if (self.kind == "tofu" or self.max_abs_privleak is not None) and not self.reference_model:
            what = "forget quality needs the retain model" if self.kind == "tofu" else "privleak needs the retrain model"
            raise ValueError(f"reference_model: {what}; set objective.reference_model")
        return self

    @property
    def final_evaluation(self) -> bool:
        """Trials are ranked by one evaluation of their finished model (not during unlearning)."""
        return self.data_dir is not None

    @property
    def metric_key(self) -> str:
        """The metrics key ranked by: `metric`, or `metric@after`."""
        return self.metric if self.after == "none" else f"{self.metric}@{self.after}"


class AshaConfig(_Strict):
    grace_period: Optional[int] = Field(None, ge=1)  # steps a trial runs before it can be stopped (None: eval.every)
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(_Strict):
    out_dir: str = "runs/sweep"
    unlearn: UnlearnConfig = UnlearnConfig()           # every trial's config, before the sampled values
    space: dict[str, SearchSpace] = {}                 # dotted key of `unlearn` -> its values
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)                  # samples (random/optuna), or repeats of the grid
    scheduler: Literal["fifo", "asha"] = "fifo"
    asha: AshaConfig = AshaConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.0, ge=0)               # CPUs of each trial's driver (its workers ask for their own)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _flatten_space(cls, data):
        """`space` may nest ({dipo: {alpha: {grid: ...}}}, as `--set space.dipo.alpha.grid=[1,5]`
        writes it) or use dotted keys ({dipo.alpha: {grid: ...}}); both become dotted keys."""
        def flat(tree, prefix=""):
            out = {}
            for key, value in tree.items():
                name = f"{prefix}{key}"
                is_leaf = not isinstance(value, dict) or set(value) & set(SearchSpace.model_fields)
                out.update({name: value} if is_leaf else flat(value, name + "."))
            return out
        if isinstance(data, dict) and isinstance(data.get("space"), dict):
            data = {**data, "space": flat(data["space"])}
        return data

    @model_validator(mode="after")
    def _check(self):
        if not self.space:
            raise ValueError("space: empty (name at least one hyperparameter, e.g. dipo.alpha)")
        for key, values in self.space.items():  # every value a trial may take (both bounds of a range)
            for value in values.grid or values.choice or values.uniform or values.loguniform:
                tree = self.unlearn.model_dump(by_alias=True)
                try:
                    _set_dotted(tree, key, value)
                    UnlearnConfig.model_validate(tree)
                except (UserInputError, ValidationError) as e:
                    msg = format_validation_error(e) if isinstance(e, ValidationError) else str(e)
                    raise ValueError(f"space.{key}: the value {value!r} is not valid ({msg})") from None
            if self.search == "grid" and values.grid is None:
                raise ValueError(f"space.{key}: search=grid needs a grid list (or use search=random/optuna)")
        e = self.unlearn.eval
        if self.objective.final_evaluation:
            if self.scheduler == "asha":
                raise ValueError("scheduler: asha stops trials on the evaluations made during unlearning; with "
                                 "objective.data_dir each trial is evaluated once, at its end: use scheduler=fifo")
        elif not e.every or not e.data_dir:
            raise ValueError("unlearn.eval.every and unlearn.eval.data_dir: a sweep ranks trials by the "
                             "evaluations made during unlearning; set both (or objective.data_dir)")
        return self


class SeriesConfig(_Strict):
    """A series of unlearning requests. `sequential`: request k unlearns forget set k starting from
    request k-1's model (MUSE sust/forget_1..N, or disjoint folds of the forget documents).
    `scalability`: each request unlearns a nested forget set of growing size from the same model
    (MUSE scal/forget_1..N, or growing prefixes of the forget documents). `forget_sets` chooses
    between the two sources; nothing switches by itself."""
    out_dir: str = "runs/sequential"
    data_dir: str = ""                                 # MUSE-layout directory (evaluation + forget sets)
    unlearn: UnlearnConfig = UnlearnConfig()           # each request's config (model.path: the first model)
    forget_sets: Literal["data", "folds"] = "data"     # data: data_dir's sust/ (scal/) sets (an error if
                                                       # absent); folds: its forget documents cut in `folds`
    folds: int = Field(4, ge=1)                        # requests of forget_sets=folds
    epochs: Optional[float] = Field(None, gt=0)        # steps per request = epochs × forget blocks / global
                                                       # batch (None: unlearn.train.steps for every request)
    layout: Literal["concat", "per_sequence"] = "concat"  # packing of each request's blocks
    with_qa: bool = False                              # add the split's QA pairs to the forget blocks
    eval_workers: int = Field(1, ge=1)                 # Ray actors of the evaluation after each request

    @model_validator(mode="after")
    def _check(self):
        if not self.data_dir:
            raise ValueError("data_dir: not set (a MUSE-layout directory)")
        if not self.unlearn.model.path:
            raise ValueError("unlearn.model.path: not set (the model of the first request)")
        return self


def run_dir_of(cfg: UnlearnConfig) -> Path:
    """A run's out_dir, absolute."""
    return Path(cfg.out_dir).resolve()


def absolute_paths(cfg: UnlearnConfig) -> UnlearnConfig:
    """Local paths made absolute: workers may run in another directory (or on another node)."""
    resolved = lambda p: str(Path(p).resolve()) if p else p  # noqa: E731  (may not exist yet)
    return cfg.model_copy(update={
        "out_dir": str(run_dir_of(cfg)),
        "model": cfg.model.model_copy(update={"path": absolute_if_local(cfg.model.path),
                                              "reference_path": absolute_if_local(cfg.model.reference_path)}),
        "data": cfg.data.model_copy(update={"prepared_dir": absolute_if_local(cfg.data.prepared_dir)}),
        "reference": cfg.reference.model_copy(update={"cache_dir": resolved(cfg.reference.cache_dir)}),
        "eval": cfg.eval.model_copy(update={"data_dir": absolute_if_local(cfg.eval.data_dir)}),
    })
