"""The gradient-space candidate index: per-example gradient sketches searched by maximum inner product.

FastIF's candidates are the query's nearest neighbours in feature space; here they are the training examples whose
gradient has the largest inner product with the query's s_test on either side: influence is
``I = -grad L(z) . s_test``, so the most harmful examples have the most negative ``g . s`` and the most helpful the
most positive. A query's s_test is projected like the training gradients (``retrieval.sketch``), two searches find
the largest ``x . q`` and the largest ``x . (-q)``, and their union (k/2 each, deduplicated, topped up from either
list) is scored exactly by the module. The ranking is exact on the candidates; only the recall is approximate.

The index folder has the format of the feature index (``retrieval.store``) with ``space = "gradients"`` and the
sketch settings (method, dimension, seed, kind, parameter names, layer sizes) in ``meta.sketch``; it is read with
the stored vectors memory-mapped (FAISS ``IO_FLAG_MMAP_IFC``). Imports torch, numpy and (lazily) faiss only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError, IndexCorruptError, IndexMismatchError
from lightning_fastif.functional.batch import call_model, fetch, labels_of, logits_of, move_to
from lightning_fastif.functional.grads import per_example_grads
from lightning_fastif.functional.params import ParamSpec, fingerprint, select_params
from lightning_fastif.retrieval.index import CandidateIndex, make_index
from lightning_fastif.retrieval.sketch import (
    KINDS,
    DenseProjection,
    KroneckerProjection,
    head_query,
    head_sketch,
    kronecker_sizes,
)

__all__ = [
    "METHODS",
    "BuiltGradientIndex",
    "GradientIndex",
    "GradientSketcher",
    "build_gradient_index",
    "load_gradient_index",
    "mips_union",
    "save_gradient_index",
]

METHODS = ("auto", "head", "kronecker", "dense")
DEFAULT_DIM = 1024


@contextlib.contextmanager
def _eval_with_grad(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _fp16_factory(factory: str) -> str:
    """The FAISS factory storing the same index's vectors as float16 (scalar quantiser ``SQfp16``)."""
    if factory == "Flat":
        return "SQfp16"
    if factory.endswith(",Flat"):
        return factory[: -len("Flat")] + "SQfp16"
    if re.fullmatch(r"HNSW\d+", factory):
        return factory + "_SQfp16"
    if "SQfp16" in factory:
        return factory
    raise ConfigurationError(
        f"Expected `index_factory` to be Flat, IVF<n>,Flat or HNSW<m> with float16=True (stored as SQfp16), but got "
        f"{factory!r}. Pass a FAISS factory string with its own encoding and float16=False."
    )


class GradientSketcher:
    """Sketches of per-example gradients of ``loss`` w.r.t. the selected parameters, and of s_test rows.

    Args:
        model: the network (not changed; read in eval mode).
        loss: ``(params, batch) -> [B]`` per-example losses (``functional.losses.resolve_loss``).
        params: glob patterns of the parameters differentiated (None: all trainable), as ``InfluenceModule``.
        method: ``"head"`` (exact ``g (x) [phi, 1]`` of a final cross-entropy ``Linear``), ``"kronecker"`` (LoGra,
            every selected parameter belongs to an ``nn.Linear``), ``"dense"`` (projected per-example gradients),
            or ``"auto"``: head when it applies, else kronecker when it applies, else dense.
        dim: sketch dimension of the random projections (ignored by ``head``, which is exact).
        seed: seed of the projections.
        kind: ``"gaussian"`` or ``"rademacher"``.
        feature_layer: the head layer for ``head`` (default: the last ``nn.Linear`` called).
        batch: one real batch, needed to find the default feature layer.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Any,
        params: list[str] | None = None,
        method: str = "auto",
        dim: int = DEFAULT_DIM,
        seed: int = 0,
        kind: str = "gaussian",
        feature_layer: str | None = None,
        batch: Any = None,
    ) -> None:
        if method not in METHODS:
            raise ConfigurationError(f"Expected `sketch` to be one of {METHODS}, but got {method!r}.")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigurationError(f"Expected `sketch_dim` to be a positive int, but got {dim!r}.")
        if kind not in KINDS:
            raise ConfigurationError(f"Expected `sketch_kind` to be one of {KINDS}, but got {kind!r}.")
        self.model, self.loss, self.patterns = model, loss, params
        self.seed, self.kind, self.requested_dim = int(seed), kind, dim
        chosen = select_params(model, params)
        self.spec = ParamSpec.of(chosen)
        self.dtype = next(iter(chosen.values())).dtype
        self.device = next(iter(chosen.values())).device
        modules = dict(model.named_modules())
        linears = self._linear_owners(modules)
        head_layer = self._head_layer(modules, feature_layer, batch) if method in ("auto", "head") else None
        if method == "auto":
            method = "head" if head_layer else "kronecker" if linears else "dense"
        if method == "head" and not head_layer:
            raise ConfigurationError(
                "Expected sketch='head' to be used with the default cross-entropy loss and `params` selecting only "
                "the final nn.Linear (weight and bias), but the selected parameters are "
                f"{list(self.spec.names)[:6]}. Use sketch='kronecker' or 'dense'."
            )
        if method == "kronecker" and not linears:
            raise ConfigurationError(
                "Expected sketch='kronecker' to be used when every selected parameter is the weight (and bias) of an "
                f"nn.Linear, but got {list(self.spec.names)[:6]}. Use sketch='dense'."
            )
        self.method = method
        self.layer = head_layer
        self.layers: list[tuple[str, KroneckerProjection]] = []
        self.projection: DenseProjection | None = None
        if method == "head":
            module = modules[head_layer]
            self.dim = module.out_features * (
                module.in_features + (1 if f"{head_layer}.bias" in self.spec.names else 0)
            )
        elif method == "kronecker":
            shapes = [(modules[n].out_features, modules[n].in_features + b) for n, b in linears]
            sizes = kronecker_sizes(shapes, dim)
            for i, ((name, b), (k_out, k_in)) in enumerate(zip(linears, sizes)):
                m = modules[name]
                proj = KroneckerProjection(
                    m.in_features, m.out_features, bool(b), k_in, k_out, self.seed + i, kind
                )
                self.layers.append((name, proj))
            self.dim = sum(p.dim for _, p in self.layers)
        else:
            self.projection = DenseProjection(self.spec.numel, dim, self.seed, kind)
            self.dim = dim

    # -------------------------------------------------------------------------------------------- resolution
    def _linear_owners(self, modules: dict[str, nn.Module]) -> list[tuple[str, int]]:
        """``[(layer name, has selected bias)]`` when every selected parameter is a Linear's weight or bias."""
        names = set(self.spec.names)
        out: list[tuple[str, int]] = []
        seen: set[str] = set()
        for pname in self.spec.names:
            layer, _, leaf = pname.rpartition(".")
            if not isinstance(modules.get(layer), nn.Linear) or leaf not in ("weight", "bias"):
                return []
            if f"{layer}.weight" not in names:  # a bias alone: not a Kronecker product
                return []
            if layer not in seen:
                seen.add(layer)
                out.append((layer, int(f"{layer}.bias" in names)))
        return out

    def _head_layer(self, modules: dict[str, nn.Module], feature_layer: str | None, batch: Any) -> str | None:
        if getattr(self.loss, "source", None) != "classification" or self.dtype != torch.float32:
            return None
        from lightning_fastif.retrieval.features import find_feature_layer

        if feature_layer is None and batch is None:
            return None
        try:
            name, module = find_feature_layer(
                self.model, move_to(batch, self.device, self.dtype), feature_layer
            )
        except ConfigurationError:
            return None
        if not isinstance(module, nn.Linear):
            return None
        wanted = {f"{name}.weight"} | ({f"{name}.bias"} if module.bias is not None else set())
        names = set(self.spec.names)
        return name if names == wanted or names == {f"{name}.weight"} else None

    def settings(self) -> dict[str, Any]:
        """What rebuilds this sketcher (JSON types): kept as ``meta.sketch`` in the index folder."""
        return {
            "method": self.method,
            "dim": self.dim,
            "requested_dim": self.requested_dim,
            "seed": self.seed,
            "kind": self.kind,
            "params": list(self.spec.names),
            "param_patterns": self.patterns,
            "head_layer": self.layer,
            "layers": [[n, p.k_out, p.k_in, p.bias] for n, p in self.layers],
        }

    # -------------------------------------------------------------------------------------------- training side
    def sketch_batch(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(sketches [B, D] float32, head features [B, d] or None, logits [B, C] or None)`` of one batch."""
        batch = move_to(batch, self.device, self.dtype)
        if self.method == "head":
            return self._head_batch(batch)
        if self.method == "kronecker":
            return self._kron_batch(batch), None, None
        params = select_params(self.model, self.patterns)
        with _eval_with_grad(self.model), torch.no_grad():
            grads = per_example_grads(self.loss, self.spec.flatten(params), self.spec, batch)
        assert self.projection is not None
        return self.projection(grads.detach()).float().cpu(), None, None

    def _head_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        layer = dict(self.model.named_modules())[self.layer or ""]
        captured: list[Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
        try:
            with _eval_with_grad(self.model), torch.no_grad():
                logits = logits_of(call_model(self.model, batch))
        finally:
            handle.remove()
        labels = labels_of(batch)
        if logits is None or labels is None or not captured:
            raise ConfigurationError(
                "Expected batches with labels and a model output with logits for sketch='head', but got neither."
            )
        feats = captured[-1].flatten(1).float()
        logits = logits.detach().float()
        bias = f"{self.layer}.bias" in self.spec.names
        return head_sketch(feats, logits, labels, bias).cpu(), feats.cpu(), logits.cpu()

    def _kron_batch(self, batch: Any) -> Tensor:
        modules = dict(self.model.named_modules())
        inputs: dict[str, list[Tensor]] = {n: [] for n, _ in self.layers}
        outputs: dict[str, list[Tensor]] = {n: [] for n, _ in self.layers}
        handles = []
        for name, _ in self.layers:

            def hook(_m: nn.Module, args: tuple[Any, ...], out: Tensor, _n: str = name) -> None:
                inputs[_n].append(args[0].detach())
                outputs[_n].append(out)

            handles.append(modules[name].register_forward_hook(hook))
        params = {
            n: p.detach().requires_grad_(True) for n, p in select_params(self.model, self.patterns).items()
        }
        try:
            with _eval_with_grad(self.model):
                losses = self.loss(params, batch)
                flat = [o for name, _ in self.layers for o in outputs[name]]
                grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        n = losses.shape[0]
        parts, at = [], 0
        for name, proj in self.layers:
            total = None
            for a in inputs[name]:
                g = grads[at]
                at += 1
                if g is None:
                    g = torch.zeros(*a.shape[:-1], proj.out_dim, dtype=a.dtype, device=a.device)
                if a.shape[0] != n:
                    raise ConfigurationError(
                        f"Expected the input of layer {name!r} to be batch-first ({n} rows), but got shape "
                        f"{tuple(a.shape)}. Use sketch='dense'."
                    )
                s = proj.sketch(a, g)
                total = s if total is None else total + s  # a layer called several times: gradients add up
            parts.append(total if total is not None else torch.zeros(n, proj.dim, dtype=self.dtype))
        return torch.cat(parts, 1).detach().float().cpu()

    def sketch_rows(
        self,
        dataset: Any,
        ids: list[int] | None = None,
        batch_size: int = 256,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        progress: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Sketches ``[n, D]`` of ``dataset`` rows ``ids`` (all if None), in order; head features and logits too."""
        rows = list(range(len(dataset))) if ids is None else list(ids)
        from tqdm.auto import tqdm

        out, feats, logits = [], [], []
        for at in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="Gradient sketches"):
            batch = fetch(dataset, rows[at : at + batch_size], collate_fn)
            s, f, lg = self.sketch_batch(batch)
            out.append(s)
            if f is not None and lg is not None:
                feats.append(f)
                logits.append(lg)
        if not out:
            return torch.zeros(0, self.dim), None, None
        return torch.cat(out), (torch.cat(feats) if feats else None), (torch.cat(logits) if logits else None)

    # -------------------------------------------------------------------------------------------- query side
    def query(self, s_test: Tensor) -> Tensor:
        """The projected s_test rows ``[Q, D]`` float32: ``sketch(z) . query(s) ~ grad L(z) . s``."""
        if s_test.dim() != 2 or s_test.shape[1] != self.spec.numel:
            raise ConfigurationError(
                f"Expected `s_test` to have shape [Q, {self.spec.numel}] (the selected parameters of the gradient "
                f"index), but got {tuple(s_test.shape)}."
            )
        parts = self.spec.unflatten(s_test.detach())
        if self.method == "head":
            w = parts[f"{self.layer}.weight"]
            q = head_query(w, parts.get(f"{self.layer}.bias"))
        elif self.method == "kronecker":
            q = torch.cat([p.query(parts[f"{n}.weight"], parts.get(f"{n}.bias")) for n, p in self.layers], 1)
        else:
            assert self.projection is not None
            q = self.projection(s_test.detach())
        return q.float().cpu()


def mips_union(pos: Tensor, neg: Tensor, k: int) -> Tensor:
    """``k`` candidate ids per query from two ranked id lists: ``ceil(k/2)`` of ``pos``, ``floor(k/2)`` of ``neg``,
    deduplicated, topped up alternately from what is left of either list.

    Args:
        pos: ``[Q, m]`` ids, largest ``x . q`` first (the most helpful side: ``I = -x . q`` most negative).
        neg: ``[Q, m]`` ids, largest ``x . (-q)`` first (the most harmful side).
        k: candidates per query, at most the number of distinct ids in the two lists.

    Returns:
        ``[Q, k]`` int64, unique per row.
    """
    out = []
    half = (k + 1) // 2
    for p, n in zip(pos.tolist(), neg.tolist()):
        chosen = dict.fromkeys(p[:half])
        for i in n[: k - half]:
            chosen.setdefault(i)
        for pair in itertools.zip_longest(p[half:], n[k - half :]):  # top up from both sides alternately
            for i in pair:
                if i is not None and len(chosen) < k:
                    chosen.setdefault(i)
            if len(chosen) >= k:
                break
        if len(chosen) < k:
            raise ConfigurationError(
                f"Expected at least k={k} distinct candidates, but the two searches found {len(chosen)}."
            )
        out.append(list(chosen)[:k])
    return torch.tensor(out, dtype=torch.long).reshape(len(out), k)


@dataclasses.dataclass
class GradientIndex:
    """A maximum-inner-product index over gradient sketches, with the sketcher that made them.

    Attributes:
        index: the candidate index (metric ``"ip"``) over the sketches, id = training position.
        sketcher: projects s_test rows the same way (None for a folder loaded without a model).
        meta: what it was built from (``IndexMeta`` fields; ``space = "gradients"``, ``sketch`` settings).
        features, logits: head features and logits (method ``head``), cached for the head scoring fast path.
        head_grads: ``g = softmax - onehot`` ``[N, C]`` of a head with bias: with ``features`` the exact head sketch
            in factored form, so an exact (``Flat``) search costs ``N (d + C)`` per query, not ``N C (d + 1)``.
    """

    index: CandidateIndex
    sketcher: GradientSketcher | None
    meta: dict[str, Any]
    features: Tensor | None = None
    logits: Tensor | None = None
    head_grads: Tensor | None = None

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def candidates(self, s_test: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(approximate g . s of the candidates [Q, k], candidate ids [Q, k])`` for s_test rows ``[Q, P]``.

        The approximate ``g . s`` is the sketch inner product (exact for ``head``); the module scores the ids
        exactly. Ids come helpful side first.
        """
        if self.sketcher is None:
            raise ConfigurationError(
                "Expected a GradientIndex with its sketcher (a model) to search with s_test."
            )
        n = self.index.ntotal
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigurationError(f"Expected `num_candidates` to be an int in [1, {n}], but got {k!r}.")
        m, nq = min(n, k), s_test.shape[0]
        if self._factored():
            dist, found = self._head_search(s_test, m)
        else:
            q = self.sketcher.query(s_test)
            dist, found = self.index.search(torch.cat([q, -q]), m)  # one call: both sides share the scan
        ids = mips_union(found[:nq], found[nq:], k)
        dots = torch.full((nq, k), float("nan"))
        buf = torch.full((n,), float("nan"))
        for row in range(nq):
            buf[found[row + nq]] = -dist[row + nq]
            buf[found[row]] = dist[row]
            dots[row] = buf[ids[row]]
        return dots, ids

    def _factored(self) -> bool:
        return (
            self.sketcher is not None
            and self.sketcher.method == "head"
            and self.head_grads is not None
            and self.features is not None
            and self.index.factory == "Flat"
        )

    def _head_search(self, s_test: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Exact head search in factored form: ``g . s = g^T (S_W phi + s_b)``, chunked over the training set.

        Returns ``(values [2Q, m], ids [2Q, m])`` like ``index.search([q; -q], m)``.
        """
        assert self.sketcher is not None and self.features is not None and self.head_grads is not None
        layer = self.sketcher.layer
        parts = self.sketcher.spec.unflatten(s_test.detach().float().cpu())
        s_w = parts[f"{layer}.weight"]  # [Q, C, d]
        s_b = parts[f"{layer}.bias"]  # [Q, C]
        nq, c, d = s_w.shape
        flat_w = s_w.reshape(nq * c, d).T.contiguous()
        best_v = torch.empty(2 * nq, 0)
        best_i = torch.empty(2 * nq, 0, dtype=torch.long)
        step = max(1024, (1 << 22) // max(1, nq * c))
        for at in range(0, self.features.shape[0], step):
            phi = torch.as_tensor(self.features[at : at + step]).float()
            g = torch.as_tensor(self.head_grads[at : at + step]).float()
            t = (phi @ flat_w).view(-1, nq, c) + s_b.unsqueeze(0)  # [n, Q, C]
            dots = (t * g.unsqueeze(1)).sum(-1).T  # [Q, n]
            vals = torch.cat([dots, -dots])
            ids = torch.arange(at, at + dots.shape[1]).expand(2 * nq, -1)
            vals, ids = torch.cat([best_v, vals], 1), torch.cat([best_i, ids], 1)
            best_v, sel = vals.topk(min(m, vals.shape[1]), dim=1)
            best_i = ids.gather(1, sel)
        return best_v, best_i


@dataclasses.dataclass
class BuiltGradientIndex(GradientIndex):
    sketches: Tensor | None = None


def build_gradient_index(
    model: nn.Module,
    dataset: Any,
    loss: Any,
    params: list[str] | None = None,
    method: str = "auto",
    dim: int = DEFAULT_DIM,
    seed: int = 0,
    kind: str = "gaussian",
    float16: bool = False,
    factory: str = "Flat",
    backend: str = "faiss",
    batch_size: int = 256,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    feature_layer: str | None = None,
    progress: bool = False,
    sketches: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
    sketcher: GradientSketcher | None = None,
    **index_kwargs: Any,
) -> BuiltGradientIndex:
    """Sketch every training example's gradient (or take ``sketches`` already made) and index them by training id.

    Args:
        model, dataset, loss, params: the network, its training set (row i = id i), the per-example loss and the
            selected parameters, as ``InfluenceModule`` uses them.
        method, dim, seed, kind, feature_layer: see :class:`GradientSketcher`.
        float16: store the sketches as float16 (FAISS ``SQfp16``: half the size, inner products to ~1e-3).
        factory: FAISS factory string (``"Flat"`` exact MIPS, ``"IVF1024,Flat"``, ``"HNSW32"``), metric inner product.
        backend: ``"faiss"`` or ``"torch"`` (exact, float32 only).
        batch_size, collate_fn: how the training set is read.
        sketches: ``(sketches [N, D], head features or None, logits or None)`` computed already (under DDP).
        sketcher: a :class:`GradientSketcher` to use instead of making one.
        **index_kwargs: ``nprobe``, ``ef_search``... (see ``retrieval.make_index``).

    Example:
        >>> from lightning_fastif.functional.losses import resolve_loss
        >>> built = build_gradient_index(net, train_ds, resolve_loss(net), dim=256)
        >>> built.candidates(s_test, k=100)[1].shape        # [Q, 100]
    """
    n = len(dataset)
    if n == 0:
        raise ConfigurationError("Expected `train_dataset` to hold at least one example, but it is empty.")
    if sketcher is None:
        first = fetch(dataset, list(range(min(2, n))), collate_fn)
        sketcher = GradientSketcher(model, loss, params, method, dim, seed, kind, feature_layer, first)
    x, feats, logits = sketches or sketcher.sketch_rows(dataset, None, batch_size, collate_fn, progress)
    if float16 and backend != "faiss":
        raise ConfigurationError(
            "Expected backend='faiss' with float16=True (SQfp16 codes), but got backend='torch'."
        )
    index = make_index(_fp16_factory(factory) if float16 else factory, backend, metric="ip", **index_kwargs)
    index.add(x, torch.arange(n, dtype=torch.long))
    meta = {
        "feature_layer": sketcher.layer,
        "dataset_length": n,
        "model_fingerprint": fingerprint(model),
        "space": "gradients",
        "sketch": {**sketcher.settings(), "float16": bool(float16)},
    }
    head_grads = None
    if sketcher.method == "head" and f"{sketcher.layer}.bias" in sketcher.spec.names:
        head_grads = (
            x[:, -int(logits.shape[1]) :].clone() if logits is not None else None
        )  # the bias block is g
    return BuiltGradientIndex(index, sketcher, meta, feats, logits, head_grads, x)


def save_gradient_index(built: GradientIndex, dirpath: str | os.PathLike[str], overwrite: bool = True) -> Any:
    """Write a gradient index folder (atomic, fingerprinted: ``retrieval.store.save_index``); returns its IndexMeta."""
    from lightning_fastif.retrieval.store import save_index

    arrays = {}
    if built.features is not None and built.logits is not None:
        arrays = {"features": built.features, "logits": built.logits}
        if built.head_grads is not None:
            arrays["head_grads"] = built.head_grads
    return save_index(built.index, dirpath, built.meta, overwrite=overwrite, arrays=arrays)


def load_gradient_index(
    dirpath: str | os.PathLike[str],
    expected: Mapping[str, Any] | None = None,
    sketcher: GradientSketcher | None = None,
    mmap: bool = True,
    ignore_mismatch: bool = False,
) -> GradientIndex:
    """Read a gradient index folder, its stored vectors memory-mapped (FAISS backend), checked against its use.

    Args:
        dirpath: the folder written by :func:`save_gradient_index`.
        expected: as ``retrieval.store.load_index`` (``dataset_length``, ``model_fingerprint``...).
        sketcher: the sketcher of the model it is used with; its settings must equal the folder's (method,
            dimension, seed, kind, parameter names), else IndexMismatchError.
        mmap: memory-map the FAISS file (``IO_FLAG_MMAP_IFC``) instead of reading it into memory.
        ignore_mismatch: warn instead of raising on a fingerprint or length mismatch (never on the space).

    Raises:
        IndexMismatchError: a feature-space folder, other sketch settings, or what ``load_index`` refuses.
        IndexCorruptError: a missing, truncated or unreadable folder.
    """
    from lightning_fastif.retrieval import store

    want = {**dict(expected or {}), "space": "gradients"}
    folder = store._resolve(Path(dirpath))
    meta, _ = store._read_meta_and_verify(folder)
    if meta.space != "gradients" or not mmap or meta.backend != "faiss":
        index, meta = store.load_index(folder, expected=want, ignore_mismatch=ignore_mismatch)
    else:
        index = _load_faiss_mmap(folder, meta)
        _check_expected(meta, want, folder, ignore_mismatch)
    if sketcher is not None:
        mine = sketcher.settings()
        keys = ("method", "dim", "seed", "kind", "params", "layers")
        diffs = [
            f"{k}: the index has {meta.sketch.get(k)!r}, expected {mine[k]!r}"
            for k in keys
            if meta.sketch.get(k) != mine[k]
        ]
        if diffs:
            raise IndexMismatchError(
                f"The gradient index at {str(dirpath)!r} was sketched differently: {'; '.join(diffs)}. Rebuild it "
                "with these settings (`lightning-fastif index --space gradients`) or pass the folder's settings."
            )
    feats = logits = None
    head_grads = None
    if {"features", "logits"} <= set(meta.arrays):
        names = ["features", "logits"] + (["head_grads"] if "head_grads" in meta.arrays else [])
        arrays = store.load_arrays(folder, names)
        feats, logits, head_grads = arrays["features"], arrays["logits"], arrays.get("head_grads")
    return GradientIndex(index, sketcher, meta.to_dict(), feats, logits, head_grads)


def _load_faiss_mmap(folder: Path, meta: Any) -> CandidateIndex:
    from lightning_fastif.retrieval.faiss_index import FaissIndex

    ids = np.load(folder / "ids.npy", mmap_mode="r")
    try:
        index = FaissIndex.load(
            folder / meta.index_file, np.asarray(ids), meta.factory, mmap=True, **meta.params
        )
    except (RuntimeError, ValueError) as err:
        raise IndexCorruptError(f"The index at {str(folder)!r} cannot be read ({err}).") from err
    if index.ntotal != meta.ntotal or index.dim != meta.dim:
        raise IndexCorruptError(
            f"The index at {str(folder)!r} holds {index.ntotal} rows of dimension {index.dim}, but its meta.json "
            f"says {meta.ntotal} of dimension {meta.dim}."
        )
    return index


def _check_expected(meta: Any, want: dict[str, Any], folder: Path, ignore_mismatch: bool) -> None:
    import warnings

    if meta.space != want.get("space", meta.space):
        raise IndexMismatchError(f"The index at {str(folder)!r} holds {meta.space}-space candidates.")
    diffs = [
        f"{k}: the index has {getattr(meta, k)!r}, expected {v!r}"
        for k, v in want.items()
        if k != "space" and v is not None and getattr(meta, k) != v
    ]
    if diffs:
        msg = f"The gradient index at {str(folder)!r} was built from something else: {'; '.join(diffs)}."
        if not ignore_mismatch:
            raise IndexMismatchError(msg + " Rebuild it, or pass ignore_mismatch=True to use it anyway.")
        warnings.warn(msg, stacklevel=3)


SKETCH_KEYS = ("method", "dim", "seed", "kind", "float16", "factory", "backend", "nprobe", "ef_search")


def check_sketch_settings(sketch: Mapping[str, Any] | None) -> dict[str, Any]:
    """``InfluenceModule(sketch=...)``: a dict with keys among :data:`SKETCH_KEYS`, checked."""
    if sketch is None:
        return {}
    if not isinstance(sketch, Mapping):
        raise ConfigurationError(
            f"Expected `sketch` to be a dict of gradient-index settings, but got {sketch!r}."
        )
    unknown = sorted(set(sketch) - set(SKETCH_KEYS))
    if unknown:
        raise ConfigurationError(
            f"Expected the keys of `sketch` to be among {SKETCH_KEYS}, but got {unknown}."
        )
    return dict(sketch)


def module_gradient_index(module: Any) -> GradientIndex:
    """The gradient index of an ``InfluenceModule`` with ``candidates="gradients"``.

    ``module.index`` is a :class:`GradientIndex`, a gradient index folder (its sketch settings are read from the
    folder and must match the module's model, data and selected parameters), or None (built in memory from
    ``module.sketch``). A head index also gives the module the features and logits of its scoring fast path.
    """
    from lightning_fastif.retrieval import store

    n = len(module.train_dataset)
    settings = dict(getattr(module, "sketch", None) or {})
    first = fetch(module.train_dataset, list(range(min(2, n))), module._user_collate)

    def sketcher(s: Mapping[str, Any]) -> GradientSketcher:
        return GradientSketcher(
            module.model,
            module.loss,
            module.param_patterns,
            s.get("method", "auto"),
            s.get("dim", DEFAULT_DIM),
            s.get("seed", 0),
            s.get("kind", "gaussian"),
            s.get("head_layer") or module.feature_layer,
            first,
        )

    index = module.index
    if isinstance(index, (str, os.PathLike)):
        folder = store._resolve(Path(index))
        meta, _ = store._read_meta_and_verify(folder, names=[])
        found = meta.sketch if meta.space == "gradients" else {}
        gi = load_gradient_index(
            folder,
            expected={"dataset_length": n, "model_fingerprint": fingerprint(module.model)},
            sketcher=sketcher({**found, "dim": found.get("requested_dim", DEFAULT_DIM)}) if found else None,
        )
    elif isinstance(index, GradientIndex):
        gi = index
        if gi.ntotal != n:
            raise ConfigurationError(
                f"Expected `index` to hold every training example ({n}), but it holds {gi.ntotal}: rebuild it."
            )
        if gi.sketcher is None:
            raise ConfigurationError("Expected the GradientIndex passed as `index` to carry its sketcher.")
    elif index is None:
        extra = {k: settings[k] for k in ("nprobe", "ef_search") if settings.get(k) is not None}
        gi = build_gradient_index(
            module.model,
            module.train_dataset,
            module.loss,
            sketcher=sketcher(settings),
            float16=bool(settings.get("float16", False)),
            factory=settings.get("factory", "Flat"),
            backend=settings.get("backend", "faiss"),
            batch_size=module.score_batch_size,
            collate_fn=module._user_collate,
            **extra,
        )
    else:
        raise ConfigurationError(
            "Expected `index` to be a GradientIndex, a gradient index folder or None with candidates='gradients', "
            f"but got {type(index).__name__}."
        )
    return gi
