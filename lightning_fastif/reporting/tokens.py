"""Per-token influence for people: a training sequence's text with its top tokens as a heatmap (HTML report), and
the top tokens as one line of text (W&B table, console).

The tokens come from ``InfluenceResult.top_tokens`` (``InfluenceModule(top_tokens=k)``): per listed training id,
``(position, token id, score)``. Green marks a helpful token (negative score: it lowers the query's loss), red a
harmful one; the stronger the colour, the larger ``|score|`` relative to the sequence's top token.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_fastif.reporting._items import as_lookup, split_item
from lightning_fastif.reporting.render import Decoder

__all__ = ["TOKEN_CSS", "TokenHeatmaps", "decode_token", "top_tokens_text"]

TOKEN_CSS = """
.tokens{margin-top:4px;padding:4px 6px;max-height:9em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere;
font:12px/1.6 ui-monospace,SFMono-Regular,Menlo,monospace;background:#fff;border:1px solid #e5e7eb;border-radius:4px}
.tokens span.t{border-radius:2px}.tokens .tk{color:#57606a;font-size:11px}
"""


def decode_token(token: int, decoder: Decoder | None) -> str:
    """One token id as text: ``decoder([id])`` for a callable (``tokenizer.decode``), a vocabulary's entry for a list
    or mapping, ``"[id]"`` without a decoder (or for an id the vocabulary does not hold)."""
    if decoder is None or token < 0:
        return f"[{token}]"
    if callable(decoder):
        return str(decoder([token]))
    if isinstance(decoder, Mapping):
        return str(decoder.get(token, f"[{token}]"))
    if isinstance(decoder, Sequence) and not isinstance(decoder, str) and 0 <= token < len(decoder):
        return str(decoder[token])
    return f"[{token}]"


def top_tokens_text(entries: Sequence[Sequence[Any]] | None, decoder: Decoder | None = None) -> str:
    """``'"tok"@3 -0.012; "x"@7 -0.004'``: the top tokens of one example, as one line (empty when there are none).

    Example:
        >>> top_tokens_text([(3, 7, -0.0123)], ["a"] * 7 + ["cat"])
        '"cat"@3 -0.0123'
    """
    if not entries:
        return ""
    return "; ".join(
        f"{json.dumps(decode_token(int(t), decoder), ensure_ascii=False)}@{int(p)} {float(s):+.3g}"
        for p, t, s in entries
    )


class TokenHeatmaps:
    """Renders the token heatmap of a training example from the report's ``train_lookup`` and ``decoder``.

    Args:
        train_lookup: training id -> item (a dict with ``input_ids`` and optionally ``attention_mask``, or an
            ``(ids, label)`` pair with a 1-D integer ``ids``); ``None``: only the top tokens are shown.
        decoder: turns token ids into text (``tokenizer.decode``, a list or a mapping); ``None``: ``[id]``.
    """

    def __init__(self, train_lookup: Any, decoder: Decoder | None) -> None:
        self._lookup = as_lookup(train_lookup, "train_lookup")
        self._decoder = decoder

    def for_result(self, result: Any) -> Callable[[int], str] | None:
        """``train id -> HTML`` for one result's listed examples, or None when it carries no top tokens."""
        top = getattr(result, "top_tokens", None)
        if not top:
            return None
        return lambda train_id: self.html(train_id, top.get(str(int(train_id))) or [])

    def _tokens(self, train_id: int) -> list[tuple[int, int]] | None:
        """``(position, token id)`` of the example's unmasked tokens, or None when its ids cannot be read."""
        if self._lookup is None:
            return None
        try:
            item = self._lookup(int(train_id))
        except Exception:  # the tile already says the input is unavailable
            return None
        mask = None
        if isinstance(item, Mapping):
            ids, mask = item.get("input_ids"), item.get("attention_mask")
        else:
            ids = split_item(item)[0]
        try:
            values = [int(v) for v in (ids.tolist() if hasattr(ids, "tolist") else ids)]
            keep = (
                [bool(m) for m in (mask.tolist() if hasattr(mask, "tolist") else mask)]
                if mask is not None
                else []
            )
        except (TypeError, ValueError):
            return None
        if len(keep) != len(values):
            keep = [True] * len(values)
        return [(pos, token) for pos, (token, k) in enumerate(zip(values, keep)) if k]

    def html(self, train_id: int, entries: Sequence[Sequence[Any]]) -> str:
        """The example's text with each top token coloured by its score (the top tokens alone when the text is not
        available)."""
        if not entries:
            return '<div class="tokens none">no token of this sign</div>'
        by_pos = {int(p): float(s) for p, _, s in entries}
        peak = max(abs(s) for s in by_pos.values()) or 1.0
        tokens = self._tokens(train_id)
        if tokens is None:  # no text: the top tokens alone
            tokens_html = " ".join(
                _span(decode_token(int(t), self._decoder), float(s), peak, int(p)) for p, t, s in entries
            )
            return f'<div class="tokens">{tokens_html}</div>'
        sep = "" if callable(self._decoder) else " "
        parts = []
        for pos, token in tokens:
            text = decode_token(token, self._decoder)
            parts.append(_span(text, by_pos[pos], peak, pos) if pos in by_pos else html.escape(text))
        return f'<div class="tokens">{sep.join(parts)}</div>'


def _span(text: str, score: float, peak: float, pos: int) -> str:
    alpha = 0.15 + 0.75 * min(1.0, abs(score) / peak)
    rgb = "45,164,78" if score < 0 else "207,34,46"
    return (
        f'<span class="t" style="background:rgba({rgb},{alpha:.2f})" title="position {pos}, score {score:+.4g}">'
        f"{html.escape(text)}</span>"
    )
