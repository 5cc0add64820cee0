"""Per-example gradient sketches (the training side of the gradient index) and the projected s_test rows.

``GradientSketcher`` picks the sketch (exact ``head``, LoGra ``kronecker`` or ``dense`` random projection of the
per-example gradients) and sketches training batches and s_test rows the same way, so that
``sketch(z) . query(s) ~ grad L(z) . s``. Part of ``retrieval.gradient_index``; imports torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import call_model, fetch, labels_of, logits_of, move_to
from lightning_fastif.functional.grads import per_example_grads
from lightning_fastif.functional.kfac.layers import is_conv1d
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.retrieval.gradients.sketch import (
    KINDS,
    DenseProjection,
    KroneckerProjection,
    head_query,
    head_sketch,
    kronecker_sizes,
)

__all__ = ["DEFAULT_DIM", "METHODS", "GradientSketcher"]


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


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


class GradientSketcher:
    """Sketches of per-example gradients of ``loss`` w.r.t. the selected parameters, and of s_test rows.

    Args:
        model: the network (not changed; read in eval mode).
        loss: ``(params, batch) -> [B]`` per-example losses (``functional.losses.resolve_loss``).
        params: glob patterns of the parameters differentiated (None: all trainable), as ``InfluenceModule``.
        method: ``"head"`` (exact ``g (x) [phi, 1]`` of a final cross-entropy ``Linear``), ``"kronecker"`` (LoGra,
            every selected parameter belongs to an ``nn.Linear`` or a GPT-2 ``Conv1D``), ``"dense"`` (projected per-example gradients),
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
                f"nn.Linear or a GPT-2 Conv1D, but got {list(self.spec.names)[:6]}. Use sketch='dense'."
            )
        self.method = method
        self.layer = head_layer
        self.layers: list[tuple[str, KroneckerProjection]] = []
        self._transposed: set[str] = set()  # Conv1D layers: weight [in, out]
        self.projection: DenseProjection | None = None
        if method == "head":
            module = modules[head_layer]
            self.dim = module.out_features * (
                module.in_features + (1 if f"{head_layer}.bias" in self.spec.names else 0)
            )
        elif method == "kronecker":
            dims = [_dims(modules[n]) for n, _ in linears]
            shapes = [(d_out, d_in + b) for (d_in, d_out), (_, b) in zip(dims, linears)]
            sizes = kronecker_sizes(shapes, dim)
            for i, ((name, b), (d_in, d_out), (k_out, k_in)) in enumerate(zip(linears, dims, sizes)):
                proj = KroneckerProjection(d_in, d_out, bool(b), k_in, k_out, self.seed + i, kind)
                self.layers.append((name, proj))
            self._transposed = {n for n, _ in linears if is_conv1d(modules[n])}
            self.dim = sum(p.dim for _, p in self.layers)
        else:
            self.projection = DenseProjection(self.spec.numel, dim, self.seed, kind)
            self.dim = dim

    # -------------------------------------------------------------------------------------------- resolution
    def _linear_owners(self, modules: dict[str, nn.Module]) -> list[tuple[str, int]]:
        """``[(layer name, has selected bias)]`` when every selected parameter is the weight or bias of a Linear or a
        GPT-2 ``Conv1D``."""
        names = set(self.spec.names)
        out: list[tuple[str, int]] = []
        seen: set[str] = set()
        for pname in self.spec.names:
            layer, _, leaf = pname.rpartition(".")
            module = modules.get(layer)
            if not (isinstance(module, nn.Linear) or is_conv1d(module)) or leaf not in ("weight", "bias"):
                return []
            if f"{layer}.weight" not in names:  # a bias alone: not a Kronecker product
                return []
            if layer not in seen:
                seen.add(layer)
                out.append((layer, int(f"{layer}.bias" in names)))
        return out

    @property
    def _forward_fn(self) -> Any:
        """How the model is called on a batch: the loss's ``forward_fn`` (None: the default convention)."""
        return getattr(self.loss, "forward_fn", None)

    def _head_layer(self, modules: dict[str, nn.Module], feature_layer: str | None, batch: Any) -> str | None:
        if getattr(self.loss, "source", None) != "classification" or self.dtype != torch.float32:
            return None
        from lightning_fastif.retrieval.features import find_feature_layer

        if feature_layer is None and batch is None:
            return None
        try:
            name, module = find_feature_layer(
                self.model, move_to(batch, self.device, self.dtype), feature_layer, self._forward_fn
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
        if self.projection is None:  # set in __init__ for the dense method
            raise RuntimeError("internal: dense sketching without a projection")
        return self.projection(grads.detach()).float().cpu(), None, None

    def _head_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        layer = dict(self.model.named_modules())[self.layer or ""]
        captured: list[Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
        try:
            with _eval_with_grad(self.model), torch.no_grad():
                logits = logits_of(call_model(self.model, batch, self._forward_fn))
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
    def _weight(self, parts: dict[str, Tensor], layer: str) -> Tensor:
        """A layer's rows of s_test as ``[Q, out, in]`` (a ``Conv1D`` weight is stored ``[in, out]``)."""
        w = parts[f"{layer}.weight"]
        return w.transpose(-1, -2) if layer in self._transposed else w

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
            q = torch.cat(
                [p.query(self._weight(parts, n), parts.get(f"{n}.bias")) for n, p in self.layers], 1
            )
        else:
            if self.projection is None:  # set in __init__ for the dense method
                raise RuntimeError("internal: dense sketching without a projection")
            q = self.projection(s_test.detach())
        return q.float().cpu()
