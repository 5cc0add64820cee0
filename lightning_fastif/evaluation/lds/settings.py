"""The settings and the report of the linear datamodeling score, and the no-curvature baseline solver.

Part of ``lightning_fastif.evaluation.lds`` (see its docstring for the method).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from lightning_fastif.errors import ConfigurationError, expected
from lightning_fastif.functional.solvers.base import Solver

__all__ = ["IdentitySolver", "LDSReport", "LDSSettings"]


@dataclass
class LDSSettings:
    """The LDS check of ``lightning-fastif evaluate`` (``--lds.subsets M --lds.fraction alpha``).

    Attributes:
        subsets: M, the number of random training subsets retrained (0: skip the LDS check).
        fraction: alpha, the share of the training set in each subset (0 < alpha < 1; TRAK and dattri use 0.5).
        seed: seed of the subsets, the initialisation (unless warm start) and the data order of each retraining.
        max_epochs: epochs of each retraining.
        batch_size: training batch size of the retraining (default: the datamodule's ``batch_size``, else 64).
        warm_start: start every retraining from the trained weights instead of the seeded re-initialisation
            (much less retraining noise, but it measures a local linearisation; reported as such).
        num_queries: the first this many examples of the query split are the LDS queries.
        confidence: level of the bootstrap confidence interval of the mean LDS over queries.
    """

    subsets: int = 0
    fraction: float = 0.5
    seed: int = 0
    max_epochs: int = 20
    batch_size: int | None = None
    warm_start: bool = False
    num_queries: int = 100
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.warm_start, bool):
            raise ConfigurationError(expected("lds.warm_start", "a bool (True or False)", self.warm_start))
        for name in ("subsets", "max_epochs", "num_queries", "seed"):
            value = getattr(self, name)
            low = 0 if name in ("subsets", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(expected(f"lds.{name}", f"an int >= {low}", value))
        if self.subsets == 1:
            raise ConfigurationError(
                expected("lds.subsets", "0 (off) or at least 2 (a correlation over subsets)", 1)
            )
        if not isinstance(self.fraction, (int, float)) or not 0.0 < float(self.fraction) < 1.0:
            raise ConfigurationError(
                expected("lds.fraction", "a number strictly between 0 and 1", self.fraction)
            )
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ConfigurationError(expected("lds.batch_size", "a positive int or None", self.batch_size))
        if not 0.0 < float(self.confidence) < 1.0:
            raise ConfigurationError(
                expected("lds.confidence", "a number strictly between 0 and 1", self.confidence)
            )


@dataclass
class LDSReport:
    """The LDS of an attribution: mean Spearman over queries, with a bootstrap confidence interval."""

    lds: float
    ci_low: float
    ci_high: float
    per_query: list[float]
    num_queries: int
    num_subsets: int
    fraction: float
    solver: str
    warm_start: bool
    max_epochs: int
    retrained: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    retrain_seconds: float = 0.0
    folder: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_table(self) -> str:
        start = "warm start (trained weights)" if self.warm_start else "same seeded initialisation"
        return (
            "| solver | LDS (mean Spearman) | CI | queries | subsets M | fraction | retraining |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {self.solver} | {self.lds:.4f} | [{self.ci_low:.4f}, {self.ci_high:.4f}] | {self.num_queries} | "
            f"{self.num_subsets} | {self.fraction:g} | {self.max_epochs} epochs, {start} |"
        )


class IdentitySolver(Solver):
    """No curvature: ``s_test = grad L(z_test)`` (the gradient dot product / TracIn-at-the-end baseline).

    A stand-in solver with the Solver interface (``solve(curvature, vectors) -> vectors``), so influence with it is
    ``-grad L(z) . grad L(z_test)``. ``damping`` is recorded but unused (it would only rescale every score).
    """

    name = "identity"

    def solve(self, curvature: Any, vectors: Tensor) -> Tensor:
        return vectors.clone()
