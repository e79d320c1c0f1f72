"""The reference of a loss: full logits (`LogitsReference`, the online form) or a cached form
(`HiddenReference`: exact, the reference's final hidden states + its LM-head weight;
`TopKReference`: approximate, top-K logits + their ids + the log-sum-exp), each turned into
reference logits chunk by chunk inside the loss (`Reference.logits`). The `topk` tail:
dipo_scale/losses/__init__.py."""

from __future__ import annotations

import copy

import torch

from dipo_scale.losses.chunking import compute_dtype, head_matmul_dtype, linear


class LogitsReference:
    """The `online` form: reference logits [B, T, V] as they are."""

    def __init__(self, logits: torch.Tensor):
        self.tensor = logits.detach()
        self.shape = tuple(logits.shape)
        self.vocab_size = logits.shape[-1]

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.tensor,)

    def logits(self, z_ref: torch.Tensor) -> torch.Tensor:
        return z_ref

    def __getitem__(self, rows) -> "LogitsReference":
        return LogitsReference(self.tensor[rows])


class HiddenReference:
    """The `hidden` form (exact): the reference's final hidden states [B, T, H] — the input of
    its LM head — and that head's `weight` [V, H] (+ `bias` [V]). Logits of a chunk of positions
    are `hidden @ weight.T + bias`, returned in float32 at least (float64 stays float64); the
    matmul runs in `head_matmul_dtype` (float32 on the CPU, the weight's dtype on GPUs, or
    `matmul_dtype`)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 matmul_dtype: torch.dtype | None = None):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"HiddenReference: hidden must be [..., H] and weight [V, H]; got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        self.hidden, self.weight = hidden.detach(), weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.dtype = torch.promote_types(compute_dtype(hidden), compute_dtype(weight))
        self.matmul_dtype = head_matmul_dtype(hidden, weight, matmul_dtype)
        self._w = self.weight.to(self.matmul_dtype)  # cast once (if at all), not per chunk
        self._b = None if bias is None else self.bias.to(self.matmul_dtype)
        self.vocab_size = weight.shape[0]
        self.shape = (*hidden.shape[:-1], self.vocab_size)

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.hidden,)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return linear(hidden.to(self.matmul_dtype), self._w, self._b).to(self.dtype)

    def __getitem__(self, rows) -> "HiddenReference":
        ref = copy.copy(self)  # the same weight, and its cast: not cast again per selection
        ref.hidden = self.hidden[rows]
        ref.shape = (*ref.hidden.shape[:-1], self.vocab_size)
        return ref


class TopKReference:
    """The `topk` form (approximate unless K = V): top-K reference logits [B, T, K], their ids
    [B, T, K] and the log-sum-exp over the whole vocabulary [B, T]. The dense row rebuilt per
    chunk spreads the mass outside the top K uniformly (module docstring, "The `topk` tail")."""

    def __init__(self, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor,
                 vocab_size: int):
        if topk_logits.shape != topk_ids.shape or topk_logits.shape[:2] != lse.shape:
            raise ValueError(f"TopKReference: logits and ids must be [B, T, K] and lse [B, T]; got "
                             f"{tuple(topk_logits.shape)}, {tuple(topk_ids.shape)}, {tuple(lse.shape)}")
        if topk_logits.shape[-1] > vocab_size:
            raise ValueError(f"TopKReference: K={topk_logits.shape[-1]} exceeds the vocabulary ({vocab_size})")
        self.topk_logits, self.topk_ids, self.lse = topk_logits.detach(), topk_ids.detach(), lse.detach()
        self.vocab_size = int(vocab_size)
        self.shape = (*lse.shape, self.vocab_size)

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.topk_logits, self.topk_ids, self.lse)

    def logits(self, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return topk_dense_logits(topk_logits, topk_ids, lse, self.vocab_size)

    def __getitem__(self, rows) -> "TopKReference":
        return TopKReference(self.topk_logits[rows], self.topk_ids[rows], self.lse[rows], self.vocab_size)


Reference = LogitsReference | HiddenReference | TopKReference


def topk_dense_logits(topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor,
                      vocab_size: int) -> torch.Tensor:
    """[C, V] reference logits from [C, K] top-K logits, ids and [C] log-sum-exp: the stored ids
    get their logits, every other id `lse + log((1 − Σ_topk softmax) / (V − K))`."""
    dtype = compute_dtype(topk_logits)
    top, lse = topk_logits.to(dtype), lse.to(dtype)
    K = top.shape[1]
    if K == vocab_size:
        tail = torch.full_like(lse, float("-inf"))  # every id is stored; nothing is left over
    else:
        left_over = (1.0 - torch.exp(top - lse[:, None]).sum(dim=1)).clamp_min(torch.finfo(dtype).tiny)
        tail = lse + torch.log(left_over / (vocab_size - K))
    out = tail[:, None].expand(len(tail), vocab_size).clone()
    return out.scatter_(1, topk_ids.long(), top)


def as_reference(ref) -> Reference:
    """A reference argument of the losses as a `Reference`: tensors are full logits."""
    if isinstance(ref, (LogitsReference, HiddenReference, TopKReference)):
        return ref
    if isinstance(ref, torch.Tensor):
        return LogitsReference(ref)
    raise TypeError(f"reference must be logits [B, T, V] or a HiddenReference/TopKReference, got {type(ref).__name__}")


def check_reference(ref: Reference, logits: torch.Tensor) -> None:
    if tuple(ref.shape) != tuple(logits.shape):
        raise ValueError(f"reference is {tuple(ref.shape)} but the policy logits are {tuple(logits.shape)}")

