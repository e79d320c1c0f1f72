"""The `dipo-scale` command: one subcommand per stage, plus the end-to-end demo.

    dipo-scale generate --out DIR [--num-docs N | --scale X] [--forget-docs N] [--holdout-docs N] [--seed S]
    dipo-scale prepare  --data DIR --tokenizer PATH --out DIR [--block-size N] [--with-qa] [--layout L]
    dipo-scale unlearn  [--config YAML] [--set key=value ...]
    dipo-scale reference [--config YAML] [--set key=value ...]   (reference.form=hidden|topk)
    dipo-scale plan     [--config YAML] [--set key=value ...] [--gpu-memory 80GiB] [--num-workers N]
    dipo-scale evaluate --model PATH --data DIR --out OUT [--attacks quantize,relearn] [--set relearn.steps=N]
    dipo-scale attack   --model PATH --data DIR --out OUT --kind quantize,relearn [--set relearn.KEY=VALUE]
    dipo-scale sweep    [--config YAML] [--set key=value ...]
    dipo-scale sequential | scalability [--config YAML] [--set key=value ...]
    dipo-scale demo     --out DIR [--data DIR [--forget S --retain S --retain-limit N]] [--attacks KINDS]
                        [--set key=value ...]

Bad input prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dipo_scale.errors import UserInputError


def _cmd_generate(args) -> None:
    from dipo_scale.data.corpus import docs_for_scale, generate_corpus
    from dipo_scale.files import check_output_dir

    if args.scale is not None and args.num_docs is not None:
        raise UserInputError("give --num-docs or --scale, not both")
    if args.scale is not None and not args.scale > 0:
        raise UserInputError(f"--scale {args.scale:g}: must be > 0 (a multiple of MUSE-News's forget size)")
    num_docs = docs_for_scale(args.scale) if args.scale is not None else (args.num_docs or 40)
    check_output_dir(args.out, "generate")
    print(generate_corpus(args.out, num_docs=num_docs, seed=args.seed, forget_docs=args.forget_docs,
                          holdout_docs=args.holdout_docs))


def _cmd_prepare(args) -> None:
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.files import check_output_dir
    from dipo_scale.preflight import check_tokenizer, resolve_model_dir

    if args.block_size < 2:
        raise UserInputError(f"--block-size {args.block_size}: must be at least 2 (a token and the one it predicts)")
    tokenizer_dir = resolve_model_dir(args.tokenizer, "--tokenizer")
    check_output_dir(args.out, "prepare", inputs=[("--data", args.data), ("--tokenizer", tokenizer_dir)])
    data = load_muse_dir(args.data)  # bad data is reported before the heavy imports
    from dipo_scale.prepare import prepare

    tokenizer = check_tokenizer(tokenizer_dir, "--tokenizer")
    manifest = prepare(data, tokenizer, args.out, block_size=args.block_size, with_qa=args.with_qa,
                       layout=args.layout)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['blocks']} blocks, {info['tokens']} tokens")


def _cmd_unlearn(args) -> None:
    from dipo_scale.config import load_unlearn_config

    cfg = load_unlearn_config(args.config, args.set)  # config errors before the heavy imports
    from dipo_scale.unlearn import run_unlearning

    print(run_unlearning(cfg))


def _cmd_plan(args) -> None:
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.plan import parse_memory, plan_memory

    cfg = load_unlearn_config(args.config, args.set)
    gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
    low, high = cfg.train.worker_range
    workers = high if args.num_workers is None else args.num_workers
    if gpu_memory is None and cfg.train.use_gpu:
        import torch

        if torch.cuda.is_available():  # this machine's GPU, when it has one
            gpu_memory = torch.cuda.get_device_properties(0).total_memory
    plan = plan_memory(cfg, num_workers=workers, gpu_memory_bytes=gpu_memory)
    print(plan.table())
    if args.num_workers is None and low < high:
        print(f"note: an elastic group shrunk to its {low} workers holds larger partitions: "
              f"--num-workers {low} plans for it")
    if plan.fits is False:
        raise UserInputError(plan.refusal())


def _cmd_reference(args) -> None:
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.reference.precompute import precompute_reference

    cfg = load_unlearn_config(args.config, args.set)
    m = precompute_reference(cfg)
    p = m["precompute"]
    rate = f", {p['tokens_per_second']:.0f} tokens/s" if p["tokens_per_second"] else ""
    print(f"{cfg.reference.cache_dir}: form {m['form']}{' k=' + str(m['k']) if m['k'] else ''}, "
          f"{m['bytes_per_token']} bytes/token, {m['total_bytes']} bytes; "
          f"{p['shards_computed']} shards computed, {p['shards_reused']} reused{rate}")


def _cmd_evaluate(args) -> None:
    from dipo_scale.config import AttackConfig, load_config
    from dipo_scale.eval.attacks import parse_attacks

    flag, kinds = ("--kind", args.kind) if args.command == "attack" else ("--attacks", args.attacks)
    attacks = parse_attacks(kinds, flag) if kinds else []
    if (args.config or args.set) and "relearn" not in attacks:
        raise UserInputError(f"--config / --set set the relearning attack (relearn.*): name it with {flag} relearn")
    relearn = load_config(args.config, args.set, AttackConfig).relearn
    if "relearn" in attacks:  # an earlier relearning run in --out is reused only if made from the same inputs
        from dipo_scale.eval.attacks import check_relearn_reuse

        check_relearn_reuse(args.model, args.data, args.out, relearn, forget=args.forget, retain=args.retain)
    from dipo_scale.eval import run_evaluation

    metrics = run_evaluation(
        args.model, args.data, args.out,
        retrain_model=args.retrain_model, retrain_auc=args.retrain_auc,
        retain_model=args.retain_model, retain_truth_ratios=args.retain_truth_ratios,
        forget=args.forget, retain=args.retain, limit=args.limit, batch_size=args.batch_size,
        num_workers=args.num_workers, max_new_tokens=args.max_new_tokens, device=args.device,
        gpus_per_worker=args.gpus_per_worker, attacks=attacks, relearn=relearn,
    )
    for key, value in metrics.items():
        print(f"{key}: " + (f"[{value[0]:.4g}, {value[1]:.4g}]" if isinstance(value, list) else f"{value:.4g}"))
    print(f"report: {Path(args.out) / 'report.md'}")


def _cmd_sweep(args) -> None:
    from dipo_scale.config import SweepConfig, load_config
    from dipo_scale.sweep import run_sweep

    best = run_sweep(load_config(args.config, args.set, SweepConfig))
    print(f"best trial: {best['trial_id']} (feasible: {best['feasible']}) {best.get('params', {})}")
    print(f"model: {best.get('model') or '-'}")


def _cmd_series(args) -> None:
    from dipo_scale.config import SeriesConfig, load_config
    from dipo_scale.sequential import run_series

    cfg = load_config(args.config, args.set, SeriesConfig)
    for entry in run_series(cfg, kind=args.command)["requests"]:
        metrics = " ".join(f"{k}={v:.1f}" for k, v in entry["metrics"].items() if isinstance(v, float))
        print(f"request {entry['request']}: {entry['forget_docs']} docs -> {entry['output_model']}  {metrics}")


def _cmd_demo(args) -> None:
    from dipo_scale.demo import run_demo
    from dipo_scale.eval.attacks import parse_attacks

    run_demo(args.out, data_dir=args.data, overrides=args.set, num_docs=args.num_docs, forget=args.forget,
             retain=args.retain, retain_limit=args.retain_limit, methods=tuple(args.methods.split(",")),
             doc=args.doc, command="dipo-scale " + " ".join(args.argv),
             attacks=tuple(parse_attacks(args.attacks, "--attacks")) if args.attacks else ())


def _config_args(p: argparse.ArgumentParser, config_help: str, set_help: str) -> None:
    """--config YAML and repeatable --set key=value: the commands driven by one config tree."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _gpus_per_worker(text: str) -> str | float:
    """--gpus-per-worker: auto, or a number >= 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: auto or a number >= 0")
    return value


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    """The flags of `evaluate` and `attack`."""
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--data", required=True,
                   help="MUSE- or TOFU-layout directory (detected), or a hub name (locuslab/TOFU, muse-bench/MUSE-News)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each set")
    p.add_argument("--retrain-model", default=None, help="model never trained on the forget set: its MIA AUC gives privleak")
    p.add_argument("--retrain-auc", type=float, default=None, help="the retrained model's MIA AUC, if known")
    p.add_argument("--retain-model", default=None, help="TOFU: the retain model, for forget quality")
    p.add_argument("--retain-truth-ratios", default=None, metavar="FILE.json",
                   help="TOFU: the retain model's forget-set truth ratios (a JSON list, or a truth_ratios.json)")
    p.add_argument("--forget", default="forget10", help="TOFU forget split (forget01, forget05, forget10)")
    p.add_argument("--retain", default=None,
                   help="TOFU retain split for utility (default retain_perturbed, TOFU's evaluation subset)")
    p.add_argument("--num-workers", type=int, default=1, help="MUSE: Ray actors evaluating shares of the items")
    p.add_argument("--gpus-per-worker", type=_gpus_per_worker, default="auto",
                   help="GPUs each Ray actor asks for (> 0: the evaluation runs on actors, even with one worker); "
                        "auto (default): 1 where the Ray cluster has GPUs, else 0")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA and bfloat16 where a GPU is visible (to each actor), else CPU and float32, "
                        "but a model above 1B parameters only on GPUs; cpu: on CPUs, whatever the size")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens (defaults: VerbMem 128, KnowMem 32, TOFU 128)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dipo-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write the embedded fictitious news corpus (MUSE layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-docs", type=int, default=None, help="documents in all (default 40)")
    p.add_argument("--forget-docs", type=int, default=None, help="forget documents (default 30%% of all)")
    p.add_argument("--holdout-docs", type=int, default=None, help="holdout documents (default 20%% of all)")
    p.add_argument("--scale", type=float, default=None,
                   help="size the corpus to SCALE x MUSE-News's forget split (3.3 MB of forget text)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("prepare", help="tokenise and pack a MUSE-layout corpus into parquet blocks")
    p.add_argument("--data", required=True, help="MUSE-layout directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub name")
    p.add_argument("--out", required=True)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--with-qa", action="store_true", help="add each split's QA pairs to its blocks")
    p.add_argument("--layout", choices=["concat", "per_sequence"], default="concat",
                   help="concat: documents end to end; per_sequence: each document starts a block")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("unlearn", help="run one unlearning job (Ray Train + DeepSpeed ZeRO-3)")
    _config_args(p, "YAML config (see configs/unlearn.yaml)",
                 "dotted override, e.g. --set dipo.alpha=2.0 (repeatable)")
    p.set_defaults(func=_cmd_unlearn)

    p = sub.add_parser("reference", help="precompute the reference statistics of an unlearning config "
                       "(reference.form=hidden|topk) into reference.cache_dir; resumable")
    _config_args(p, "YAML unlearning config (see configs/unlearn.yaml, section reference)",
                 "dotted override, e.g. --set reference.form=topk --set reference.k=32 (repeatable)")
    p.set_defaults(func=_cmd_reference)

    p = sub.add_parser("plan", help="per-GPU peak memory of an unlearning config, row by row, from the model's "
                       "config alone (no weights); exit 2 when it does not fit --gpu-memory")
    _config_args(p, "YAML unlearning config (see configs/gpu_7b.yaml)",
                 "dotted override, e.g. --set model.path=configs/model_shapes/llama-2-7b (repeatable)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory of each GPU, e.g. 80GiB, 80GB or 81920MiB (default: this machine's GPU, if any)")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="workers (GPUs) to plan for (default: train.num_workers, the maximum of an elastic range)")
    p.set_defaults(func=_cmd_plan)

    for name, text in (("evaluate", "MUSE (VerbMem, KnowMem, PrivLeak) or TOFU (forget quality, model utility) "
                                    "metrics of a model; writes OUT/metrics.json and OUT/report.md"),
                       ("attack", "the evaluation after attacks that undo hidden forgetting (bitsandbytes "
                                  "8-/4-bit quantization, relearning on a slice of the forget set): "
                                  "<metric>@<attack> and <metric>@<attack>_recovery in OUT/metrics.json")):
        p = sub.add_parser(name, help=text)
        _evaluate_args(p)
        if name == "attack":
            p.add_argument("--kind", required=True, metavar="KINDS",
                           help="comma-separated: quantize (= quantize8,quantize4), quantize8, quantize4, relearn")
        else:
            p.add_argument("--attacks", default=None, metavar="KINDS",
                           help="also rerun the criteria after these attacks (as `dipo-scale attack --kind`)")
        _config_args(p, "YAML with a relearn: section (the relearning attack's settings)",
                     "relearning setting, e.g. --set relearn.steps=40 --set relearn.fraction=0.2 (repeatable)")
        p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("sweep", help="Ray Tune over α, β, lr (...): one unlearning run per trial; "
                       "writes sweep.csv, best.json, pareto.png")
    _config_args(p, "YAML sweep config (see configs/sweep.yaml)",
                 "dotted override, e.g. --set unlearn.train.steps=40 (repeatable)")
    p.set_defaults(func=_cmd_sweep)

    for name, text in (("sequential", "a chain of unlearning requests, each from the previous model "
                                      "(sustainability); resumable; writes lineage.json and report.md"),
                       ("scalability", "unlearning runs over nested forget sets of growing size from "
                                       "the same model; writes lineage.json and report.md")):
        p = sub.add_parser(name, help=text)
        _config_args(p, "YAML series config (see configs/sequential.yaml)",
                     "dotted override, e.g. --set folds=3 (repeatable)")
        p.set_defaults(func=_cmd_series)

    p = sub.add_parser("demo", help="the whole chain on the embedded corpus (or --data) with tiny models")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None,
                   help="your own MUSE- or TOFU-layout directory (detected) instead of the generated corpus")
    p.add_argument("--num-docs", type=int, default=None, help="size of the generated corpus")
    p.add_argument("--forget", default=None, help="TOFU: the forget split to unlearn (default forget10)")
    p.add_argument("--retain", default=None,
                   help="TOFU: the retain split (default the complement of --forget: forget01 -> retain99)")
    p.add_argument("--doc", default=None, metavar="FILE.md",
                   help="also write the report, with the command, date and machine, to FILE.md (e.g. "
                        "docs/demo.md; plots in <FILE>_files/); refused over a file this option did not write")
    p.add_argument("--attacks", default=None, metavar="KINDS",
                   help="also evaluate every model after these attacks (quantize, quantize8, quantize4, relearn; "
                        "comma-separated): a robustness section, several minutes more")
    p.add_argument("--methods", default="dipo,npo,ga", help="unlearning methods to run, comma-separated (dipo among them)")
    p.add_argument("--retain-limit", type=int, default=None, metavar="N",
                   help="TOFU: keep only N retain QA pairs (those of retain_perturbed first), for a small run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the unlearning config of all three methods")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
