"""The statistics of the `topk` reference cache, computed from the reference's logits on the
CPU: the K largest logits of each row, their ids and the row's log-sum-exp (`topk_statistics`),
by introselect or, where it pays, a grouped top-K (`topk_group`; docs/benchmarks.md). Written
by the precompute (dipo_scale/reference/precompute.py), read by the losses as `TopKReference`."""

from __future__ import annotations

import torch

from dipo_scale.losses.chunking import compute_dtype


TOPK_CHUNK_ELEMENTS = 1 << 16  # logits per CPU top-K chunk: it and its scratch stay in cache (256 KiB float32)


TOPK_BLOCK_ELEMENTS = 1 << 22  # logits per block of the grouped CPU top-K (bounds its temporaries)


def topk_group(vocab_size: int, k: int) -> int:
    """The group size of the grouped CPU top-K for this vocabulary (64), or 0 for numpy's
    introselect over whole rows: grouping pays where the K groups keep at most a quarter of a row
    (torch reduces groups of 64 fast; groups of 8 at V = 1024 were as fast as introselect with two
    threads, slower with one). `benchmarks/topk_statistics.py` measures each."""
    return 64 if vocab_size % 64 == 0 and vocab_size // 64 >= 4 * k else 0


def topk_statistics(logits: torch.Tensor, k: int, group: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-K logits in descending order, their ids, log-sum-exp) of logits [..., V]: what the
    `topk` cache stores. Logits and log-sum-exp are computed in float32 at least.

    On the CPU without grad, the top K (the values of `torch.topk`; which of tied values is kept
    may differ) come from one of two exact selections (`group`: the size of the groups, 0 for
    the first; unset, `topk_group` picks):
    * numpy's introselect over whole rows, one cache-sized chunk of rows at a time, the K then
      sorted (one thread; torch's CPU top-k is ~2x slower on whole rows);
    * grouped, all in torch ops (its threads): the maxima of groups of `group` consecutive
      logits, the K groups with the largest maxima, then the top K of their K x group logits.
      Exact: each of the K largest logits lies in a group whose maximum is at least that logit;
      were that group not among the K kept, their K maxima would be K other logits at least as
      large. 1.7-3.5x faster than introselect at V = 32k-128k (one thread or two), and unlike it
      uses every thread torch has.
    Then the log-sum-exp from the row's max (the first of the top K), in cache-sized chunks of a
    reused scratch buffer. Elsewhere `torch.topk` and `torch.logsumexp`."""
    z = logits.to(compute_dtype(logits))
    if z.device.type != "cpu" or z.requires_grad or not 0 < k < z.shape[-1]:
        top = z.topk(k, dim=-1)
        return top.values, top.indices, torch.logsumexp(z, dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    group = topk_group(flat.shape[1], k) if group is None else group
    if group and (flat.shape[1] % group or flat.shape[1] // group < k):
        raise ValueError(f"topk_statistics: group={group} must divide the vocabulary ({flat.shape[1]}) into "
                         f"at least k={k} groups")
    values, ids = _grouped_topk(flat, k, group) if group else _introselect_topk(flat, k)
    sums = torch.empty(len(flat), dtype=z.dtype)
    step = max(1, TOPK_CHUNK_ELEMENTS // flat.shape[1])
    scratch = torch.empty(min(step, len(flat)), flat.shape[1], dtype=z.dtype)
    for s in range(0, len(flat), step):
        e = scratch[:len(flat[s:s + step])]
        torch.sub(flat[s:s + step], values[s:s + step, :1], out=e)
        torch.sum(e.exp_(), dim=-1, out=sums[s:s + step])
    lse = values[:, 0] + sums.log()
    shape = (*z.shape[:-1], k)
    return values.reshape(shape), ids.reshape(shape), lse.reshape(z.shape[:-1])


def _introselect_topk(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    a, n = flat.numpy(), flat.shape[0]
    step = max(1, TOPK_CHUNK_ELEMENTS // a.shape[1])
    values, ids = np.empty((n, k), dtype=a.dtype), np.empty((n, k), dtype=np.int64)
    for s in range(0, n, step):
        rows = a[s:s + step]
        part = np.argpartition(rows, -k, axis=-1)[:, -k:]
        part_values = np.take_along_axis(rows, part, axis=-1)
        order = np.argsort(-part_values, axis=-1, kind="stable")
        values[s:s + step] = np.take_along_axis(part_values, order, axis=-1)
        ids[s:s + step] = np.take_along_axis(part, order, axis=-1)
    return torch.from_numpy(values), torch.from_numpy(ids)


def _grouped_topk(flat: torch.Tensor, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, vocab = flat.shape
    values, ids = torch.empty(n, k, dtype=flat.dtype), torch.empty(n, k, dtype=torch.long)
    offsets = torch.arange(group)
    rows = max(1, TOPK_BLOCK_ELEMENTS // vocab)
    for s in range(0, n, rows):
        x = flat[s:s + rows]
        maxima = x.view(len(x), vocab // group, group).amax(dim=-1)
        kept = maxima.topk(k, dim=-1, sorted=False).indices
        members = (kept.unsqueeze(-1) * group + offsets).view(len(x), k * group)
        top = x.gather(1, members).topk(k, dim=-1)
        values[s:s + rows], ids[s:s + rows] = top.values, members.gather(1, top.indices)
    return values, ids

