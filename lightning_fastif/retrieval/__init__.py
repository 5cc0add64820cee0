"""Candidate retrieval: penultimate-layer features, the kNN candidate index (FAISS or exact torch) and its folder.

Imports torch, numpy and (lazily, when a FAISS index is made or read) faiss; never Lightning or W&B.
"""

from lightning_fastif.retrieval.factory import index_from_bytes, make_index
from lightning_fastif.retrieval.faiss_index import FaissIndex
from lightning_fastif.retrieval.features import (
    extract_features,
    extract_features_and_outputs,
    find_feature_layer,
    ordered_loader,
)
from lightning_fastif.retrieval.index import BACKENDS, CandidateIndex, TorchIndex
from lightning_fastif.retrieval.store import IndexMeta, load_arrays, load_index, save_index

__all__ = [
    "BACKENDS",
    "CandidateIndex",
    "FaissIndex",
    "IndexMeta",
    "TorchIndex",
    "extract_features",
    "extract_features_and_outputs",
    "find_feature_layer",
    "index_from_bytes",
    "load_arrays",
    "load_index",
    "make_index",
    "ordered_loader",
    "save_index",
]
