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

__all__ = [
    "CandidateSpaceReport",
    "DiagnosticsReport",
    "approximation_diagnostics",
    "compare_candidate_spaces",
]


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


# ------------------------------------------------------------------------------------------------ both spaces (issue 11)
@dataclass
class CandidateSpaceReport:
    """Recall of the full-scan top-m among the k candidates of each space, misclassified and correct queries apart.

    Attributes:
        rows: one dict per (space, k, queries) with ``space`` (``"features"``: FastIF's kNN; ``"gradients"``: the
            gradient-sketch MIPS union), ``k``, ``queries`` (``"all"``, ``"misclassified"``, ``"correct"``), ``n``
            (queries in the group) and ``recall_helpful``, ``recall_harmful``, ``recall_abs`` (means).
        top_m, num_queries, num_train, sketch: the settings (``sketch``: the gradient index's ``meta.sketch``).
    """

    rows: list[dict[str, Any]]
    top_m: int
    num_queries: int
    num_train: int
    sketch: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_table(self) -> str:
        """A Markdown table: one line per (k, queries), the two spaces side by side."""
        m = self.top_m
        head = (
            f"| k | queries | n | features: helpful / harmful / abs top-{m} | gradients: helpful / harmful / abs "
            f"top-{m} |"
        )
        lines = [head, "|---|---|---|---|---|"]
        by = {(r["space"], r["k"], r["queries"]): r for r in self.rows}
        for k in sorted({r["k"] for r in self.rows}):
            for group in ("all", "misclassified", "correct"):
                f, g = by.get(("features", k, group)), by.get(("gradients", k, group))
                if f is None or not f["n"]:
                    continue
                lines.append(f"| {k} | {group} | {f['n']} | {_cell(f)} | {_cell(g) if g else '-'} |")
        sk = self.sketch
        lines.append(
            f"\n{self.num_queries} queries, N = {self.num_train}; gradient sketch: {sk.get('method')} "
            f"({sk.get('dim')} numbers per example, seed {sk.get('seed')})"
        )
        return "\n".join(lines)


def _cell(r: dict[str, Any]) -> str:
    return f"{r['recall_helpful']:.2f} / {r['recall_harmful']:.2f} / {r['recall_abs']:.2f}"


def _space_indexes(module: Any, batch: Any) -> tuple[Any, Tensor, Any]:
    """``(feature index, query features [Q, d], gradient index)``: the module's own, the other built in memory."""
    from lightning_fastif.functional.batch import fetch
    from lightning_fastif.retrieval.build import build_index
    from lightning_fastif.retrieval.features import extract_features
    from lightning_fastif.retrieval.gradients.folder import build_gradient_index
    from lightning_fastif.retrieval.gradients.sketcher import GradientSketcher

    if module.candidates == "features":
        feature_index, feats = module.candidate_index(), module.query_features(batch)
    else:
        built = build_index(
            module.model,
            module.train_dataset,
            module.feature_layer,
            collate_fn=module.collate_fn,
            batch_size=module.score_batch_size,
        )
        feature_index = built.index
        feats = extract_features(module.model, [batch], built.meta["feature_layer"])
    if module.candidates == "gradients":
        return feature_index, feats, module.candidate_index()
    settings = dict(module.sketch or {})
    n = len(module.train_dataset)
    first = fetch(module.train_dataset, list(range(min(2, n))), module._user_collate)
    sketcher = GradientSketcher(
        module.model,
        module.loss,
        module.param_patterns,
        settings.get("method", "auto"),
        settings.get("dim", 1024),
        settings.get("seed", 0),
        settings.get("kind", "gaussian"),
        module.feature_layer,
        first,
    )
    grad_index = build_gradient_index(
        module.model,
        module.train_dataset,
        module.loss,
        sketcher=sketcher,
        batch_size=module.score_batch_size,
        collate_fn=module._user_collate,
    )
    return feature_index, feats, grad_index


def compare_candidate_spaces(
    module: Any, batch: Any, ks: Sequence[int] = (10, 100, 1000), top_m: int = 10
) -> CandidateSpaceReport:
    """Recall of the full scan's top-m among the k candidates of feature space and of gradient space, side by side.

    The module's own candidate index is used for its space; the other space's index is built in memory (gradient
    sketches with ``module.sketch`` settings, or an exact feature index). Queries the model misclassifies are
    reported apart from those it gets right (when the batch has labels and the model gives logits).

    Args:
        module: an ``InfluenceModule``.
        batch: the query batch.
        ks: candidate counts (clipped to N).
        top_m: size of the full-scan top lists.

    Example:
        >>> print(compare_candidate_spaces(im, (x_test[:20], y_test[:20]), ks=(100, 1000)).to_table())
    """
    from lightning_fastif.functional.batch import call_model, labels_of, logits_of

    n = len(module.train_dataset)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigurationError(f"Expected `ks` to be a non-empty list of positive ints, but got {ks!r}.")
    if isinstance(top_m, bool) or not isinstance(top_m, int) or not 1 <= top_m <= n:
        raise ConfigurationError(f"Expected `top_m` to be an int in [1, {n}], but got {top_m!r}.")
    batch = module._prepare(batch)
    s = module.s_test(batch)
    full = module.score(s).float().cpu()  # [Q, N]
    with torch.no_grad():
        logits = logits_of(call_model(module.model.eval(), batch))
    labels = labels_of(batch)
    wrong = (
        (logits.argmax(-1).cpu() != labels.cpu()).tolist()
        if logits is not None and labels is not None and logits.dim() == 2
        else [None] * full.shape[0]
    )
    feature_index, feats, grad_index = _space_indexes(module, batch)
    tops = {
        "helpful": full.argsort(dim=1)[:, :top_m],
        "harmful": full.argsort(dim=1, descending=True)[:, :top_m],
        "abs": full.abs().argsort(dim=1, descending=True)[:, :top_m],
    }
    rows = []
    for k in sorted({min(int(k), n) for k in ks}):
        cands = {"features": feature_index.search(feats, k)[1], "gradients": grad_index.candidates(s, k)[1]}
        for space, cand in cands.items():
            per = [
                {m: len(set(tops[m][q].tolist()) & set(cand[q].tolist())) / top_m for m in tops}
                for q in range(full.shape[0])
            ]
            for group, keep in (("all", None), ("misclassified", True), ("correct", False)):
                chosen = [p for p, w in zip(per, wrong) if keep is None or w is keep]
                row: dict[str, Any] = {"space": space, "k": k, "queries": group, "n": len(chosen)}
                for m in tops:
                    row[f"recall_{m}"] = sum(p[m] for p in chosen) / len(chosen) if chosen else float("nan")
                rows.append(row)
    return CandidateSpaceReport(rows, top_m, full.shape[0], n, dict(grad_index.meta.get("sketch", {})))
