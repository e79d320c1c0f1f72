"""What the benchmarks run on and how they report (built here, nothing downloaded).

* `build_bench_assets`: a small Llama, a word-level tokenizer with a real-sized vocabulary, and
  packed blocks of random text (benchmarks/step.py, zero3_memory.py); the blocks go through the
  real `prepare` stage.
* `demo_assets`: the demo's corpus, tokenizer, target / retrain models and prepared blocks.
* `corpus_assets`: a generated MUSE-layout corpus, a BPE tokenizer trained on it and a random-init
  Llama, prepared with the QA pairs: what the commands that evaluate need, built in seconds
  (benchmarks/gpu_check.py).
* `machine_facts`, `command_line`, `write_doc_section`: the machine, date and command beside each
  figure, and a benchmark's own section of docs/benchmarks.md rewritten from its run.
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def demo_assets(demo_dir: Path) -> dict:
    """The demo corpus, models and prepared blocks (built when missing, as `dipo-scale demo` does)."""
    from transformers import AutoTokenizer

    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.demo import DEFAULT_CORPUS, MODEL_SETTINGS
    from dipo_scale.models import build_models
    from dipo_scale.prepare import prepare

    corpus = demo_dir / "corpus"
    if not (corpus / "world.json").is_file():
        generate_corpus(corpus, **DEFAULT_CORPUS, seed=0)
    data = load_muse_dir(corpus)
    paths = build_models(data, demo_dir / "models", MODEL_SETTINGS)
    if not (demo_dir / "prepared" / "manifest.json").is_file():
        prepare(data, AutoTokenizer.from_pretrained(paths["tokenizer"]), demo_dir / "prepared",
                block_size=MODEL_SETTINGS.block_size, with_qa=True, layout="per_sequence")
    return {**paths, "prepared": demo_dir / "prepared", "corpus": corpus}


def corpus_assets(root: str | Path, *, num_docs: int, vocab_size: int, hidden_size: int, num_layers: int,
                  intermediate_size: int, block_size: int, seed: int = 0) -> dict[str, Path]:
    """{"corpus", "model", "prepared"} under root (reused when already built): the generated corpus
    (`generate_corpus`), a byte-level BPE tokenizer trained on its texts (`models.train_tokenizer`;
    its vocabulary may come out below `vocab_size` on a small corpus), a random-init Llama of
    that vocabulary saved with it (`models.tiny_llama`, float32), and the corpus prepared with its
    QA pairs, one document per block."""
    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.models import TinyModelSettings, tiny_llama, train_tokenizer
    from dipo_scale.prepare import prepare

    root = Path(root)
    paths = {"corpus": root / "corpus", "model": root / "model", "prepared": root / "prepared"}
    if (paths["model"] / "model.safetensors").is_file() and (paths["prepared"] / "manifest.json").is_file():
        return paths
    if not (paths["corpus"] / "world.json").is_file():
        generate_corpus(paths["corpus"], num_docs=num_docs, seed=seed)
    data = load_muse_dir(paths["corpus"])
    qa = [f"Question: {q.question}\nAnswer: {q.answer}" for q in data.forget_qa + data.retain_qa]
    tokenizer = train_tokenizer(data.forget_docs + data.retain_docs + data.holdout_docs + qa, vocab_size)
    settings = TinyModelSettings(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                                 num_heads=max(1, hidden_size // 64), block_size=block_size, seed=seed)
    tiny_llama(len(tokenizer), settings).save_pretrained(paths["model"], safe_serialization=True)
    tokenizer.save_pretrained(paths["model"])
    prepare(data, tokenizer, paths["prepared"], block_size=block_size, with_qa=True, layout="per_sequence")
    return paths


def machine_facts(load_at_start: tuple[float, ...]) -> dict:
    """The date and the machine a benchmark ran on (its load average at start and at the end)."""
    import datetime
    import os
    import platform

    import torch

    return {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "cpus": os.cpu_count(),
                        "load_average_at_start": list(load_at_start), "load_average": list(os.getloadavg())},
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran a benchmark: `python benchmarks/<script> <arguments>` (`argv` None: the
    process's own arguments)."""
    import sys

    return " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_doc_section(path: Path, name: str, text: str) -> None:
    """Replace the part of `path` between `<!-- name:begin -->` and `<!-- name:end -->` with `text`
    (the markers appended at the end when absent); written to a temp file, then renamed."""
    from dipo_scale.files import atomic_write_text

    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, doc)


def word_level_tokenizer(vocab_size: int):
    """A fast tokenizer whose vocabulary is the 4 specials and the words w0 .. w{V-5}."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def build_bench_assets(root: str | Path, *, vocab_size: int = 32000, hidden_size: int = 256,
                       num_layers: int = 4, block_size: int = 256, num_blocks: int = 16,
                       seed: int = 0, intermediate_size: int | None = None, dtype: str = "float32",
                       device: str = "cpu") -> dict[str, Path]:
    """{"model": dir, "prepared": dir} under root (random init; reused when already built).
    `intermediate_size` defaults to 8/3 of the hidden size; the model is initialised on `device`
    (a GPU builds a 1B model in seconds) and saved in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dipo_scale.data.muse import MuseData
    from dipo_scale.prepare import prepare

    root = Path(root)
    model_dir, prepared = root / "model", root / "prepared"
    if (model_dir / "model.safetensors").is_file() and (prepared / "manifest.json").is_file():
        return {"model": model_dir, "prepared": prepared}
    tokenizer = word_level_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size or hidden_size * 8 // 3,
                         num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 64),
                         max_position_embeddings=block_size, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(model_dir, safe_serialization=True)
    del model
    tokenizer.save_pretrained(model_dir)

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    doc = lambda: " ".join(rng.choices(words, k=block_size - 2))  # noqa: E731  (one block per document)
    data = MuseData(root=root, forget_docs=[doc() for _ in range(num_blocks)],
                    retain_docs=[doc() for _ in range(num_blocks)], holdout_docs=[], forget_qa=[], retain_qa=[],
                    forget_qa_icl=[], retain_qa_icl=[], verbmem=[], privleak_forget=[], privleak_holdout=[])
    prepare(data, tokenizer, prepared, block_size=block_size, layout="per_sequence")
    return {"model": model_dir, "prepared": prepared}


def num_parameters(model_dir: str | Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())
