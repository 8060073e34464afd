"""Top-k, top-p and min-p as boolean keep-masks over [R, V] rows, one parameter per row.

Tie rules (deterministic, independent of the batch around a row):
- top_k keeps exactly min(k, V) tokens: every token strictly above the k-th largest value, then
  the LOWEST ids among the tokens equal to it until k are kept.
- top_p orders tokens by probability, descending, ties by lowest id (a stable sort), and keeps the
  shortest prefix whose mass reaches top_p * (row mass): a token is kept iff the mass strictly
  before it is < top_p * mass. So the token that crosses the threshold stays, one whose
  predecessors already reach it exactly does not, and of tokens tied at the cut only the
  lowest ids needed stay. top_p >= 1 keeps every token (no float round-off can drop the tail).
- min_p keeps tokens with prob >= min_p * max_prob: a threshold, so all tokens tied at it stay.
"""

from __future__ import annotations

import torch


def top_k_mask(x: torch.Tensor, k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep-mask of the k[r] largest entries of each row of x [R, V] (ties: lowest ids).

    k is a long tensor [R] on x's device; values above V keep the whole row, values below 1 are
    treated as 1. k_max, when the caller knows it from the host, is max(k) and saves a device
    sync. Costs one `topk` of size max(k) plus O(R*V) elementwise work.
    """
    rows, vocab = x.shape
    if rows == 0:
        return torch.ones_like(x, dtype=torch.bool)
    k = k.clamp(1, vocab)
    k_max = min(k_max, vocab) if k_max is not None else int(k.max().item())
    top_vals = torch.topk(x, k_max, dim=-1, sorted=True).values
    kth = top_vals.gather(1, (k - 1)[:, None])  # [R, 1]: the k-th largest value of each row
    above = x > kth
    tied = x == kth
    room = k[:, None] - above.sum(dim=-1, keepdim=True)  # how many tied tokens still fit
    return above | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= room))


def top_k_sorted(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [R, min(k, V)] of each row's k largest entries, best first, ties by lowest id.

    Rows must be free of NaN (every row then selects exactly min(k, V) entries).
    """
    rows, vocab = x.shape
    k = min(k, vocab)
    if rows == 0 or k <= 0:
        empty = torch.empty(rows, 0, device=x.device)
        return empty.to(x.dtype), empty.to(torch.long)
    keep = top_k_mask(x, torch.full((rows,), k, dtype=torch.long, device=x.device), k_max=k)
    ids = keep.nonzero()[:, 1].view(rows, k)  # row-major: ids ascending within each row
    vals = x.gather(1, ids)
    # Stable: equal values keep their (ascending) id order.
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return vals.gather(1, order), ids.gather(1, order)


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor, support: int | None = None) -> torch.Tensor:
    """Keep-mask of the nucleus of each row of probs [R, V] (need not be normalised; >= 0).

    top_p is a float tensor [R]; rows with top_p >= 1 keep everything. `support` is a promise by
    the caller that each row has at most that many nonzero entries (a top-k mask ran before): the
    sort then covers only the `support` largest entries instead of the whole vocabulary, with the
    same result for every nonzero entry (zero entries come back False).
    """
    rows, vocab = probs.shape
    if rows == 0:
        return torch.ones_like(probs, dtype=torch.bool)
    if support is not None and support < vocab:
        cand_vals, cand_ids = torch.topk(probs, support, dim=-1)  # tied entries in no promised order
        cand_ids, by_id = torch.sort(cand_ids, dim=-1)  # id order, so the stable sort breaks ties by id
        cand_vals = cand_vals.gather(1, by_id)
    else:
        cand_vals, cand_ids = probs, None
    sorted_probs, order = torch.sort(cand_vals, dim=-1, descending=True, stable=True)
    # Exclusive prefix sum by shifting (cumsum - self would add round-off to the boundary test).
    cumsum = torch.cumsum(sorted_probs, dim=-1)
    mass_before = torch.cat([torch.zeros_like(cumsum[:, :1]), cumsum[:, :-1]], dim=-1)
    total = cumsum[:, -1:]
    p = top_p.to(probs.dtype)[:, None]
    keep_sorted = (mass_before < p * total) | (p >= 1.0)
    keep_sorted[:, 0] = True  # the most probable token always stays, even for a tiny top_p
    if cand_ids is None:
        return torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    keep = torch.zeros(rows, vocab, dtype=torch.bool, device=probs.device)
    return keep.scatter_(1, cand_ids.gather(1, order), keep_sorted & (sorted_probs > 0))


def min_p_mask(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep-mask of tokens with prob >= min_p[r] * max prob of the row (min_p 0 keeps all)."""
    threshold = min_p.to(probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
    return probs >= threshold
