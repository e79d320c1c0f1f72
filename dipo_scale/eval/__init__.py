"""Evaluation: MUSE's criteria (VerbMem, KnowMem, PrivLeak) and TOFU's two numbers.

    dipo_scale.eval.generation   batched greedy generation and token log-probabilities (the loops
                                 that run the model), prompt encoding, loading a model
    dipo_scale.eval.muse         VerbMem and KnowMem (ROUGE-L), `evaluate_muse`
    dipo_scale.eval.privacy      Min-K% Prob, its AUC, PrivLeak
    dipo_scale.eval.tofu         truth ratio, forget quality, model utility, `evaluate_tofu`
    dipo_scale.eval.workers      data-parallel evaluation over Ray actors
    dipo_scale.eval.in_training  evaluation during unlearning and checkpoint selection
    dipo_scale.eval.run          `run_evaluation`, what `dipo-scale evaluate` does (the one entry point)

The prompt formats (`knowmem_prompt`, `tofu_prompt`) live next to the data loaders, in
`dipo_scale.data.prompts`. Each module's docstring gives its formulas and their sources.
"""

from dipo_scale.eval.run import run_evaluation

__all__ = ["run_evaluation"]
