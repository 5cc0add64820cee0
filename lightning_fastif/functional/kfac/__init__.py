"""Kronecker-factored curvature (K-FAC and EK-FAC) of ``nn.Linear`` and ``nn.Conv2d`` layers, fitted by hooks.

For a layer with input activations ``a`` (a ones column appended when its bias is selected) and pre-activation
gradients ``g`` (the gradient of an example's loss with respect to the layer's output), one example's weight
gradient is ``D = sum_t g_t a_t^T`` ``[out, in(+1)]``, summed over the positions ``t`` that share the weight
(tokens of a sequence, pixels of a convolution; one position for a plain ``Linear``). The Fisher block of the layer,
``F = E[vec(D) vec(D)^T]`` (row-major ``vec``), is approximated by

- **K-FAC**: ``F ~ G (x) A`` with ``A = (1/N) sum_i sum_t a a^T`` and ``G = (1/(N T)) sum_i sum_t g g^T``
  (Grosse & Martens' KFC normalisation: per example for A, per position for G);
- **EK-FAC** (George et al., 2018): the same eigenbasis ``Q = Q_G (x) Q_A`` with the eigenvalues replaced by the
  exact diagonal of ``F`` in that basis, ``Lambda[o, i] = E[(Q_G^T D Q_A)[o, i]^2]`` (a second pass).

Layers are independent blocks (block-diagonal over layers). The damped inverse-vector product of a layer is
``Q_G [(Q_G^T V Q_A) / (Lambda + damping)] Q_A^T`` with ``Lambda = lambda_G lambda_A^T`` for K-FAC.

``fisher="true"`` backpropagates labels sampled from the model's own predictive distribution (one per example,
seeded by the example's position so that sharding does not change it): for the default classification loss a
categorical draw from ``softmax(logits)``; for a separable ``loss_fn`` a draw ``r ~ N(0, H_out)`` from the
per-example Hessian of the loss with respect to the outputs (for cross-entropy both have covariance
``diag(p) - p p^T``: the Fisher equals the Gauss-Newton matrix). ``fisher="exact"`` takes that expectation in
closed form instead of drawing from it: ``K`` backward passes per batch with the columns of a root ``R R^T = H_out``
(``r_c = sqrt(p_c) (e_c - p)`` for cross-entropy), so the factors are those of the Gauss-Newton matrix itself (no
Monte Carlo noise; ``K`` times the backward cost). ``fisher="empirical"`` backpropagates the real labels' losses.

The code is split by phase: ``kfac_layers`` (which layers are supported), ``kfac_capture`` (activations and
output gradients of one batch, by hooks), ``kfac_factors`` (covariances, eigendecomposition, EK-FAC's correction, the
fitting passes) and ``kfac_solve`` (the damped inverse-vector product, preconditioned CG). This module is their
public face. Imports torch only.
"""

from lightning_fastif.functional.kfac.capture import (
    FISHER_KINDS,
    MAX_OUTPUT_DIM,
    Captured,
    capture_batch,
    example_seed,
    fisher_mode,
)
from lightning_fastif.functional.kfac.factors import (
    KFACFactors,
    accumulate_covariances,
    accumulate_eigenvalues,
    finalize_covariances,
    fit_factors,
    math_dtype,
)
from lightning_fastif.functional.kfac.layers import LayerSlot, kfac_layers, kfac_unsupported
from lightning_fastif.functional.kfac.solve import layer_matrices, preconditioned_cg, solve_kfac

__all__ = [
    "FISHER_KINDS",
    "MAX_OUTPUT_DIM",
    "Captured",
    "KFACFactors",
    "LayerSlot",
    "accumulate_covariances",
    "accumulate_eigenvalues",
    "capture_batch",
    "example_seed",
    "finalize_covariances",
    "fisher_mode",
    "fit_factors",
    "kfac_layers",
    "kfac_unsupported",
    "layer_matrices",
    "math_dtype",
    "preconditioned_cg",
    "solve_kfac",
]
