"""Language models as people train them (issue 19): sequence losses found automatically, HF defaults (sdpa attention,
``use_cache=True``), LitGPT, bf16 models, tied weights. Every agreement is against a float64 reference built from
explicit matrices (the Hessian, or the Gauss-Newton ``sum J^T H_out J``) on a parameter subset."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import slice_batch
from lightning_fastif.functional.sequence import SequenceCrossEntropy

pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------ references
def _token_mean_ce(logits: Tensor, labels: Tensor, shift: bool) -> Tensor:
    """Per-sequence mean token cross-entropy, written out one sequence at a time (the reference)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    out = []
    for b in range(labels.shape[0]):
        keep = labels[b] != -100
        lp = torch.log_softmax(logits[b][keep], -1)
        out.append(-lp.gather(-1, labels[b][keep][:, None]).mean())
    return torch.stack(out)


def _reference(
    model: nn.Module,
    train: Any,
    query: Any,
    names: list[str],
    logits_fn: Any,
    loss_of_logits: Any,
    damping: float,
    curvature: str,
) -> Tensor:
    """``-g_z . (C + damping I)^-1 g_q`` in float64, C the explicit Hessian or Gauss-Newton of the mean loss."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_fastif.functional.batch import fetch, move_to

    m = copy.deepcopy(model).double().eval()
    base = {n: p.detach() for n, p in m.named_parameters()}
    sizes = [base[n].numel() for n in names]
    theta = torch.cat([base[n].reshape(-1) for n in names])

    def logits_at(flat: Tensor, b: Any) -> Tensor:
        ps = dict(base)
        for n, piece in zip(names, torch.split(flat, sizes)):
            ps[n] = piece.reshape(base[n].shape)
        return logits_fn(lambda *a, **k: functional_call(m, ps, a, k), b)

    def losses_at(flat: Tensor, b: Any) -> Tensor:
        return loss_of_logits(logits_at(flat, b), b)

    everything = move_to(fetch(train, list(range(len(train)))), "cpu", torch.float64)
    q = move_to(query, "cpu", torch.float64)
    n, p = len(train), theta.numel()
    with sdpa_kernel(SDPBackend.MATH):
        if curvature == "hessian":
            c = hessian(lambda t: losses_at(t, everything).sum())(theta) / n
        else:
            c = torch.zeros(p, p, dtype=torch.float64)
            for i in range(n):
                b = slice_batch(everything, slice(i, i + 1))
                jac = jacrev(logits_at)(theta, b).reshape(-1, p)  # [T*V, P]
                out = logits_at(theta, b).detach()
                h_out = hessian(lambda o, b=b, shape=out.shape: loss_of_logits(o.reshape(shape), b).sum())(
                    out.reshape(-1)
                )
                c += jac.T @ h_out @ jac
            c /= n
        gq = jacrev(losses_at)(theta, q)  # [Q, P]
        gz = jacrev(losses_at)(theta, everything)  # [N, P]
    s = torch.linalg.solve(c + damping * torch.eye(p, dtype=torch.float64), gq.T).T
    return -s @ gz.T


def _hf_causal_logits(call: Any, b: dict[str, Tensor]) -> Tensor:
    return call(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits


def _agree(got: Tensor, ref: Tensor, rtol: float = 1e-2) -> None:
    got = got.double()
    assert got.shape == ref.shape
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= rtol * scale, (got, ref)
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.9999


GPT2_PARAMS = [
    "transformer.h.1.attn.c_attn.bias",
    "transformer.ln_f.weight",
]  # through attention: double backward


# ------------------------------------------------------------------------------------------------ the sequence loss
def test_sequence_cross_entropy_token_losses_add_up_and_ignore_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 4:] = -100
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 5:] = 0  # padded but labelled: not counted either
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": mask, "labels": labels}
    for shift in (False, True):
        for reduction in ("mean", "sum"):
            loss = SequenceCrossEntropy(reduction=reduction, shift=shift)
            tok = loss.token_losses(logits, batch)
            assert tok.shape == (3, 6)  # column t: predicting token t (position 0 of a shifted LM is 0)
            assert torch.equal(loss(logits, batch), tok.sum(-1))
            lab = labels.masked_fill(mask == 0, -100)
            lg, lb = (logits[:, :-1], lab[:, 1:]) if shift else (logits, lab)
            if shift:
                assert torch.all(tok[:, 0] == 0)
                tok = tok[:, 1:]
            for b in range(3):
                keep = lb[b] != -100
                ce = F.cross_entropy(lg[b][keep], lb[b][keep], reduction="none")
                want = ce.mean() if reduction == "mean" else ce.sum()
                assert torch.allclose(tok[b].sum(), want)
                assert torch.all(tok[b][~keep] == 0)


def test_sequence_cross_entropy_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match="reduction"):
        SequenceCrossEntropy(reduction="max")
    loss = SequenceCrossEntropy()
    with pytest.raises(ConfigurationError, match=r"token ids in \[0, 4\)"):
        loss(torch.randn(1, 3, 4), {"labels": torch.tensor([[0, 9, -100]])})


# ------------------------------------------------------------------------------------------------ HF GPT-2
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_hf_gpt2_defaults_need_no_loss_fn_and_match_float64(curvature: str) -> None:
    from _models import hf_gpt2

    model, train, query = hf_gpt2()
    assert model.config.use_cache and model.config._attn_implementation == "sdpa"
    im = lf.InfluenceModule(
        model,
        train,
        params=GPT2_PARAMS,
        solver=lf.ExactSolver(damping=0.1),
        num_candidates=None,
        curvature=curvature,
        progress=False,
    )
    got = im.influence(query)
    assert im.loss.source == "sequence" and im.loss.token_loss.shift
    ref = _reference(
        model,
        train,
        query,
        GPT2_PARAMS,
        _hf_causal_logits,
        lambda lg, b: _token_mean_ce(lg, b["labels"], shift=True),
        0.1,
        curvature,
    )
    _agree(got, ref)
    assert model.config.use_cache  # restored


def test_hf_gpt2_states_caches_and_attention_once(caplog: pytest.LogCaptureFixture) -> None:
    from _models import hf_gpt2

    model, train, query = hf_gpt2(n_train=8, steps=2)
    im = lf.InfluenceModule(
        model, train, params=GPT2_PARAMS, solver=lf.CGSolver(damping=0.1), num_candidates=None, progress=False
    )
    with caplog.at_level("INFO"):
        im.influence(query)
        im.influence(query)
    text = caplog.text
    assert text.count("use_cache=False") == 1 and text.count("math SDPA kernel") == 1


def test_hf_gpt2_sequence_classifier_matches_float64() -> None:
    from _models import hf_gpt2_classifier

    model, train, query = hf_gpt2_classifier()
    names = ["transformer.h.1.attn.c_attn.bias", "score.weight"]
    im = lf.InfluenceModule(
        model,
        train,
        params=names,
        solver=lf.ExactSolver(damping=0.1),
        num_candidates=None,
        curvature="gauss_newton",
        progress=False,
    )
    got = im.influence(query)
    ref = _reference(
        model,
        train,
        query,
        names,
        _hf_causal_logits,
        lambda lg, b: F.cross_entropy(lg, b["labels"], reduction="none"),
        0.1,
        "gauss_newton",
    )
    _agree(got, ref)


# ------------------------------------------------------------------------------------------------ LitGPT
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_litgpt_needs_no_loss_fn_and_matches_float64(curvature: str) -> None:
    import litgpt  # noqa: F401  (installed by `make install`: a missing install step fails here, not skips)
    from _models import litgpt_lm

    model, train, query = litgpt_lm()
    names = ["transformer.h.1.attn.qkv.bias", "transformer.ln_f.weight"]
    im = lf.InfluenceModule(
        model,
        train,
        params=names,
        solver=lf.ExactSolver(damping=0.1),
        num_candidates=None,
        curvature=curvature,
        progress=False,
    )
    got = im.influence(query)
    assert im.loss.source == "sequence" and not im.loss.token_loss.shift
    ref = _reference(
        model,
        train,
        query,
        names,
        lambda call, b: call(b[0]),
        lambda lg, b: _token_mean_ce(lg, b[1], shift=False),
        0.1,
        curvature,
    )
    _agree(got, ref)


# ------------------------------------------------------------------------------------------------ tied weights
def test_tied_weight_pattern_names_the_weight_it_is_tied_to() -> None:
    from _models import hf_gpt2

    model, train, _ = hf_gpt2(n_train=4, steps=0)
    with pytest.raises(ConfigurationError, match=r"tied to `transformer\.wte\.weight`"):
        lf.InfluenceModule(model, train, params=["lm_head.*"], num_candidates=None)


# ------------------------------------------------------------------------------------------------ attention kernels
def _corr(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def test_cg_and_lissa_run_through_default_sdpa_attention() -> None:
    """Gauss-Newton products need forward mode through attention: the CPU flash kernel has none (without the math
    kernel this raises UnsupportedModelError)."""
    from _models import hf_gpt2

    model, train, query = hf_gpt2(n_train=16)

    def run(solver: Any) -> Tensor:
        im = lf.InfluenceModule(
            model,
            train,
            params=GPT2_PARAMS,
            solver=solver,
            num_candidates=None,
            curvature="gauss_newton",
            progress=False,
        )
        return im.influence(query)

    exact = run(lf.ExactSolver(damping=0.1))
    cg = run(lf.CGSolver(damping=0.1, tol=1e-6, max_iter=200))
    lissa = run(lf.LiSSASolver(damping=0.1, scale=20.0, depth=300, batch_size=8))
    assert torch.allclose(cg, exact, atol=1e-4 * float(exact.abs().max()))
    assert _corr(lissa, exact) > 0.99


def test_ekfac_on_litgpt_with_sampled_tokens_tracks_the_gauss_newton_solution() -> None:
    import litgpt  # noqa: F401  (installed by `make install`: a missing install step fails here, not skips)
    from _models import litgpt_lm

    model, train, query = litgpt_lm()
    names = ["transformer.h.1.attn.qkv.*"]
    exact = lf.InfluenceModule(
        model,
        train,
        params=names,
        solver=lf.CGSolver(damping=0.1, tol=1e-6, max_iter=300),
        num_candidates=None,
        curvature="gauss_newton",
        progress=False,
    ).influence(query)
    ekfac = lf.InfluenceModule(
        model, train, params=names, solver=lf.EKFACSolver(damping=0.1), num_candidates=None, progress=False
    ).influence(query)
    assert torch.isfinite(ekfac).all()
    assert _corr(ekfac, exact) > 0.95


def test_torch_native_transformer_layer_gauss_newton_matches_float64() -> None:
    """``nn.TransformerEncoderLayer`` in eval takes a fused path with no forward mode: it is switched off."""
    from _models import torch_transformer

    model, train, query = torch_transformer()
    names = ["enc.layers.0.self_attn.in_proj_bias", "head.bias"]
    im = lf.InfluenceModule(
        model,
        train,
        params=names,
        solver=lf.ExactSolver(damping=0.1),
        num_candidates=None,
        curvature="gauss_newton",
        progress=False,
    )
    got = im.influence(query)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    ref = _reference(
        model,
        train,
        query,
        names,
        lambda call, b: call(b[0]),
        lambda lg, b: _token_mean_ce(lg, b[1], shift=False),
        0.1,
        "gauss_newton",
    )
    _agree(got, ref)


# ------------------------------------------------------------------------------------------------ bf16 / fp16
def _hf_causal_reference(model: nn.Module, train: Any, query: Any) -> Tensor:
    return _reference(
        model,
        train,
        query,
        GPT2_PARAMS,
        _hf_causal_logits,
        lambda lg, b: _token_mean_ce(lg, b["labels"], shift=True),
        0.1,
        "gauss_newton",
    )


def test_bf16_trained_model_explained_in_float32_without_being_changed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from _models import _batches, hf_gpt2, train_steps

    from lightning_fastif.functional.params import fingerprint

    model, train, query = hf_gpt2(n_train=16, steps=5)
    model = model.to(torch.bfloat16)
    train_steps(model, lambda b: model(**b).loss, _batches(train, 8), 3, lr=0.01)  # bf16 training steps
    before = fingerprint(model)
    im = lf.InfluenceModule(
        model,
        train,
        params=GPT2_PARAMS,
        solver=lf.ExactSolver(damping=0.1),
        num_candidates=None,
        curvature="gauss_newton",
        progress=False,
    )
    with caplog.at_level("INFO"):
        got = im.influence(query)
    assert got.dtype == torch.float32
    assert fingerprint(model) == before and next(model.parameters()).dtype == torch.bfloat16
    assert caplog.text.count("in float32") == 1
    _agree(got, _hf_causal_reference(model, train, query))  # float64 at the bf16 weights


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_predict_under_a_bf16_precision_plugin(precision: str) -> None:
    import lightning.pytorch as pl
    from _models import DictDataset, hf_gpt2
    from torch.utils.data import DataLoader

    model, train, query = hf_gpt2(n_train=16, steps=5)
    im = lf.InfluenceModule(
        model,
        train,
        params=GPT2_PARAMS,
        solver=lf.ExactSolver(damping=0.1),
        num_candidates=None,
        curvature="gauss_newton",
        top_k=3,
        progress=False,
    )
    trainer = pl.Trainer(
        precision=precision,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    results = [
        r for batch in trainer.predict(im, DataLoader(DictDataset(**query), batch_size=2)) for r in batch
    ]
    # bf16-mixed keeps float32 weights: the scores are those of float32 math (autocast would cost ~1e-3 relative);
    # bf16-true converts the weights: the scores are float32 math at the bf16 weights
    ref = _hf_causal_reference(model, train, query)
    for q, r in enumerate(results):
        want = ref[q][torch.as_tensor(r.helpful_ids, dtype=torch.long)]
        assert torch.allclose(torch.tensor(r.helpful_scores, dtype=torch.float64), want, rtol=2e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the CLI
_LM_CONFIG = """
model:
  class_path: _lm_cli.TinyGPT2LM
data:
  class_path: _lm_cli.TinyTextData
trainer:
  default_root_dir: {root}
  logger: false
  enable_progress_bar: false
ckpt_path: null
index_dir: null
output_dir: {out}
num_candidates: null
top_k: 3
report: true
loss: causal_lm
forward_fn: _lm_cli.call_lm
curvature: gauss_newton
params: [lm.transformer.h.1.attn.c_attn.bias]
solver:
  class_path: lightning_fastif.CGSolver
  init_args: {{damping: 0.1}}
queries: {{split: val, select: first, n: 2, batch_size: 2}}
"""


def test_cli_explains_a_language_model_from_yaml(tmp_path: Any) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    config = tmp_path / "lm.yaml"
    config.write_text(_LM_CONFIG.format(out=tmp_path / "out", root=tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]), OMP_NUM_THREADS="1")
    code = "from lightning_fastif.cli.app import main; main()"
    run = subprocess.run(
        [sys.executable, "-c", code, "influence", "-c", str(config)],
        env=env,
        cwd=tmp_path,  # nothing lands in the checkout
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "influence.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["helpful_ids"]) == 3 for r in records)
    assert "shifted" in json.dumps(records[0])  # the causal-LM preset's loss is recorded
    assert (tmp_path / "out" / "report.html").is_file()


def test_cli_loss_and_forward_settings_resolve_presets_and_import_paths() -> None:
    from lightning_fastif.cli.inputs import resolve_forward_setting, resolve_loss_setting

    causal = resolve_loss_setting("causal_lm")
    assert isinstance(causal, SequenceCrossEntropy) and causal.shift
    assert resolve_loss_setting("sequence_sum").reduction == "sum"
    assert (
        resolve_loss_setting("causal_lm_sum").shift
        and resolve_loss_setting("causal_lm_sum").reduction == "sum"
    )
    assert lf.SequenceCrossEntropy is SequenceCrossEntropy
    assert resolve_loss_setting(None) is None
    found = resolve_loss_setting("lightning_fastif.functional.sequence.SequenceCrossEntropy")  # a class: made
    assert isinstance(found, SequenceCrossEntropy) and not found.shift
    assert resolve_forward_setting("_lm_cli.call_lm").__name__ == "call_lm"
    with pytest.raises(ConfigurationError, match="`loss`"):
        resolve_loss_setting("causal")
    with pytest.raises(ConfigurationError, match="PYTHONPATH"):
        resolve_loss_setting("no_such_package.losses.my_loss")
    with pytest.raises(ConfigurationError, match="has no 'nope'"):
        resolve_forward_setting("_lm_cli.nope")


# ------------------------------------------------------------------------------------------------ token classification
def test_hf_token_classifier_needs_no_loss_fn_and_matches_float64() -> None:
    """``BertForTokenClassification`` (sdpa) with ``labels [B, T]`` (-100 on padding): a sequence loss, no shift."""
    from _models import DictDataset, _batches, _bert_config, _tokens, train_steps
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(_bert_config("sdpa", num_labels=3))
    data = _tokens(20, 8, 30, 0)
    data["labels"] = (data["input_ids"] % 3).masked_fill(data["attention_mask"] == 0, -100)
    train = DictDataset(**{k: v[:18] for k, v in data.items()})
    query = {k: v[18:] for k, v in data.items()}
    train_steps(model, lambda b: model(**b).loss, _batches(train, 6), 6, lr=0.01)
    names = ["bert.encoder.layer.0.attention.self.query.bias", "classifier.weight"]
    im = lf.InfluenceModule(
        model, train, params=names, solver=lf.ExactSolver(damping=0.1), num_candidates=None, progress=False
    )
    got = im.influence(query)
    assert im.loss.source == "sequence" and not im.loss.token_loss.shift
    ref = _reference(
        model,
        train,
        query,
        names,
        lambda call, b: call(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
        lambda lg, b: _token_mean_ce(lg, b["labels"], shift=False),
        0.1,
        "hessian",
    )
    _agree(got, ref)


def test_loss_exposes_its_token_losses_for_per_token_influence() -> None:
    """``im.loss.token_loss`` is the protocol object per-token influence reads: the resolved sequence loss, or a
    user's ``loss_fn`` with ``token_losses``; None for a per-example classification loss."""
    from lightning_fastif.functional.losses import resolve_loss

    class Mine:
        def token_losses(self, outputs: Tensor, batch: Any) -> Tensor:
            return outputs.logsumexp(-1)

        def __call__(self, outputs: Tensor, batch: Any) -> Tensor:
            return self.token_losses(outputs, batch).sum(-1)

    mine = Mine()
    assert resolve_loss(nn.Linear(2, 3), mine).token_loss is mine
    assert resolve_loss(nn.Linear(2, 3)).token_loss is None
    seq = resolve_loss(nn.Embedding(5, 4))
    batch = (torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, -100]]))
    losses = seq({}, batch)  # logits [1, 3, 4] with labels [1, 3]: the sequence loss, found at the first call
    assert seq.token_loss is not None and seq.source == "sequence"
    assert torch.equal(losses, seq.token_loss.token_losses(seq.outputs(batch), batch).sum(-1))
