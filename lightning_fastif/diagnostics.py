"""How much FastIF's approximations lose on the user's own model: kNN recall against a full scan.

For a sample of queries, the full-scan influence over every training example is the reference. For each k, the
recall of the full-scan top-m (most helpful, most harmful, largest |influence|) among the k nearest training
examples in feature space says how much of the true answer candidate restriction can still find (scores inside the
candidate set are exact, so this is also the overlap of the restricted top-m with the true top-m).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.regression import spearman_corrcoef
from torchmetrics.functional.retrieval import retrieval_recall

from lightning_fastif.errors import ConfigurationError

__all__ = ["DiagnosticsReport", "approximation_diagnostics"]


@dataclass
class DiagnosticsReport:
    """Mean recall of the full-scan top-m among the k nearest candidates, per k.

    Attributes:
        rows: one dict per k with ``k``, ``fraction`` (k / N), ``recall_helpful``, ``recall_harmful``,
            ``recall_abs`` (mean over queries).
        spearman_distance_abs: mean over queries of the Spearman correlation between closeness (reverse
            neighbour rank) and |influence|, over all N training examples.
        top_m, num_queries, num_train: the settings.
    """

    rows: list[dict[str, float]]
    spearman_distance_abs: float
    top_m: int
    num_queries: int
    num_train: int
    per_query: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_table(self) -> str:
        """A Markdown table of the rows."""
        head = f"| k | k/N | recall@k helpful top-{self.top_m} | harmful top-{self.top_m} | abs top-{self.top_m} |"
        lines = [head, "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r['k']} | {r['fraction']:.3f} | {r['recall_helpful']:.3f} | {r['recall_harmful']:.3f} | "
                f"{r['recall_abs']:.3f} |"
            )
        lines.append(
            f"\n{self.num_queries} queries, N = {self.num_train}; Spearman(closeness, |influence|) = "
            f"{self.spearman_distance_abs:.3f}"
        )
        return "\n".join(lines)


def _recall(closeness: Tensor, relevant: Tensor, k: int) -> float:
    target = torch.zeros_like(closeness, dtype=torch.bool)
    target[relevant] = True
    return float(retrieval_recall(closeness, target, top_k=k))


def approximation_diagnostics(
    module: Any, batch: Any, ks: Sequence[int] = (10, 100, 1000), top_m: int = 10
) -> DiagnosticsReport:
    """Measure kNN candidate recall on ``module``'s own model for the queries of ``batch``.

    Args:
        module: an ``InfluenceModule`` (its solver, selected parameters and candidate index are used).
        batch: the query batch.
        ks: candidate counts to evaluate (values above N are clipped to N).
        top_m: size of the full-scan top lists whose recall is measured.

    Returns:
        A :class:`DiagnosticsReport`.

    Example:
        >>> report = approximation_diagnostics(im, (x_test[:20], y_test[:20]), ks=(10, 100))
        >>> print(report.to_table())
    """
    n = len(module.train_dataset)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigurationError(f"Expected `ks` to be a non-empty list of positive ints, but got {ks!r}.")
    if isinstance(top_m, bool) or not isinstance(top_m, int) or not 1 <= top_m <= n:
        raise ConfigurationError(f"Expected `top_m` to be an int in [1, {n}], but got {top_m!r}.")
    batch = module._prepare(batch)
    full = module.score(module.s_test(batch)).float()  # [Q, N]
    index = module.candidate_index()
    _, ids = index.search(module.query_features(batch), n)  # every training example, nearest first
    ks = sorted({min(int(k), n) for k in ks})
    per_query = []
    for q in range(full.shape[0]):
        # closeness = n - neighbour rank (positive: torchmetrics' retrieval metrics ignore non-positive scores)
        closeness = torch.empty(n)
        closeness[ids[q]] = torch.arange(n, 0, -1, dtype=torch.float32)
        scores = full[q].cpu()
        top = {
            "helpful": scores.argsort()[:top_m],
            "harmful": scores.argsort(descending=True)[:top_m],
            "abs": scores.abs().argsort(descending=True)[:top_m],
        }
        row = {"spearman": float(spearman_corrcoef(closeness, scores.abs()))}
        for k in ks:
            for name, rel in top.items():
                row[f"recall_{name}@{k}"] = _recall(closeness, rel, k)
        per_query.append(row)
    rows = []
    for k in ks:
        rows.append(
            {
                "k": k,
                "fraction": k / n,
                **{
                    f"recall_{name}": sum(r[f"recall_{name}@{k}"] for r in per_query) / len(per_query)
                    for name in ("helpful", "harmful", "abs")
                },
            }
        )
    spear = [r["spearman"] for r in per_query if r["spearman"] == r["spearman"]]
    return DiagnosticsReport(
        rows=rows,
        spearman_distance_abs=sum(spear) / max(1, len(spear)),
        top_m=top_m,
        num_queries=len(per_query),
        num_train=n,
        per_query=per_query,
    )
