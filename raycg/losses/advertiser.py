"""Advertiser-level softmax: which advertiser does the user convert with?

Design. A conversion on one item is a very noisy label for that item (conversions are rare, so
an item's conversion count is a handful of events: high variance), and in the item-level
softmax the other items of the SAME advertiser are negatives, although the user would plausibly
have converted on them too. Aggregating to the advertiser gives a denser, lower-variance target,
and scoring against advertisers instead of items removes same-advertiser negatives entirely.

For a batch of B rows with item embeddings v_i and advertiser ids a_i, over the K unique
advertisers of the batch:

    e_k        = normalize( mean{ v_j : a_j = k } )                      [K, d]   (all rows)
    logits[i]  = <u_i, e_k> / T  for k = 1..K                            [B, K]
    loss       = (1/B) * sum_i w_i * CE(logits[i], target = a_i)

Rows with w_i = 0 (non-conversions) contribute nothing but still represent their advertiser in
e_k. Two rows of the same advertiser never act as negatives for each other: there is a single
column per advertiser. Normalisation is by B (not by the number of conversion rows) so that, like
the item softmax, the loss is an unbiased per-example average whose scale does not jump with the
number of conversions in a batch (a batch with a single conversion would otherwise give that one
noisy label the weight of a whole batch).

Fixed shapes. The K unique advertisers are not extracted (`torch.unique` has a data-dependent
output shape and reads the batch back to the host). Instead, with S[i, j] = (a_i == a_j) [B, B],
row j carries its advertiser's summed embedding (S @ v)_j, and only the FIRST row of each
advertiser stays a column (the others are masked to -inf): the same K logits per row, the same
loss, no host synchronisation.

Blocks (`block_rows` = n, loss.advertiser_block_rows). The candidates are the advertisers of
the rows the softmax sees, so their number grows with the batch. Under DDP each worker computes
this loss on its own rows: W workers of b rows each score against the advertisers of b rows, one
worker of W*b rows against those of W*b (10x simulator, 20,000 advertisers: 8,192 consecutive
training rows hold ~5,260 advertisers, 4,096 rows ~3,140). With n set, the rows are cut into
consecutive blocks of n (the last one shorter when n does not divide B), each block is its own
softmax over its own advertisers, and the loss stays (1/B) sum_i w_i CE_i. So one worker with
n = b computes this term exactly as W workers of b rows do (tests/test_cross_worker.py), and
with n dividing every worker's batch the objective no longer depends on the worker count.
n >= B (or None) is the single softmax above.

Example (T=1): u = [[1,0]], v = [[1,0]], a = [7], w = [1] -> one advertiser, loss = 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def advertiser_softmax_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    advertiser_ids: torch.Tensor,
    weights: torch.Tensor,
    temperature: torch.Tensor | float,
    block_rows: int | None = None,
) -> torch.Tensor:
    """user_emb, item_emb [B, d]; advertiser_ids, weights [B] -> scalar (module docstring).
    `block_rows`: a softmax per block of that many consecutive rows (None: one over all B)."""
    B = item_emb.shape[0]
    if block_rows is not None and block_rows <= 0:
        raise ValueError(f"loss.advertiser_block_rows must be > 0 or null, got {block_rows}")
    n = B if block_rows is None or block_rows >= B else int(block_rows)
    full = B - B % n
    total = _blocks_weighted_ce(user_emb[:full], item_emb[:full], advertiser_ids[:full], weights[:full],
                                temperature, n)
    if full < B:  # the shorter last block: its own softmax (static shapes: B and n fix both parts)
        total = total + _blocks_weighted_ce(user_emb[full:], item_emb[full:], advertiser_ids[full:],
                                            weights[full:], temperature, B - full)
    return total / B


def _blocks_weighted_ce(u, v, adv, w, temperature, n: int) -> torch.Tensor:
    """sum_i w_i CE_i over G = len/n blocks of n rows, each block its own advertiser softmax."""
    G = u.shape[0] // n
    u, v, adv = u.reshape(G, n, -1), v.reshape(G, n, -1), adv.reshape(G, n)
    same = adv[:, :, None] == adv[:, None, :]                                   # S [G, n, n]
    adv_emb = F.normalize(same.to(v.dtype) @ v, dim=-1)    # normalising the sum == the mean
    cols = torch.arange(n, device=v.device)
    target = torch.where(same, cols, n).amin(dim=-1)        # [G, n] the first row of each row's advertiser
    first = target == cols                                  # row j is its advertiser's first row in its block
    logits = (u @ adv_emb.transpose(1, 2) / temperature).masked_fill(~first[:, None, :], float("-inf"))
    ce = F.cross_entropy(logits.reshape(G * n, n), target.reshape(G * n), reduction="none")
    return (w * ce).sum()
