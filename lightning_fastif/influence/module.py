"""``InfluenceModule``: wraps any LightningModule (or ``nn.Module``) and explains its predictions.

The wrapped model is used as is and never mutated: its weights are read, and substituted functionally by
``torch.func.functional_call``. All influence computations run with the model in ``eval()`` mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.dataloader import default_collate

from lightning_fastif._runtime import StageProgress, eval_mode, synchronize
from lightning_fastif.errors import ConfigurationError, check_keywords
from lightning_fastif.functional.batch import (
    batch_digest,
    example_digests,
    fetch,
    labels_of,
    move_to,
    slice_batch,
)
from lightning_fastif.functional.batch import batch_size as _batch_size
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.grads import per_example_grads_and_losses, randomness_error
from lightning_fastif.functional.losses import check_finite, resolve_loss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.functional.scores import merge_topk, score_batch, split_topk
from lightning_fastif.functional.sequence import full_precision
from lightning_fastif.functional.solvers.base import Solver
from lightning_fastif.influence.candidates import resolve_candidate_index
from lightning_fastif.influence.checks import (
    check_arguments,
    check_query_ids,
    check_train_indices,
    check_training_finite,
    model_call_error,
)
from lightning_fastif.influence.head import head_fast_path, head_fast_scores, train_labels
from lightning_fastif.influence.predict import assemble_results, batch_query_ids, predictions
from lightning_fastif.influence.tokens import (
    attach_top_tokens,
    check_top_tokens,
    per_token_influence,
    require_token_losses,
)
from lightning_fastif.influence.trust import curvature_state, trusted
from lightning_fastif.results import InfluenceResult
from lightning_fastif.retrieval.features import check_pooling
from lightning_fastif.threads import guard_oversubscription

__all__ = ["InfluenceModule"]


class InfluenceModule(pl.LightningModule):
    """Explain a model's predictions by the training examples that most helped and most hurt them.

    Args:
        model: a LightningModule or plain ``nn.Module``, used as is (never mutated).
        train_dataset: map-style dataset; position i is training example id i.
        loss_fn: ``callable(outputs, batch) -> [B]`` per-example losses; default: the module's
            ``per_example_loss(batch)``, else cross-entropy on ``(x, y)`` / ``{"labels": ...}`` batches; logits
            ``[B, T, V]`` with labels ``[B, T]`` get the per-sequence token cross-entropy (-100 ignored, mean over
            the sequence's tokens), shifted for a Hugging Face ``*ForCausalLM``
            (:class:`~lightning_fastif.SequenceCrossEntropy`; pass one for ``reduction="sum"``). Every model call of
            influence runs with key/value caches off, attention on the math SDPA kernel, and float32 copies of a
            bf16/fp16 model's weights (each stated once in the log).
        params: glob patterns of parameter names to differentiate (default: all with ``requires_grad``).
        solver: ``"auto"`` / an ``AutoSolver`` (the default: Exact when the dense system fits in memory, else EK-FAC, else CG on
            Gauss-Newton, with ``damping="auto"``), ``ExactSolver``, ``CGSolver``, ``LiSSASolver``, ``EKFACSolver``...
        num_candidates: k of FastIF's kNN step; ``None`` scores the whole training set.
        top_k: helpful and harmful examples kept per query.
        index: a built candidate index or the folder it was saved in (needed when ``num_candidates`` is set).
        feature_layer: module whose input is the indexed feature (default: the last ``nn.Linear``).
        batch_size: batch size of scoring and of full passes over the training set.
        collate_fn: collate function for training examples (default: torch's ``default_collate``).
        score_method: ``"auto"`` (the head fast path when it applies, else forward-mode jvp in blocks of 64
            queries), ``"jvp"``, ``"grad"`` (per-example gradients times s_test) or ``"head"``.
        progress: show progress bars (tqdm, rank 0) over solver iterations and full passes that last over 2 s.
        forward_fn: ``callable(model, batch) -> outputs``: how the model is called on a batch, used by every path
            (losses, feature extraction and the index, predictions). Default: ``model(x)`` for ``(x, y, ...)``
            batches, ``model(**inputs)`` for dict batches (every key but ``labels``). Needed for a ``forward`` that
            takes more than ``batch[0]``, e.g. ``forward_fn=lambda model, batch: model(batch[0], batch[1])``.
            The loss: ``loss_fn`` if given, else the module's ``per_example_loss(batch)``, else a loss module
            stored on the model (``self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)``, ``nn.MSELoss()``
            ...), used with ``reduction="none"`` and its own settings, else plain cross-entropy.
            ``im.loss.description`` says which; it is logged when predict starts and recorded in every result.
        candidates: ``"features"`` (FastIF: the k nearest training examples in feature space) or ``"gradients"``
            (the k/2 largest and k/2 most negative inner products of gradient sketches with the projected s_test;
            ``index`` is then a gradient index or its folder, see ``retrieval.gradient_index``). Either way the
            candidates are scored exactly.
        sketch: settings of a gradient index built in memory (``method``, ``dim``, ``seed``, ``kind``, ``float16``,
            ``factory``, ``backend``, ``nprobe``, ``ef_search``).
        curvature: the curvature C every solver inverts: ``"hessian"``, ``"gauss_newton"`` (``J^T H_out J`` through
            the model's outputs: positive semi-definite for cross-entropy, MSE and other convex losses of the outputs;
            needs a loss that is a function of the outputs, not a ``per_example_loss`` method), or None (default):
            the Hessian for an explicit ``ExactSolver``/``CGSolver``/``LiSSASolver``, the auto solver's choice.
        top_tokens: per-token influence in the results: the k tokens of each listed helpful/harmful training sequence
            that contribute most (``InfluenceResult.top_tokens``); 0 (default) = off. Needs a loss exposing
            ``token_losses(outputs, batch) -> [B, T]`` (see :meth:`influence` with ``per_token=True``).
        feature_pooling: how the kNN step turns a sequence feature ``[B, T, d]`` into one row: ``"mean"`` over
            unmasked positions, ``"last"`` unmasked position (a causal LM) or ``"flatten"``. Default: the index
            folder's (``FeatureIndexCallback(feature_pooling=...)``), ``"mean"`` for an index built in memory.

    Example:
        >>> import lightning_fastif as lf
        >>> im = lf.InfluenceModule(model, train_ds, solver=lf.ExactSolver(damping=1e-3), num_candidates=None)
        >>> scores = im.influence(test_batch)            # [B, N]
    """

    skip_query_ids: frozenset[int] = frozenset()
    """Query ids ``predict_step`` leaves out (set by ``InfluenceWriter`` when it resumes a run)."""
    dataset_argument: str = "train_dataset"
    """The argument the candidate ids are positions in, for error messages (``"pool"`` for a pool module)."""
    skip_query_digests: dict[int, str] = {}  # noqa: RUF012 - replaced, never mutated
    """Query id -> ``batch_digest`` of the query (input and label) its kept record was made from: a skipped id whose
    query now differs is computed again (set by ``InfluenceWriter`` with ``skip_query_ids``)."""

    @check_keywords
    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        params: Sequence[str] | None = None,
        solver: Solver | str | None = None,
        num_candidates: int | None = 1000,
        top_k: int = 10,
        index: Any = None,
        feature_layer: str | None = None,
        *,
        batch_size: int = 256,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        score_method: str = "auto",
        progress: bool = True,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        candidates: str = "features",
        sketch: dict[str, Any] | None = None,
        curvature: str | None = None,
        top_tokens: int = 0,
        feature_pooling: str | None = None,
    ) -> None:
        super().__init__()
        solver, self.sketch = check_arguments(
            model,
            train_dataset,
            solver,
            num_candidates,
            top_k,
            batch_size,
            candidates,
            score_method,
            sketch,
            curvature,
            params=params,
            collate_fn=collate_fn,
            progress=progress,
        )
        guard_oversubscription()  # a Python user gets the CLI's thread choice on a busy machine, and is told
        self.curvature_mode = curvature
        self.candidates = candidates
        self.model = model
        self.train_dataset = train_dataset
        self.loss = resolve_loss(model, loss_fn, forward_fn)
        self.forward_fn = self.loss.forward_fn
        self.top_tokens = check_top_tokens(top_tokens, self.loss)
        self.feature_pooling = None if feature_pooling is None else check_pooling(feature_pooling)
        self._feature_pooling = self.feature_pooling or "mean"  # set from the index when it is resolved
        self.param_patterns = list(params) if params is not None else None
        select_params(model, self.param_patterns)  # fail now on a pattern that matches nothing
        self.solver = solver
        self.num_candidates = num_candidates
        self.top_k = top_k
        self.index = index
        self.feature_layer = feature_layer
        self.score_batch_size = batch_size
        self._user_collate = collate_fn
        self.collate_fn = collate_fn or default_collate
        self.score_method = score_method
        self.timings: dict[str, float] = {}
        self.progress = bool(progress)
        self._progress = StageProgress()
        self._candidates: Any = None  # the resolved candidate index (lazy)
        self._cache: dict[str, Tensor] | None = (
            None  # features and logits of the training set, from the index
        )
        self._train_labels: Tensor | None = None
        self._feature_layer_name: str | None = None
        self._query_offsets: dict[int, int] = {}
        self._trust_state: dict[str, Any] | None = (
            None  # model and data fingerprints of the running public call
        )
        self._trust_last: tuple[str, dict[str, Any]] | None = None  # ...and of the last one (influence.trust)

    # ---------------------------------------------------------------------------------------- plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def _theta(self) -> tuple[Tensor, ParamSpec]:
        """The selected parameters as one flat vector ``[P]`` (float32 for a bf16/fp16 model) and their spec."""
        self._state_notes()
        params = select_params(self.model, self.param_patterns)
        spec = ParamSpec.of(params)
        theta = spec.flatten(params).detach()
        if self.loss.compute_dtype is not None and theta.dtype != self.loss.compute_dtype:
            theta = theta.to(self.loss.compute_dtype)  # a copy: the model keeps its own weights
        return theta, spec

    def _state_notes(self) -> None:
        """Log, once, what influence does to the model's call (caches off, math attention, float32 math)."""
        if not getattr(self, "_notes_stated", False):
            self._notes_stated = True
            for note in self.loss.notes:
                rank_zero_info(f"lightning_fastif: {note}")

    def _param_dtype(self) -> torch.dtype:
        if self.loss.compute_dtype is not None:
            return self.loss.compute_dtype
        return next(iter(select_params(self.model, self.param_patterns).values())).dtype

    def _param_device(self) -> torch.device:
        return next(iter(select_params(self.model, self.param_patterns).values())).device

    def _prepare(self, batch: Any) -> Any:
        return move_to(batch, self._param_device(), self._param_dtype())

    def _collectives(self) -> tuple[int, int, Callable[[Tensor], Tensor] | None]:
        """``(rank, world size, all-reduce-sum)`` for the influence math, from ``trainer.strategy``.

        An :class:`~lightning_fastif.InfluenceStrategy` splitting candidates gives its real rank and world; with
        one process, another strategy, or ``shard="queries"`` (each rank explains its own queries) this is
        ``(0, 1, None)``: one-process math, no collective.
        """
        trainer = self._trainer
        strategy = getattr(trainer, "strategy", None) if trainer is not None else None
        collectives = getattr(strategy, "influence_collectives", None)
        if callable(collectives):
            return collectives()
        return 0, 1, None

    def curvature(self, theta: Tensor | None = None, spec: ParamSpec | None = None) -> TrainingCurvature:
        """The :class:`TrainingCurvature` of the training set at the model's current weights."""
        if theta is None or spec is None:
            theta, spec = self._theta()
        rank, world, all_reduce = self._collectives()
        return TrainingCurvature(
            self.loss,
            theta,
            spec,
            self.train_dataset,
            batch_size=self.score_batch_size,
            collate_fn=self.collate_fn,
            rank=rank,
            world_size=world,
            all_reduce=all_reduce,
            progress=self._progress if self.progress and self.global_rank == 0 else None,
            mode=self.curvature_mode or "auto",
            state=curvature_state(self),
        )

    def _timed(self, stage: str, start: float) -> None:
        synchronize(self.model)  # on CUDA: count the stage's kernels, not only their launch
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    # ---------------------------------------------------------------------------------------- public math
    def query_grads(self, batch: Any) -> Tensor:
        """Per-example gradients ``[B, P]`` of the query losses (after checking the losses are finite)."""
        batch = self._prepare(batch)
        theta, spec = self._theta()
        with eval_mode(self.model):
            with torch.no_grad():  # one plain call first: labels are checked here (not inside vmap)
                try:
                    self.loss(spec.unflatten(theta), batch)
                except RuntimeError as err:  # the query inputs do not fit the model (wrong width...)
                    clear = model_call_error(self, err, batch, "the query `batch`")
                    if clear is None:
                        raise
                    raise clear from err
            grads, losses = per_example_grads_and_losses(self.loss, theta, spec, batch)
        check_finite(losses.detach(), "query loss")
        check_finite(grads, "query gradient")
        zero = (grads == 0).all(dim=1)
        if bool(zero.all()) and bool((losses.detach().abs() > 0).any()):
            raise ConfigurationError(
                f"Expected the query loss ({self.loss.description}) to depend on the selected parameters `params` = "
                f"{self.param_patterns or 'all with requires_grad'}, but its gradient is exactly 0 for every query "
                "while the loss is not: the output the loss reads does not pass through them (a `forward` returning "
                "several tensors?). Pass `forward_fn` / `loss_fn` that read the logits, or select other `params`."
            )
        return grads

    @trusted
    def s_test(self, batch: Any) -> Tensor:
        """``s_test = (H + damping I)^{-1} grad L(z_test)`` for each query example: ``[B, P]``.

        Example:
            >>> s = im.s_test((x_test[:4], y_test[:4]))   # [4, P]
        """
        if _batch_size(batch) == 0:
            raise ConfigurationError(
                "Expected `batch` to hold at least one query example, but got an empty batch."
            )
        start = time.perf_counter()
        grads = self.query_grads(batch)
        theta, spec = self._theta()
        from lightning_fastif.errors import NonFiniteError, SolverDivergenceError

        try:
            with eval_mode(self.model):
                s = self.solver.solve(self.curvature(theta, spec), grads)
            check_finite(s, "s_test (the solver's solution)")
        except (NonFiniteError, SolverDivergenceError, torch.linalg.LinAlgError):
            # the query gradients were finite: a non-finite training example is the usual cause; name it
            self._check_training_finite(theta, spec)
            raise
        except RuntimeError as err:
            if randomness_error(err) is not None:
                raise randomness_error(err) from err  # type: ignore[misc]
            raise
        except ConfigurationError as err:
            if "`labels`" not in str(
                err
            ):  # the query's labels were checked already: a training example's are bad
                raise
            self._check_training_finite(theta, spec)
            raise
        self._timed("s_test", start)
        return s

    def _check_training_finite(self, theta: Tensor, spec: ParamSpec) -> None:
        """Raise an error naming the training ids whose loss is NaN or inf (:class:`NonFiniteError`) or whose labels
        do not fit the loss (:class:`ConfigurationError`): one forward pass, on the error path only."""
        check_training_finite(self, theta, spec)

    def candidate_loader(self, train_indices: Sequence[int] | Tensor) -> DataLoader:
        """The training examples ``train_indices`` in order, in batches (a ``Subset`` + ``DataLoader``)."""
        ids = train_indices.tolist() if isinstance(train_indices, Tensor) else list(train_indices)
        return DataLoader(
            Subset(self.train_dataset, ids), batch_size=self.score_batch_size, collate_fn=self.collate_fn
        )

    @trusted
    def score(self, s_test: Tensor, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Influence ``[Q, n]`` of the training examples ``train_indices`` (all N if None) on each s_test row."""
        n = len(self.train_dataset)  # type: ignore[arg-type]
        ids = torch.arange(n) if train_indices is None else check_train_indices(train_indices, n)
        start = time.perf_counter()
        theta, spec = self._theta()
        s_test = s_test.to(device=theta.device, dtype=theta.dtype)
        head = self._head_fast_path(spec)
        if head is not None:  # cached features and logits: no forward pass at all
            out = self._head_scores(head, spec, s_test, ids)
            check_finite(out.T, "influence score (a training example's cached feature or logits)", ids)
            self._timed("scoring", start)
            return out
        method = "jvp" if self.score_method == "head" else self.score_method
        out = s_test.new_empty(s_test.shape[0], ids.numel())  # the only thing that grows with N: the scores
        with eval_mode(self.model):
            for at in range(0, ids.numel(), self.score_batch_size):
                chunk = ids[at : at + self.score_batch_size].tolist()
                batch = self._prepare(fetch(self.train_dataset, chunk, self._user_collate))
                try:
                    out[:, at : at + len(chunk)] = score_batch(
                        self.loss, theta, spec, batch, s_test, method
                    ).T
                except (RuntimeError, IndexError) as err:
                    # name the examples (bad labels, inputs of the wrong shape) or the model (random forward)
                    if randomness_error(err) is not None:
                        raise randomness_error(err) from err  # type: ignore[misc]
                    clear = model_call_error(
                        self, err, batch, f"the `{self.dataset_argument}` examples", chunk
                    )
                    if clear is None:
                        raise
                    raise clear from err
        check_finite(out.T, "influence score (a training example's loss or gradient)", ids)
        self._timed("scoring", start)
        return out

    def _head_fast_path(self, spec: ParamSpec) -> tuple[str, str | None] | None:
        """``(weight name, bias name)`` when scores can come from cached features and logits (DESIGN section 2):
        the selected parameters are exactly the indexed ``Linear`` head, the loss is the default cross-entropy,
        the model computes in float32 like the cache, and ``score_method`` is ``"auto"`` or ``"head"``."""
        return head_fast_path(self, spec)

    def _labels(self, ids: Tensor) -> Tensor:
        return train_labels(self, ids)

    def _head_scores(
        self, head: tuple[str, str | None], spec: ParamSpec, s_test: Tensor, ids: Tensor
    ) -> Tensor:
        return head_fast_scores(self, head, spec, s_test, ids)

    @trusted
    def influence(
        self, batch: Any, train_indices: Sequence[int] | Tensor | None = None, per_token: bool = False
    ) -> Tensor:
        """``I(z_i, z_test) = -grad L(z_i) . s_test(z_test)`` for the given training ids (all N if None): ``[B, n]``.

        Positive = harmful (up-weighting the training example raises the test loss), negative = helpful.
        With ``per_token=True``: ``[B, n, T]``, the contribution ``-grad L_t(z_i) . s_test`` of each token t of each
        training sequence, adding up over T to the sequence's score (needs a loss exposing ``token_losses``; see
        :mod:`lightning_fastif.functional.tokens`); sequences shorter than T are padded with 0.
        """
        if not isinstance(per_token, bool):
            raise ConfigurationError(f"Expected `per_token` to be a bool, but got {per_token!r}.")
        if per_token:
            require_token_losses(self)  # before the solve: a loss without token losses fails at once
            return per_token_influence(self, self.s_test(batch), train_indices)  # type: ignore[return-value]
        return self.score(self.s_test(batch), train_indices)

    # ---------------------------------------------------------------------------------------- candidates
    @trusted
    def candidate_index(self) -> Any:
        """The kNN index (loaded from ``index``, or built in memory from the training set when none was given)."""
        if self._candidates is not None:
            return self._candidates
        return resolve_candidate_index(self)

    @trusted
    def query_features(self, batch: Any) -> Tensor:
        """Penultimate features ``[B, d]`` of a query batch (the input of the indexed feature layer)."""
        from lightning_fastif.retrieval.features import extract_features

        self.candidate_index()
        return extract_features(
            self.model,
            [batch],
            self._feature_layer_name,
            forward_fn=self.forward_fn,
            pooling=self._feature_pooling,  # as the index's features were pooled
        )

    @trusted
    def search(self, batch: Any, s_test: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(distances [B, k], training ids [B, k])`` of the ``num_candidates`` nearest training examples.

        With ``candidates="gradients"``: ``(approximate g . s_test [B, k], ids [B, k])`` of the k/2 largest and
        k/2 most negative sketch inner products (``s_test`` computed from ``batch`` when not given).
        """
        start = time.perf_counter()
        index = self.candidate_index()
        if self.candidates == "gradients":
            s_test = self.s_test(batch) if s_test is None else s_test
            start = time.perf_counter()
            out = index.candidates(s_test, self.num_candidates)
            self._timed("search", start)
            return out
        out = index.search(self.query_features(batch), self.num_candidates)
        self._timed("search", start)
        return out

    # ---------------------------------------------------------------------------------------- ranking
    def _shard(self, ids: Tensor) -> Tensor:
        rank, world, _ = self._collectives()
        return ids[rank::world] if world > 1 else ids

    def _merge(self, local: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _, world, _ = self._collectives()
        if world == 1:
            return local
        parts = self.trainer.strategy.gather_topk(local, self.top_k)
        return merge_topk(parts, self.top_k)

    def rank_candidates(
        self, s_test: Tensor, candidates: Tensor | None
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Top-k helpful/harmful ``(ids, scores)`` per s_test row among ``candidates [Q, k]`` (all N when None).

        Under an ``InfluenceStrategy`` with several processes, each scores its share of the candidates and the
        per-rank top-k lists are merged, so every rank returns the global answer.
        """
        if candidates is None:
            ids = self._shard(torch.arange(len(self.train_dataset)))  # type: ignore[arg-type]
            local = split_topk(self.score(s_test, ids), ids, self.top_k)
            merged = self._merge(local)
            return [tuple(t[q] for t in merged) for q in range(s_test.shape[0])]  # type: ignore[misc]
        out = []
        for q in range(s_test.shape[0]):
            ids = self._shard(candidates[q])
            local = split_topk(self.score(s_test[q : q + 1], ids), ids, self.top_k)
            out.append(tuple(t[0] for t in self._merge(local)))
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------- predict
    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise ConfigurationError(
                "Expected the predict loop to allow gradients, but `Trainer(inference_mode=True)` (the default) "
                "runs it under torch.inference_mode. Pass `Trainer(inference_mode=False)` to run influence."
            )
        self._query_offsets = {}
        self.timings = {}
        rank_zero_info(f"lightning_fastif: influence of the loss {self.loss.description}")
        if self.num_candidates is not None:
            self.candidate_index()

    def _query_ids(self, batch_idx: int, dataloader_idx: int, n: int) -> list[int]:
        """Dataset positions of the ``n`` queries of this batch (ids of the underlying dataset for a ``Subset``).

        Lightning wraps every predict loader's batch sampler to record the indices it yields (also on each rank
        when queries are split); fall back to counting positions for loaders it could not wrap.
        """
        return batch_query_ids(self, batch_idx, dataloader_idx, n)

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> list[InfluenceResult]:
        """Rank the most helpful and harmful training examples of every query of ``batch``.

        Returns:
            One :class:`InfluenceResult` per query example.
        """
        n = _batch_size(batch)
        if n == 0:
            raise ConfigurationError(
                "Expected `batch` to hold at least one query example, but got an empty batch."
            )
        query_ids = (
            self._query_ids(batch_idx, dataloader_idx, n) if self._trainer is not None else list(range(n))
        )
        if getattr(self, "group_queries", False):  # one result for the mean loss of the batch's queries
            digest = batch_digest(batch)
            if self.skip_query_digests.get(query_ids[0]) == digest and query_ids[0] in self.skip_query_ids:
                return []  # the same group was explained already (InfluenceWriter resuming)
            with (
                full_precision()
            ):  # a precision plugin's autocast (bf16-mixed) must not reach solves and scores
                result = self.explain_group(batch, query_ids)
            result.extra["query_sha256"] = digest
            return [result]
        digests = example_digests(batch)  # what each record is of: the query's input and label
        # already explained (InfluenceWriter resuming a killed run): not computed again, unless the query changed
        if self.skip_query_ids:
            keep = [
                i
                for i, q in enumerate(query_ids)
                if q not in self.skip_query_ids or self.skip_query_digests.get(q, digests[i]) != digests[i]
            ]
            if not keep:
                return []
            if len(keep) < n:
                batch = slice_batch(batch, torch.tensor(keep))
                query_ids = [query_ids[i] for i in keep]
                digests = [digests[i] for i in keep]
        with full_precision():  # a precision plugin's autocast (bf16-mixed) must not reach solves and scores
            results = self.explain(batch, query_ids)
        for r, d in zip(results, digests, strict=False):
            r.extra["query_sha256"] = d
        return results

    @trusted
    def explain_group(self, batch: Any, query_ids: Sequence[int] | None = None) -> InfluenceResult:
        """One result for the mean loss of ``batch`` (a group query: one s_test); its ``group`` lists the members.

        See :func:`lightning_fastif.influence.group.explain_group`.
        """
        from lightning_fastif.influence.group import explain_group

        return explain_group(self, batch, query_ids)

    @trusted
    def explain(self, batch: Any, query_ids: Sequence[int] | None = None) -> list[InfluenceResult]:
        """:meth:`predict_step` without a Trainer: results for every example of ``batch``."""
        batch = self._prepare(batch)
        n = _batch_size(batch)
        query_ids = list(range(n)) if query_ids is None else check_query_ids(query_ids, n)
        theta, spec = self._theta()
        with eval_mode(self.model), torch.no_grad():
            try:
                losses = self.loss(spec.unflatten(theta), batch).detach()
            except RuntimeError as err:  # the query inputs do not fit the model (wrong width...)
                clear = model_call_error(self, err, batch, "the query `batch`")
                if clear is None:
                    raise
                raise clear from err
            outputs = self.loss.outputs(batch) if self.loss.source != "per_example_loss" else None
        labels = labels_of(batch)
        preds = predictions(outputs, self.loss, n, labels)
        s = self.s_test(batch)
        distances: Tensor | None = None
        candidates: Tensor | None = None
        if self.num_candidates is not None:
            distances, candidates = self.search(batch, s)
            distances = None if self.candidates == "gradients" else distances  # feature distances only
        ranked = self.rank_candidates(s, candidates)
        results = assemble_results(self, ranked, query_ids, labels, preds, losses, candidates, distances)
        if self.top_tokens:
            attach_top_tokens(self, results, s, self.top_tokens)
        return results
