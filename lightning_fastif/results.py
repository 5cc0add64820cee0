"""The record of one explained query: what ``InfluenceModule.predict_step`` returns and every writer consumes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class InfluenceResult:
    """Ranked helpful and harmful training examples of one query.

    Scores follow the library's sign convention: ``I(z, z_test) = -grad L(z) . s_test``; positive = harmful
    (up-weighting z raises the test loss), negative = helpful. Helpful ids come most negative first, harmful ids most
    positive first. Ids are positions in the training dataset; ``query_id`` is the position of the query in its own
    dataset.

    Attributes:
        query_id: position of the query in the query dataset.
        label: the query's label as the batch holds it: an int class, a float target, a list for a vector target
            (``None`` when the batch has none).
        prediction: the model's predicted class (an int) for a classification loss; the model's output (a float
            or a list of floats) for a regression loss; ``None`` when neither applies.
        helpful_ids / helpful_scores: the most helpful training ids and their influence, most negative first.
        harmful_ids / harmful_scores: the most harmful training ids and their influence, most positive first.
        num_candidates: how many training examples were scored for this query.
        query_loss: the query's loss under the model.
        helpful_distances / harmful_distances: kNN feature distances of the listed ids (empty for a full scan).
        extra: free-form JSON-serialisable details (timings, solver diagnostics...).
        group: for a group query (the mean loss of several queries), the members' query ids; ``None`` otherwise.
        loss: the per-example loss the influence is of, in words (``"CrossEntropyLoss(label_smoothing=0.1) from
            model.criterion"``, ``"cross-entropy on the logits (the default: the model stores no loss module)"``, ``"loss_fn (...)"``).
        flags: warnings about this query, each ``"<kind>: <explanation>"``; e.g. ``"saturated_query: loss 0,
            gradient 0, every score is 0"``. Empty when nothing is wrong.
        helpful_labels / harmful_labels: the labels of the listed training examples (filled by ``InfluenceWriter``
            from the training set; ``None`` when not looked up or the examples carry none).
        query_split: the dataset the query comes from (``"test"``...), when known (the CLI's ``queries.split``).
        top_tokens: per-token influence of the listed examples (``InfluenceModule(top_tokens=k)``): training id (as a
            string) -> up to k ``(position, token id, score)``, the most negative tokens of a helpful example and the
            most positive of a harmful one; ``None`` when not asked for.
    """

    query_id: int
    label: int | float | list[Any] | None
    prediction: int | float | list[Any] | None
    helpful_ids: list[int]
    helpful_scores: list[float]
    harmful_ids: list[int]
    harmful_scores: list[float]
    num_candidates: int
    query_loss: float | None = None
    helpful_distances: list[float] = field(default_factory=list)
    harmful_distances: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    group: list[int] | None = None
    loss: str = ""
    flags: list[str] = field(default_factory=list)
    helpful_labels: list[Any] | None = None
    harmful_labels: list[Any] | None = None
    query_split: str | None = None
    top_tokens: dict[str, list[tuple[int, int, float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (ints, floats, strings, lists, dicts, None); non-finite floats become None."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InfluenceResult:
        """Inverse of :meth:`to_dict` (``None`` scores stay ``None``)."""
        from dataclasses import MISSING, fields

        from lightning_fastif.errors import RecordFormatError

        if not isinstance(data, dict):
            raise RecordFormatError(
                f"Expected `data` to be a dict (an InfluenceResult's to_dict()), but got {type(data).__name__}."
            )
        required = [
            f.name
            for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise RecordFormatError(
                f"Expected `data` to hold every required key of an InfluenceResult ({', '.join(required)}), but "
                f"got a dict without {', '.join(missing)} (its keys: {', '.join(map(str, data)) or 'none'})."
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # tensors and numpy scalars/arrays
        return _plain(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)
