"""Per-token influence (issue 19, item 2): ``im.influence(batch, ids, per_token=True) -> [Q, n, T]`` on a tiny HF
GPT-2, against a float64 loop of per-token gradients by autograd; the top tokens in results, JSONL, HTML and W&B."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _lm import TokenCrossEntropy, tiny_gpt2
from torch.func import functional_call

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.tokens import token_scores, top_tokens
from lightning_fastif.results import InfluenceResult

PARAMS = ["transformer.h.0.attn.c_proj.*"]
DAMPING = 0.5


@pytest.fixture(scope="module")
def lm():
    return tiny_gpt2()


def _module(model, train, **kw):
    return lf.InfluenceModule(
        model,
        train,
        loss_fn=TokenCrossEntropy(),
        params=PARAMS,
        solver=lf.ExactSolver(damping=DAMPING),
        num_candidates=None,
        batch_size=5,
        progress=False,
        curvature="hessian",
        **kw,
    )


def _reference(model, train, query, ids):
    """float64: s_test from the explicit Hessian, then per-token gradients one token at a time by autograd."""
    m = copy.deepcopy(model).double().eval()
    names = [n for n, _ in m.named_parameters() if n.startswith("transformer.h.0.attn.c_proj.")]
    base = {n: p.detach() for n, p in m.named_parameters()}
    sizes = [base[n].numel() for n in names]
    theta = torch.cat([base[n].reshape(-1) for n in names])
    loss = TokenCrossEntropy()

    def tokens_at(flat, batch):
        ps = dict(base)
        for n, piece in zip(names, torch.split(flat, sizes)):
            ps[n] = piece.reshape(base[n].shape)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return loss.token_losses(functional_call(m, ps, (), inputs), batch)

    def one(ds, i):
        return {k: v[None] for k, v in ds[i].items()}

    n = len(train)
    hess = sum(torch.func.hessian(lambda t, b: tokens_at(t, b).sum())(theta, one(train, i)) for i in range(n))
    hess = hess / n + DAMPING * torch.eye(theta.numel(), dtype=torch.float64)
    q = {k: v for k, v in query.items()}
    gq = torch.stack(
        [
            torch.func.grad(lambda t, b: tokens_at(t, b).sum())(
                theta, {k: v[j : j + 1] for k, v in q.items()}
            )
            for j in range(q["input_ids"].shape[0])
        ]
    )
    s = torch.linalg.solve(hess, gq.T).T  # [Q, P]
    rows = []
    for i in ids:
        t_len = train[i]["input_ids"].shape[0]
        per_token = []
        for t in range(t_len):
            flat = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(tokens_at(flat, one(train, i))[0, t], flat, allow_unused=True)
            per_token.append(torch.zeros_like(theta) if g is None else g)
        rows.append(-s @ torch.stack(per_token).T)  # [Q, T]
    return torch.stack(rows, 1)  # [Q, n, T]


def test_per_token_influence_matches_a_float64_loop_of_per_token_gradients(lm):
    model, train, query = lm
    im = _module(model, train)
    ids = [0, 3, 5, 11]
    got = im.influence(query, ids, per_token=True)
    ref = _reference(model, train, query, ids)
    assert got.shape == ref.shape == (2, 4, 8)
    scale = ref.abs().max()
    assert (got.double() - ref).abs().max() / scale < 1e-4
    assert torch.corrcoef(torch.stack([got.double().flatten(), ref.flatten()]))[0, 1] > 0.99999
    # padding and position 0 contribute nothing: the token loss is 0 there
    mask = torch.stack([train[i]["attention_mask"] for i in ids]).bool()
    mask[:, 0] = False
    assert bool((got[:, ~mask] == 0).all())


def test_per_token_influence_adds_up_to_the_sequence_score(lm):
    model, train, query = lm
    im = _module(model, train)
    s = im.s_test(query)
    per_token = im.influence(query, None, per_token=True)
    seq = im.score(s, None)
    assert per_token.shape == (2, len(train), 8)
    torch.testing.assert_close(per_token.sum(-1), seq, rtol=1e-5, atol=1e-7)


def test_token_scores_sum_to_the_jvp_score_with_several_queries():
    from lightning_fastif.functional.params import ParamSpec
    from lightning_fastif.functional.scores import jvp_scores

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    params = {n: p.detach() for n, p in lin.named_parameters()}
    spec = ParamSpec.of(params)
    x = torch.randn(5, 3)

    def token_loss(p, b):
        return functional_call(lin, p, (b,)).pow(2)  # [B, 4]

    s = torch.randn(3, spec.numel)
    theta = spec.flatten(params)
    got = token_scores(token_loss, theta, spec, x, s)  # [B, Q, T]
    seq = jvp_scores(lambda p, b: token_loss(p, b).sum(1), theta, spec, x, s)  # [B, Q]
    torch.testing.assert_close(got.sum(-1), seq)
    # and each token against its own gradient
    for t in range(4):
        g = torch.func.jacrev(lambda th, t=t: token_loss(spec.unflatten(th), x)[:, t])(theta)  # [B, P]
        torch.testing.assert_close(got[:, :, t], -g @ s.T)


def test_top_tokens_keep_only_the_tokens_of_the_examples_sign():
    scores = torch.tensor([0.0, 0.3, -0.2, 0.5, -0.9])
    ids = torch.tensor([5, 6, 7, 8, 9])
    assert top_tokens(scores, ids, 3, 1) == [(3, 8, 0.5), (1, 6, pytest.approx(0.3))]
    assert top_tokens(scores, ids, 1, -1) == [(4, 9, pytest.approx(-0.9))]
    assert top_tokens(scores, None, 1, 1)[0][1] == -1


def test_per_token_without_token_losses_says_what_the_loss_needs(lm):
    model, train, query = lm
    loss = TokenCrossEntropy()
    plain = _module(model, train)
    plain.loss.loss_fn = lambda outputs, batch: loss(outputs, batch)  # no token_losses attribute
    with pytest.raises(ConfigurationError, match="token_losses"):
        plain.influence(query, [0], per_token=True)
    with pytest.raises(ConfigurationError, match="`top_tokens=3`.*token_losses"):
        lf.InfluenceModule(
            model, train, loss_fn=lambda o, b: loss(o, b), num_candidates=None, top_tokens=3, progress=False
        )
    with pytest.raises(ConfigurationError, match="`top_tokens`"):
        _module(model, train, top_tokens=-1)
    with pytest.raises(ConfigurationError, match="`per_token`"):
        _module(model, train).influence(query, [0], per_token="yes")


def test_results_carry_the_top_tokens_of_listed_examples_and_jsonl_keeps_them(lm, tmp_path):
    model, train, query = lm
    im = _module(model, train, top_k=3, top_tokens=2)
    results = im.explain(query)
    per_token = im.influence(query, None, per_token=True)
    for q, r in enumerate(results):
        assert r.top_tokens is not None
        assert set(r.top_tokens) == {str(i) for i in r.helpful_ids + r.harmful_ids}
        for i in r.helpful_ids:
            entries = r.top_tokens[str(i)]
            assert 1 <= len(entries) <= 2
            want = torch.argsort(per_token[q, i])[: len(entries)].tolist()
            assert [p for p, _, _ in entries] == want
            for pos, token, score in entries:
                assert token == int(train[i]["input_ids"][pos])
                assert score == pytest.approx(float(per_token[q, i, pos]), rel=1e-4, abs=1e-8)
                assert score < 0
        for i in r.harmful_ids:
            assert all(score > 0 for _, _, score in r.top_tokens[str(i)])
    line = json.dumps(results[0].to_dict())
    back = InfluenceResult.from_dict(json.loads(line))
    assert back.top_tokens == {k: [list(e) for e in v] for k, v in results[0].top_tokens.items()}
    assert _module(model, train, top_k=3).explain(query)[0].top_tokens is None


def _predict(model, train, query, tmp_path, decoder):
    import lightning.pytorch as pl
    from _models import DictDataset

    im = _module(model, train, top_k=2, top_tokens=3)
    report = lf.InfluenceReport(tmp_path, decoder=decoder, wandb=False)
    trainer = pl.Trainer(
        inference_mode=False,
        callbacks=[lf.InfluenceWriter(tmp_path), report],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(DictDataset(**query), batch_size=2)
    trainer.predict(im, dataloaders=loader)
    return report


def test_report_shows_the_training_text_as_a_token_heatmap_and_jsonl_keeps_top_tokens(lm, tmp_path):
    from lightning_fastif.reporting.jsonl import read_jsonl
    from lightning_fastif.reporting.wandb_table import WANDB_COLUMNS, build_rows

    model, train, query = lm
    vocab = [f"w{i}" for i in range(24)]
    report = _predict(model, train, query, tmp_path, vocab)
    results = read_jsonl(tmp_path / "influence.jsonl")
    assert len(results) == 2 and all(r.top_tokens for r in results)
    text = (tmp_path / "report.html").read_text()
    r = results[0]
    first = r.helpful_ids[0]
    pos, token, score = r.top_tokens[str(first)][0]
    span = f'title="position {pos}, score {score:+.4g}">w{token}</span>'
    assert span in text and "rgba(45,164,78," in text  # a helpful token is green
    # the unmarked tokens of the example's text are there too (the whole unmasked sequence, in order)
    length = int(train[first]["attention_mask"].sum())
    assert text.count('<div class="tokens">') == sum(len(x.helpful_ids) + len(x.harmful_ids) for x in results)
    assert length >= len(r.top_tokens[str(first)])
    rows = [dict(zip(WANDB_COLUMNS, row)) for row in build_rows(results, train, decoder=vocab)]
    cell = next(c["top_tokens"] for c in rows if c["query_id"] == r.query_id and c["train_id"] == first)
    assert cell.startswith(f'"w{token}"@{pos} ')
    assert report.html_path is not None


def test_token_heatmap_without_a_decoder_renders_ids():
    from lightning_fastif.reporting.tokens import TokenHeatmaps, top_tokens_text

    item = {"input_ids": torch.tensor([5, 6, 7, 0]), "attention_mask": torch.tensor([1, 1, 1, 0])}
    heat = TokenHeatmaps(lambda i: item, None)
    out = heat.html(0, [(2, 7, 0.5), (1, 6, 0.1)])
    assert '">[7]</span>' in out and '">[6]</span>' in out and "[5]" in out
    assert "[0]" not in out  # padding is not shown
    assert "rgba(207,34,46,0.90)" in out  # the strongest harmful token, full colour
    assert top_tokens_text([(2, 7, 0.5)], None) == '"[7]"@2 +0.5'
    assert top_tokens_text([(2, 7, 0.5)], lambda ids: "".join(chr(97 + i) for i in ids)) == '"h"@2 +0.5'


def test_per_token_on_a_default_hf_gpt2_with_the_found_loss_adds_up_and_credits_input_positions():
    """No loss_fn (the causal-LM loss is found), default sdpa attention and use_cache: per-token scores add up to the
    sequence scores, column 0 (predicted by nothing) is zero, and the scores equal a loop over the found loss's
    token losses shifted onto the input positions (column t = predicting token t)."""
    from _models import hf_gpt2

    model, train, query = hf_gpt2()
    im = lf.InfluenceModule(
        model, train, params=["transformer.h.1.mlp.c_proj.*"], solver=lf.ExactSolver(damping=0.1),
        num_candidates=None, progress=False,
    )  # fmt: skip
    ids = [0, 3, 5]
    tokens = im.influence(query, ids, per_token=True)
    seq = im.influence(query, ids)
    assert tokens.shape == (2, 3, query["input_ids"].shape[1])
    assert torch.allclose(tokens.sum(-1), seq, rtol=1e-4, atol=1e-6)
    assert torch.all(tokens[..., 0] == 0)
    # one token's score by its own gradient: -grad(token loss t of training row ids[1]) . s_test of query 0
    s = im.s_test(query)
    theta, spec = im._theta()
    row = {k: v.unsqueeze(0) for k, v in train[ids[1]].items()}
    t = int(torch.nonzero(tokens[0, 1].abs() > 0)[0])

    def token_loss(flat):
        out = functional_call(model, spec.unflatten(flat), args=(), kwargs={**row, "use_cache": False})
        return im.loss.token_loss.token_losses(out, row)[0, t]

    model.eval()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        g = torch.func.grad(token_loss)(theta.detach())
    want = -(g @ s[0])
    assert torch.allclose(tokens[0, 1, t], want, rtol=1e-3, atol=1e-6)
