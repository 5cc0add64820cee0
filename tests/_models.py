"""Real-model fixtures: models written the way their own ecosystems write them, small enough for CPU tests.

Every factory returns ``(module, train_dataset, query_batch)`` and takes well under a second (seeded init plus a
few optimiser steps). The models:

- :func:`bn_cnn` — torchvision-style CNN (conv-bn-relu stem, one residual block, global average pool, ``Linear``
  head) as a LightningModule on digits reshaped ``[1, 8, 8]``. Has 0-dim buffers (``num_batches_tracked``).
- :func:`hf_bert` — Hugging Face ``BertForSequenceClassification`` built from a tiny ``BertConfig`` (no download),
  ``attn_implementation`` ``"eager"`` or ``"sdpa"``; dict batches ``{input_ids, attention_mask, labels}``.
  :func:`hf_bert_lightning` wraps it in a LightningModule for ``fit``.
- :func:`tuple_net` — ``forward`` returns ``(features, logits)``.
- :func:`regression_net` — MSE regression with ``self.criterion = nn.MSELoss()``; ``outputs=1`` gives ``[B]``
  float targets, ``outputs=2`` a multi-output ``[B, 2]`` target.
- :func:`smoothed_net` — classifier trained with ``self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)``.
- :func:`hf_gpt2`, :func:`hf_gpt2_classifier`, :func:`litgpt_lm` — language models built from configs (2 layers,
  32 dims, vocab 64; HF defaults: sdpa attention, ``use_cache=True``), a few steps trained.
- :func:`two_input_net` — like ``lightning.pytorch.demos.LightningTransformer``: ``forward(inputs, target)``; its
  per-example loss is the mean token NLL (see :func:`two_input_forward` / :func:`two_input_loss`).

:func:`reference_influence` is the float64 reference loop every agreement check compares against.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "DictDataset",
    "bn_cnn",
    "hf_bert",
    "hf_bert_lightning",
    "hf_gpt2",
    "hf_gpt2_classifier",
    "litgpt_lm",
    "reference_influence",
    "regression_net",
    "smoothed_net",
    "torch_transformer",
    "train_steps",
    "tuple_net",
    "two_input_forward",
    "two_input_loss",
    "two_input_net",
]


# ------------------------------------------------------------------------------------------------ data
def _digits(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]], y[perm[:n]]


class DictDataset(Dataset):
    """A map-style dataset of dict examples (as HF tokenised datasets give); ``default_collate`` makes dict batches."""

    def __init__(self, **tensors: Tensor) -> None:
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def train_steps(
    module: nn.Module, loss_of_batch: Any, batches: list[Any], steps: int, lr: float = 0.05
) -> None:
    """A few Adam steps in train mode (BatchNorm running statistics move), then ``eval()``."""
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    for s in range(steps):
        opt.zero_grad()
        loss_of_batch(batches[s % len(batches)]).backward()
        opt.step()
    module.eval()


def _batches(ds: Any, bs: int) -> list[Any]:
    if isinstance(ds, TensorDataset):
        return [tuple(t[i : i + bs] for t in ds.tensors) for i in range(0, len(ds), bs)]
    from torch.utils.data.dataloader import default_collate

    return [default_collate([ds[j] for j in range(i, min(i + bs, len(ds)))]) for i in range(0, len(ds), bs)]


class _Lit(pl.LightningModule):
    """Shared ``training_step``/``configure_optimizers`` for the fixtures (each defines ``training_loss``)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.training_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:  # only used when a test fits without a datamodule
        from torch.utils.data import DataLoader

        return DataLoader(self._train_set, batch_size=16)


# ------------------------------------------------------------------------------------------------ (a) BN CNN
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` (stride 1, no downsample)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class BNCNN(_Lit):
    def __init__(self, width: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, width)
        self.layer1 = BasicBlock(width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer1(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def training_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def bn_cnn(
    n_train: int = 96, n_query: int = 4, steps: int = 15, seed: int = 0
) -> tuple[BNCNN, TensorDataset, Any]:
    """BatchNorm CNN on digits ``[1, 8, 8]``; trained a few steps so the running statistics are not the init ones."""
    torch.manual_seed(seed)
    x, y = _digits(n_train + n_query, seed)
    x = x.reshape(-1, 1, 8, 8)
    train = TensorDataset(x[:n_train], y[:n_train])
    model = BNCNN()
    model._train_set = train
    train_steps(model, model.training_loss, _batches(train, 32), steps)
    return model, train, (x[n_train:], y[n_train:])


# ------------------------------------------------------------------------------------------------ (b) HF BERT
def _bert_config(attn: str, num_labels: int = 2, vocab: int = 30) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=num_labels,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation=attn,
    )


def _tokens(n: int, seq: int, vocab: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # 0 = [PAD]
    ids[:, 0] = 1  # [CLS]
    labels = ((ids >= vocab // 2) & (mask == 1)).sum(1).gt(mask.sum(1) // 2).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_bert(
    attn: str = "eager", n_train: int = 48, n_query: int = 3, seq: int = 8, steps: int = 10, seed: int = 0
) -> tuple[nn.Module, DictDataset, dict[str, Tensor]]:
    """A tiny ``BertForSequenceClassification`` built from a config (no download), a few steps trained.

    Args:
        attn: ``"eager"`` or ``"sdpa"`` (``config.attn_implementation``).

    Returns:
        The HF model (in eval mode), a dict dataset, and a dict query batch ``{input_ids, attention_mask, labels}``.
    """
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = _bert_config(attn)
    model = BertForSequenceClassification(cfg)
    data = _tokens(n_train + n_query, seq, cfg.vocab_size, seed)
    train = DictDataset(**{k: v[:n_train] for k, v in data.items()})
    query = {k: v[n_train:] for k, v in data.items()}
    train_steps(model, lambda b: model(**b).loss, _batches(train, 16), steps, lr=0.01)
    return model, train, query


class HFClassifier(_Lit):
    """A LightningModule around an HF model, as people write it: ``forward(**batch)``, the loss from ``outputs.loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_loss(self, batch: Any) -> Tensor:
        return self(**batch).loss


def hf_bert_lightning(attn: str = "eager", **kw: Any) -> tuple[HFClassifier, DictDataset, dict[str, Tensor]]:
    """:func:`hf_bert` wrapped in a LightningModule (for ``Trainer.fit`` with ``FeatureIndexCallback``)."""
    model, train, query = hf_bert(attn, **kw)
    lit = HFClassifier(model)
    lit._train_set = train
    lit.eval()
    return lit, train, query


# ------------------------------------------------------------------------------------------------ (c) tuple output
class TupleNet(_Lit):
    """``forward`` returns ``(features, logits)`` — a common pattern for metric-learning and distillation code."""

    def __init__(self, d_in: int = 64, hidden: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return features, self.head(features)

    def training_loss(self, batch: Any) -> Tensor:
        x, y = batch
        _, logits = self(x)
        return F.cross_entropy(logits, y)


def tuple_net(
    n_train: int = 96, n_query: int = 4, steps: int = 30, seed: int = 0
) -> tuple[TupleNet, TensorDataset, Any]:
    torch.manual_seed(seed)
    x, y = _digits(n_train + n_query, seed)
    train = TensorDataset(x[:n_train], y[:n_train])
    model = TupleNet()
    model._train_set = train
    train_steps(model, model.training_loss, _batches(train, 32), steps)
    return model, train, (x[n_train:], y[n_train:])


# ------------------------------------------------------------------------------------------------ (d) regression
class RegressionNet(_Lit):
    """MLP regression with the loss as an attribute (``self.criterion = nn.MSELoss()``)."""

    def __init__(self, d_in: int = 64, hidden: int = 12, outputs: int = 1) -> None:
        super().__init__()
        self.outputs = outputs
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, outputs)
        self.criterion = nn.MSELoss()

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.net(x))
        return out.squeeze(-1) if self.outputs == 1 else out

    def training_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return self.criterion(self(x), y)


def regression_net(
    outputs: int = 1, n_train: int = 96, n_query: int = 4, steps: int = 40, seed: int = 0
) -> tuple[RegressionNet, TensorDataset, Any]:
    """Digits pixels -> a smooth float target (``[B]`` for ``outputs=1``, ``[B, 2]`` for ``outputs=2``)."""
    torch.manual_seed(seed)
    x, digit = _digits(n_train + n_query, seed)
    t1 = digit.float() / 4.5 - 1.0 + 0.1 * torch.randn(len(x))
    t2 = x[:, 20:44].mean(1) * 3.0 - 1.0
    y = t1 if outputs == 1 else torch.stack([t1, t2], dim=1)
    train = TensorDataset(x[:n_train], y[:n_train])
    model = RegressionNet(outputs=outputs)
    model._train_set = train
    train_steps(model, model.training_loss, _batches(train, 32), steps, lr=0.02)
    return model, train, (x[n_train:], y[n_train:])


# ------------------------------------------------------------------------------------------------ (e) label smoothing
class SmoothedNet(_Lit):
    """A classifier trained with ``nn.CrossEntropyLoss(label_smoothing=0.1)`` stored as ``self.criterion``."""

    def __init__(
        self, d_in: int = 64, hidden: int = 16, num_classes: int = 10, label_smoothing: float = 0.1
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return self.criterion(self(x), y)


def smoothed_net(
    n_train: int = 96, n_query: int = 4, steps: int = 40, seed: int = 0
) -> tuple[SmoothedNet, TensorDataset, Any]:
    torch.manual_seed(seed)
    x, y = _digits(n_train + n_query, seed)
    train = TensorDataset(x[:n_train], y[:n_train])
    model = SmoothedNet()
    model._train_set = train
    train_steps(model, model.training_loss, _batches(train, 32), steps)
    return model, train, (x[n_train:], y[n_train:])


# ------------------------------------------------------------------------------------------------ (f) forward(inputs, target)
class TwoInputNet(_Lit):
    """Shaped like ``lightning.pytorch.demos.LightningTransformer``: ``forward(inputs, target)`` -> log-probs.

    A teacher-forced next-token model: position t sees ``inputs[:, t]`` and the previous target token. Output
    ``[B, T, V]`` log-probabilities; the training loss is ``F.nll_loss(output.view(-1, V), target.view(-1))``.
    """

    def __init__(self, vocab: int = 12, d: int = 8) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed_in = nn.Embedding(vocab, d)
        self.embed_tgt = nn.Embedding(vocab + 1, d)  # index `vocab` = start token
        self.decoder = nn.Linear(d, vocab)

    def forward(self, inputs: Tensor, target: Tensor) -> Tensor:
        start = torch.full_like(target[:, :1], self.vocab)
        prev = torch.cat([start, target[:, :-1]], dim=1)
        h = torch.tanh(self.embed_in(inputs) + self.embed_tgt(prev))
        return F.log_softmax(self.decoder(h), dim=-1)

    def training_loss(self, batch: Any) -> Tensor:
        inputs, target = batch
        output = self(inputs, target)
        return F.nll_loss(output.reshape(-1, self.vocab), target.reshape(-1))


def two_input_forward(model: nn.Module, batch: Any) -> Tensor:
    """How :class:`TwoInputNet` is called on a batch: ``model(inputs, target)``."""
    inputs, target = batch[0], batch[1]
    return model(inputs, target)


def two_input_loss(outputs: Tensor, batch: Any) -> Tensor:
    """Per-example loss of :class:`TwoInputNet`: mean token NLL, ``[B]``."""
    target = batch[1]
    return -outputs.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(dim=1)


def two_input_net(
    n_train: int = 64, n_query: int = 3, seq: int = 5, steps: int = 30, seed: int = 0
) -> tuple[TwoInputNet, TensorDataset, Any]:
    """Sequence pairs where the target is the input shifted by one token (mod V)."""
    torch.manual_seed(seed)
    model = TwoInputNet()
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, model.vocab, (n_train + n_query, seq), generator=g)
    target = (inputs + 1) % model.vocab
    flip = torch.rand(inputs.shape, generator=g) < 0.2
    target = torch.where(flip, torch.randint(0, model.vocab, inputs.shape, generator=g), target)
    train = TensorDataset(inputs[:n_train], target[:n_train])
    model._train_set = train
    train_steps(model, model.training_loss, _batches(train, 32), steps)
    return model, train, (inputs[n_train:], target[n_train:])


# ------------------------------------------------------------------------------------------------ reference
def reference_influence(
    model: nn.Module,
    train: Any,
    query: Any,
    per_example_loss: Any,
    params: list[str] | None = None,
    damping: float = 0.0,
    train_ids: list[int] | None = None,
) -> Tensor:
    """The float64 reference loop: ``I[q, i] = -grad L(z_i) . (H + damping I)^-1 grad L(q)``.

    H is the exact Hessian of the mean loss over the WHOLE training set (one example at a time), the gradients one
    example at a time. Everything in float64 on a deep copy of the model in eval mode.

    Args:
        per_example_loss: ``callable(model, batch) -> [B]`` computed on the (float64) copy.
        params: exact parameter names to differentiate (default: every parameter with ``requires_grad``).
        train_ids: training ids to score (default: all).

    Returns:
        ``[Q, n]`` float64 influence values.
    """
    import copy

    from torch.func import functional_call, hessian

    from lightning_fastif.functional.batch import batch_size, fetch, move_to, slice_batch

    m = copy.deepcopy(model).double().eval()
    bound = _Bound(m, per_example_loss)
    names = [n for n, p in m.named_parameters() if (p.requires_grad if params is None else n in params)]
    base = {n: p.detach() for n, p in m.named_parameters()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    theta = torch.cat([base[n].reshape(-1) for n in names])

    def loss_at(flat: Tensor, b: Any) -> Tensor:
        ps = dict(base)
        for n, piece, s in zip(names, torch.split(flat, sizes), shapes):
            ps[n] = piece.reshape(s)
        return functional_call(bound, {f"m.{k}": v for k, v in ps.items()}, (b,))

    def total(flat: Tensor, b: Any) -> Tensor:
        return loss_at(flat, b).sum()

    def example(ds: Any, i: int) -> Any:
        return move_to(fetch(ds, [i]), "cpu", torch.float64)

    n_train = len(train)
    H = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(n_train):
        H += hessian(total)(theta, example(train, i))
    H = H / n_train + damping * torch.eye(theta.numel(), dtype=torch.float64)
    q = move_to(query, "cpu", torch.float64)
    gq = torch.stack(
        [torch.func.grad(total)(theta, slice_batch(q, slice(j, j + 1))) for j in range(batch_size(q))]
    )
    s = torch.linalg.solve(H, gq.T).T  # [Q, P]
    ids = list(range(n_train)) if train_ids is None else list(train_ids)
    gz = torch.stack([torch.func.grad(total)(theta, example(train, i)) for i in ids])
    return -s @ gz.T


class _Bound(nn.Module):
    def __init__(self, m: nn.Module, per_example_loss: Any) -> None:
        super().__init__()
        self.m = m
        self.per_example_loss = per_example_loss

    def forward(self, batch: Any) -> Tensor:
        return self.per_example_loss(self.m, batch)


# ------------------------------------------------------------------------------------------------ (g) language models
def _lm_tokens(n: int, seq: int, vocab: int, seed: int) -> dict[str, Tensor]:
    """Sequences with a pattern to learn (each token = previous + 1 mod V, with noise) and right padding."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(seq)[None, :]) % (vocab - 1) + 1
    noise = torch.rand(n, seq, generator=g) < 0.2
    ids = torch.where(noise, torch.randint(1, vocab, (n, seq), generator=g), ids)
    lengths = torch.randint(seq - 3, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # 0 = padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _gpt2_config(**kw: Any) -> Any:
    from transformers import GPT2Config

    base = dict(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    base.update(kw)
    return GPT2Config(**base)  # default attention (sdpa) and default use_cache=True


def hf_gpt2(
    n_train: int = 24, n_query: int = 2, seq: int = 8, steps: int = 15, seed: int = 0
) -> tuple[nn.Module, DictDataset, dict[str, Tensor]]:
    """A tiny Hugging Face ``GPT2LMHeadModel`` built from a config (2 layers, 32 dims, vocab 64; no download), with
    its defaults (sdpa attention, ``use_cache=True``), a few steps trained on causal-LM batches
    ``{input_ids, attention_mask, labels}`` (labels = input ids, -100 on padding; the model shifts inside)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_gpt2_config())
    data = _lm_tokens(n_train + n_query, seq, 64, seed)
    train = DictDataset(**{k: v[:n_train] for k, v in data.items()})
    query = {k: v[n_train:] for k, v in data.items()}
    train_steps(model, lambda b: model(**b).loss, _batches(train, 8), steps, lr=0.01)
    return model, train, query


def hf_gpt2_classifier(
    n_train: int = 24, n_query: int = 2, seq: int = 8, steps: int = 15, seed: int = 0
) -> tuple[nn.Module, DictDataset, dict[str, Tensor]]:
    """A tiny ``GPT2ForSequenceClassification`` (2 labels, last non-padding token pooled) from a config."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(_gpt2_config(num_labels=2))
    data = _lm_tokens(n_train + n_query, seq, 64, seed)
    data["labels"] = (data["input_ids"][:, 0] >= 32).long()
    train = DictDataset(**{k: v[:n_train] for k, v in data.items()})
    query = {k: v[n_train:] for k, v in data.items()}
    train_steps(model, lambda b: model(**b).loss, _batches(train, 8), steps, lr=0.01)
    return model, train, query


def litgpt_lm(
    n_train: int = 24, n_query: int = 2, seq: int = 8, steps: int = 15, seed: int = 0
) -> tuple[nn.Module, TensorDataset, tuple[Tensor, Tensor]]:
    """A LitGPT ``GPT`` from a shrunk pythia config (2 layers, 32 dims, vocab 64), trained on ``(input_ids,
    targets)`` batches as LitGPT's own fine-tuning makes them (targets already shifted, -100 ignored)."""
    from litgpt.config import Config
    from litgpt.model import GPT

    torch.manual_seed(seed)
    cfg = Config.from_name(
        "pythia-14m", n_layer=2, n_embd=32, n_head=2, vocab_size=64, padded_vocab_size=64, block_size=16
    )
    model = GPT(cfg)
    data = _lm_tokens(n_train + n_query, seq + 1, 64, seed)
    x, y = data["input_ids"][:, :-1], data["labels"][:, 1:]
    train = TensorDataset(x[:n_train], y[:n_train])

    def loss_of(b: Any) -> Tensor:
        return F.cross_entropy(model(b[0]).reshape(-1, 64), b[1].reshape(-1), ignore_index=-100)

    train_steps(model, loss_of, _batches(train, 8), steps, lr=0.01)
    return model, train, (x[n_train:], y[n_train:])


class TorchTransformerTagger(nn.Module):
    """``nn.TransformerEncoder`` (torch's native layer: fused fast path in eval) over token embeddings, a token head."""

    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(x)))


def torch_transformer(
    n_train: int = 16, n_query: int = 2, seq: int = 6, steps: int = 10, seed: int = 0
) -> tuple[nn.Module, TensorDataset, tuple[Tensor, Tensor]]:
    """:class:`TorchTransformerTagger` trained to tag each token with its successor: batches ``(x [B, T], y [B, T])``."""
    torch.manual_seed(seed)
    model = TorchTransformerTagger()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 20, (n_train + n_query, seq), generator=g)
    y = (x + 1) % 20
    train = TensorDataset(x[:n_train], y[:n_train])

    def loss_of(b: Any) -> Tensor:
        return F.cross_entropy(model(b[0]).reshape(-1, 20), b[1].reshape(-1))

    train_steps(model, loss_of, _batches(train, 8), steps, lr=0.01)
    return model, train, (x[n_train:], y[n_train:])
