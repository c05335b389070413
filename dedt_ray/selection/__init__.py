"""Class-wise coreset selection on embeddings (pure numpy/scipy/faiss; no Ray).

`score(embeddings, labels, criterion)` gives every row a score within its class (higher is
kept first); `select(embeddings, labels, criterion, keep_ratio)` keeps
max(1, round(keep_ratio * n_c)) rows of every class. Both are built on the per-class
`score_class` and `keep_mask_class`, which a distributed stage can run per class group.
"""

from dedt_ray.selection.core import class_groups, class_seed, score, score_with_notes, select
from dedt_ray.selection.criteria import CRITERIA, keep_mask_class, n_keep_for, score_class

__all__ = [
    "CRITERIA",
    "class_groups",
    "class_seed",
    "keep_mask_class",
    "n_keep_for",
    "score",
    "score_class",
    "score_with_notes",
    "select",
]
