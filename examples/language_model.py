"""Which training passages made a language model write what it wrote? Per-token influence on a tiny GPT-2.

A tiny Hugging Face ``GPT2LMHeadModel`` (built from a config: nothing is downloaded) is fine-tuned with Lightning on
text that ships with Python: the Zen of Python (the ``this`` module) and the docstrings of a few standard-library
modules, cut into short passages with a word-level vocabulary built here. The model then completes a prompt, and
``lightning_fastif`` explains the completion:

1. ``Trainer.fit`` trains the model; :class:`lightning_fastif.FeatureIndexCallback` indexes the training passages by
   the last token's hidden state (``feature_pooling="last"``, the causal LM's summary of a passage) at the end of fit.
2. The model greedily completes ``--prompt``; the completion (the prompt's tokens are ignored by the loss) is the query.
3. ``trainer.predict(InfluenceModule(..., top_tokens=k))`` finds the nearest passages (FastIF's kNN step), solves
   s_test, scores them and keeps the most helpful and harmful, with the k tokens of each passage that contribute most
   (per-token influence: one forward-mode jvp of the token losses, adding up to the passage's score).
4. The passages and their top tokens are printed, written to ``influence.jsonl`` and to ``report.html`` (the
   passages as a token heatmap: green tokens helped the completion, red ones hurt it).

No loss, forward or attention setting is given to influence: it finds that the module holds a Hugging Face causal LM
and uses the shifted, -100-aware per-passage token cross-entropy (``lf.SequenceCrossEntropy``, also the training loss
here), whose ``token_losses`` per-token influence reads; it turns the key/value cache off and runs attention on the
math kernel while it differentiates, and says so once.

Run from the repository root (about a minute on 2 CPU cores)::

    python examples/language_model.py --output-dir outputs/language_model
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import lightning_fastif as lf

MODULES = ("this", "textwrap", "json", "functools", "itertools", "collections", "string", "random", "pathlib")
"""Where the text comes from: the Zen of Python, then the docstrings of these modules and their public members."""

PAD, UNK = "<pad>", "<unk>"


# ------------------------------------------------------------------------------------------------------ text
def zen_of_python() -> str:
    """The Zen of Python, decoded from the ``this`` module (which prints it when imported: kept quiet here)."""
    import codecs

    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def stdlib_text(modules: Sequence[str] = MODULES) -> list[str]:
    """Paragraphs of text: the Zen's lines, then each docstring of ``modules`` (and their public members)."""
    lines = [line for line in zen_of_python().splitlines()[2:] if line.strip()]
    for name in modules[1:]:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in sorted(getattr(module, "__all__", dir(module))):
            member = getattr(module, attr, None)
            if (
                not attr.startswith("_")
                and callable(member)
                and isinstance(getattr(member, "__doc__", None), str)
            ):
                docs.append(member.__doc__)
        lines.extend(docs)
    return lines


def tokenize(text: str) -> list[str]:
    """Lower-case words and punctuation marks."""
    return re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())


def passages(texts: Sequence[str], max_len: int, min_len: int = 5) -> list[list[str]]:
    """Sentences of ``min_len`` to ``max_len`` tokens (longer sentences are cut into windows of ``max_len``)."""
    out: list[list[str]] = []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
            words = tokenize(sentence)
            for at in range(0, len(words), max_len):
                piece = words[at : at + max_len]
                if len(piece) >= min_len:
                    out.append(piece)
    return out


class Passages(Dataset):
    """Padded passages as dict examples ``{input_ids, attention_mask, labels}`` (labels -100 on padding)."""

    def __init__(self, rows: list[list[str]], vocab: dict[str, int], length: int) -> None:
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, words in enumerate(rows):
            ids[i, : len(words)] = torch.tensor([vocab.get(w, vocab[UNK]) for w in words])
            mask[i, : len(words)] = 1
        self.input_ids, self.attention_mask = ids, mask
        self.labels = ids.masked_fill(mask == 0, -100)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


# ------------------------------------------------------------------------------------------------------ model
class TinyGPT(pl.LightningModule):
    """A GPT-2 language model built from a config, trained with the per-passage token cross-entropy."""

    def __init__(
        self, vocab_size: int, n_positions: int, n_embd: int, n_layer: int, lr: float = 3e-3
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.model = GPT2LMHeadModel(config)
        self.loss = lf.SequenceCrossEntropy(shift=True)  # what influence finds by itself for a causal LM
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self(batch["input_ids"], batch["attention_mask"])
        loss = self.loss(outputs, batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)

    @torch.no_grad()
    def complete(self, ids: list[int], steps: int, pad: int, unk: int) -> list[int]:
        """Greedy completion of ``ids`` by ``steps`` tokens (never padding or the unknown token)."""
        self.eval()
        out = list(ids)
        limit = self.model.config.n_positions
        for _ in range(steps):
            x = torch.tensor([out[-limit:]])
            logits = self.model(input_ids=x).logits[0, -1]
            logits[[pad, unk]] = float("-inf")
            out.append(int(logits.argmax()))
        return out


# ------------------------------------------------------------------------------------------------------ run
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="outputs/language_model")
    p.add_argument("--prompt", default="beautiful is better than")
    p.add_argument("--completion-tokens", type=int, default=2)
    p.add_argument("--max-passages", type=int, default=200, help="training passages kept (the first ones)")
    p.add_argument("--passage-length", type=int, default=16, help="tokens per passage at most")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-candidates", type=int, default=200, help="k of the kNN step")
    p.add_argument("--top-k", type=int, default=3, help="helpful and harmful passages shown")
    p.add_argument("--top-tokens", type=int, default=3, help="tokens shown per passage")
    p.add_argument("--damping", type=float, default=0.1)
    p.add_argument("--cg-iterations", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, complete the prompt, explain the completion; returns what was printed as data."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    out_dir = Path(args.output_dir)
    start = time.perf_counter()

    rows = passages(stdlib_text(), args.passage_length)[: args.max_passages]
    words = sorted({w for row in rows for w in row} | set(tokenize(args.prompt)))
    vocab_list = [PAD, UNK, *words]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    train = Passages(rows, vocab, args.passage_length)
    n_positions = args.passage_length + 16  # the prompt and its completion must fit (checked below)
    if len(tokenize(args.prompt)) + args.completion_tokens > n_positions:
        raise SystemExit(
            f"Expected the prompt and --completion-tokens to hold at most {n_positions} tokens together, but got "
            f"{len(tokenize(args.prompt))} + {args.completion_tokens}."
        )
    model = TinyGPT(len(vocab_list), n_positions, args.n_embd, args.layers, lr=args.lr)
    print(
        f"{len(train)} passages, vocabulary of {len(vocab_list)} words, {sum(p.numel() for p in model.parameters()):,} parameters"
    )

    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[lf.FeatureIndexCallback(out_dir / "index", train, feature_pooling="last", progress=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    trained = time.perf_counter() - start

    prompt = [vocab.get(w, vocab[UNK]) for w in tokenize(args.prompt)]
    full = model.complete(prompt, args.completion_tokens, vocab[PAD], vocab[UNK])
    completion = " ".join(vocab_list[i] for i in full[len(prompt) :])
    print(f'Prompt: "{args.prompt}" -> completion: "{completion}"')
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # the query's loss is the completion's, given the prompt
    query = [{"input_ids": ids[0], "attention_mask": torch.ones_like(ids[0]), "labels": labels[0]}]

    last = args.layers - 1
    im = lf.InfluenceModule(
        model,
        train,
        params=[f"model.transformer.h.{last}.mlp.c_proj.*"],  # the last block's output projection
        solver=lf.CGSolver(damping=args.damping, max_iter=args.cg_iterations),
        curvature="gauss_newton",
        num_candidates=min(args.num_candidates, len(train)),
        top_k=args.top_k,
        top_tokens=args.top_tokens,
        index=out_dir / "index",
        batch_size=64,
        progress=False,
    )
    report = lf.InfluenceReport(
        out_dir, title=f'Why "{args.prompt}" -> "{completion}"', decoder=vocab_list, wandb=False
    )
    explainer = pl.Trainer(
        inference_mode=False,
        callbacks=[lf.InfluenceWriter(out_dir), report],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    result = explainer.predict(im, DataLoader(query, batch_size=1))[0][0]
    explained = time.perf_counter() - start - trained

    shown: dict[str, Any] = {"completion": completion, "helpful": [], "harmful": []}
    for kind, train_ids, scores in (
        ("helpful", result.helpful_ids, result.helpful_scores),
        ("harmful", result.harmful_ids, result.harmful_scores),
    ):
        print(
            f"Most {kind} training passages (influence; {'negative' if kind == 'helpful' else 'positive'} = {kind}):"
        )
        for rank, (train_id, score) in enumerate(zip(train_ids, scores), 1):
            tokens = (result.top_tokens or {}).get(str(train_id), [])
            text = " ".join(rows[train_id])
            top = ", ".join(f"{vocab_list[t]!r} {s:+.2e}" for _, t, s in tokens)
            print(f"  {rank}. #{train_id} {score:+.3e}  {text}")
            print(f"     top tokens: {top}")
            shown[kind].append({"id": train_id, "score": score, "text": text, "top_tokens": tokens})
    print(f"Trained in {trained:.0f} s, explained in {explained:.0f} s; report: {report.report_path}")
    shown.update(report=str(report.report_path), jsonl=str(out_dir / "influence.jsonl"), result=result)
    return shown


if __name__ == "__main__":
    main()
