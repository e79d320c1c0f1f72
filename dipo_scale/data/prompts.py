"""Prompt formats of the benchmarks, next to the loaders of their data: what the models are trained
on (`dipo_scale.prepare` builds QA blocks with them) and what the evaluation asks (`dipo_scale.eval`).

* MUSE KnowMem: ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per in-context example, then
  ``"Question: {q}\\nAnswer: "``.
* TOFU (non-chat models): ``"Question: {q}\\nAnswer: "``, the same prompt without examples.
"""

from __future__ import annotations

from dipo_scale.data.muse import QA


def knowmem_prompt(icl: list[QA], question: str) -> str:
    """The MUSE few-shot QA prompt: the in-context examples, then `question`."""
    shots = "".join(f"Question: {ex.question}\nAnswer: {ex.answer}\n\n" for ex in icl)
    return shots + f"Question: {question}\nAnswer: "


def tofu_prompt(question: str) -> str:
    """TOFU's question format for non-chat models: "Question: {q}\\nAnswer: "."""
    return knowmem_prompt([], question)
