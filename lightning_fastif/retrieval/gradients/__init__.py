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

from lightning_fastif.retrieval.gradients.folder import (
    build_gradient_index,
    load_gradient_index,
    save_gradient_index,
)
from lightning_fastif.retrieval.gradients.search import BuiltGradientIndex, GradientIndex, mips_union
from lightning_fastif.retrieval.gradients.settings import (
    SKETCH_KEYS,
    check_sketch_settings,
    module_gradient_index,
)
from lightning_fastif.retrieval.gradients.sketcher import DEFAULT_DIM, METHODS, GradientSketcher

__all__ = [
    "DEFAULT_DIM",
    "METHODS",
    "SKETCH_KEYS",
    "BuiltGradientIndex",
    "GradientIndex",
    "GradientSketcher",
    "build_gradient_index",
    "check_sketch_settings",
    "load_gradient_index",
    "mips_union",
    "module_gradient_index",
    "save_gradient_index",
]
