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
) -> torch.Tensor:
    """user_emb, item_emb [B, d]; advertiser_ids, weights [B] -> scalar (module docstring)."""
    B = item_emb.shape[0]
    same = advertiser_ids[:, None] == advertiser_ids[None, :]                      # S [B, B]
    adv_emb = F.normalize(same.to(item_emb.dtype) @ item_emb, dim=1)  # normalising the sum == the mean
    cols = torch.arange(B, device=item_emb.device)
    target = torch.where(same, cols[None, :], B).amin(dim=1)     # the first row of each row's advertiser
    first = target == cols                                        # row j is its advertiser's first row
    logits = (user_emb @ adv_emb.T / temperature).masked_fill(~first[None, :], float("-inf"))  # [B, B]
    ce = F.cross_entropy(logits, target, reduction="none")
    return (weights * ce).sum() / B
