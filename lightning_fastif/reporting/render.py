"""Turn a dataset input into something a person can look at: an image or a piece of text.

The rules, in order (the first that applies wins):

1. a user ``renderer(x)`` returning a ``PIL.Image`` or a ``str`` overrides everything;
2. a ``PIL.Image`` is an image and a ``str`` is text;
3. a mapping with a text key (``"text"``, ``"sentence"``, ``"premise"``/``"hypothesis"``...) is text; one with an
   ``"image"`` or ``"pixel_values"`` key is rendered from that value;
4. an array (torch tensor or numpy) of shape ``[H, W]``, ``[1, H, W]``, ``[3, H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``
   is an image, min-max normalised to 0..255 per image;
5. a flat vector with ``image_shape`` given (``(8, 8)`` for scikit-learn digits) is reshaped into that image;
6. a flat integer vector with a ``decoder`` (a tokenizer's ``decode`` or a vocabulary) is decoded into text;
7. anything else becomes a short text summary.

Small images are upscaled with nearest-neighbour so that an 8x8 digit is visible, large ones are shrunk.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from lightning_fastif.errors import ConfigurationError, expected

Renderer = Callable[[Any], "Image.Image | str"]
Decoder = Callable[[list[int]], str] | Sequence[str] | Mapping[int, str]

_TEXT_KEYS = ("text", "sentence", "premise", "hypothesis", "sentence1", "sentence2", "question", "context")
_IMAGE_KEYS = ("image", "img", "pixel_values")


@dataclass(frozen=True)
class RenderedInput:
    """A dataset input made viewable: exactly one of ``image`` and ``text`` is set.

    Attributes:
        kind: ``"image"`` or ``"text"``.
        image: an RGB or greyscale ``PIL.Image`` (already resized for display) when ``kind == "image"``.
        text: the text to show when ``kind == "text"``.
    """

    kind: Literal["image", "text"]
    image: Image.Image | None = None
    text: str | None = None

    def to_png_bytes(self) -> bytes:
        """The image encoded as PNG; only valid for images."""
        if self.image is None:
            raise ConfigurationError(expected("RenderedInput.kind", "'image' to encode a PNG", self.kind))
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    def to_data_uri(self) -> str:
        """The image as a ``data:image/png;base64,...`` URI, for self-contained HTML (encoded once, then cached)."""
        return self._data_uri

    @functools.cached_property
    def _data_uri(
        self,
    ) -> str:  # cached_property writes the instance __dict__ directly, so frozen is no obstacle
        return png_data_uri(self.to_png_bytes())


def png_data_uri(png: bytes) -> str:
    """Wrap PNG bytes in a base64 data URI.

    Example:
        >>> png_data_uri(b"\\x89PNG")
        'data:image/png;base64,iVBORw=='
    """
    if not isinstance(png, (bytes, bytearray, memoryview)):
        raise ConfigurationError(expected("png", "bytes", type(png).__name__))
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def render_example(
    x: Any,
    image_shape: Sequence[int] | None = None,
    decoder: Decoder | None = None,
    renderer: Renderer | None = None,
    *,
    min_size: int = 64,
    max_size: int = 256,
    max_chars: int = 600,
) -> RenderedInput:
    """Render one dataset input as an image or as text (see the module docstring for the rules).

    Args:
        x: the input: a tensor, numpy array, ``PIL.Image``, string, mapping, or anything else.
        image_shape: shape of the image a flat vector holds, ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with
            ``C`` in {1, 3}, e.g. ``(8, 8)`` for scikit-learn digits.
        decoder: turns a flat integer vector of token ids into text: a callable (``tokenizer.decode``), a list
            of tokens indexed by id, or a mapping id -> token.
        renderer: overrides every rule: ``renderer(x)`` returns a ``PIL.Image`` or a ``str``.
        min_size: images whose longer side is smaller are upscaled (nearest-neighbour, integer factor) to at
            least this many pixels on that side.
        max_size: images whose longer side is larger are shrunk to this many pixels.
        max_chars: text longer than this is cut and ends with an ellipsis.

    Returns:
        A :class:`RenderedInput`.

    Example:
        >>> import numpy as np
        >>> r = render_example(np.arange(64.0), image_shape=(8, 8))
        >>> r.kind, r.image.size
        ('image', (64, 64))
        >>> render_example({"text": "a good movie"}).text
        'a good movie'
    """
    if not isinstance(min_size, int) or min_size < 1:
        raise ConfigurationError(expected("min_size", "a positive int", min_size))
    if not isinstance(max_size, int) or max_size < min_size:
        raise ConfigurationError(expected("max_size", f"an int >= min_size ({min_size})", max_size))
    if renderer is not None:
        return _from_renderer(renderer, x, min_size, max_size, max_chars)
    if isinstance(x, RenderedInput):
        return x
    if isinstance(x, Image.Image):
        return RenderedInput("image", image=_resize(x, min_size, max_size))
    if isinstance(x, str):
        return RenderedInput("text", text=_clip(x, max_chars))
    if isinstance(x, Mapping):
        return _from_mapping(x, image_shape, decoder, min_size, max_size, max_chars)
    array = _as_array(x)
    if array is not None:
        return _from_array(array, image_shape, decoder, min_size, max_size, max_chars)
    return RenderedInput("text", text=_clip(repr(x), max_chars))


def _from_renderer(renderer: Renderer, x: Any, min_size: int, max_size: int, max_chars: int) -> RenderedInput:
    if not callable(renderer):
        raise ConfigurationError(expected("renderer", "a callable returning a PIL.Image or a str", renderer))
    out = renderer(x)
    if isinstance(out, RenderedInput):
        return out
    if isinstance(out, Image.Image):
        return RenderedInput("image", image=_resize(out, min_size, max_size))
    if isinstance(out, str):
        return RenderedInput("text", text=_clip(out, max_chars))
    raise ConfigurationError(
        expected("renderer", "a callable returning a PIL.Image or a str", type(out).__name__)
    )


def _from_mapping(
    x: Mapping[Any, Any],
    image_shape: Sequence[int] | None,
    decoder: Decoder | None,
    min_size: int,
    max_size: int,
    max_chars: int,
) -> RenderedInput:
    keys = [key for key in _TEXT_KEYS if isinstance(x.get(key), str)]
    if len(keys) == 1:
        return RenderedInput("text", text=_clip(x[keys[0]], max_chars))
    if keys:  # a sentence pair: say which part is which
        return RenderedInput("text", text=_clip("\n".join(f"{k}: {x[k]}" for k in keys), max_chars))
    for key in _IMAGE_KEYS:
        if key in x:
            return render_example(
                x[key], image_shape, decoder, min_size=min_size, max_size=max_size, max_chars=max_chars
            )
    if "input_ids" in x and decoder is not None:
        return render_example(x["input_ids"], None, decoder, max_chars=max_chars)
    return RenderedInput("text", text=_clip(_short_repr(x), max_chars))


def _from_array(
    array: np.ndarray,
    image_shape: Sequence[int] | None,
    decoder: Decoder | None,
    min_size: int,
    max_size: int,
    max_chars: int,
) -> RenderedInput:
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if math.prod(shape) != array.size or _image_layout(shape) is None:
            raise ConfigurationError(
                expected(
                    "image_shape",
                    f"(H, W), (C, H, W) or (H, W, C) with C in {{1, 3}} and {array.size} elements in all",
                    image_shape,
                )
            )
        array = array.reshape(shape)
    if array.ndim == 1 and decoder is not None and np.issubdtype(array.dtype, np.integer):
        return RenderedInput("text", text=_clip(_decode(decoder, array.tolist()), max_chars))
    layout = _image_layout(array.shape)
    if layout is None:
        return RenderedInput("text", text=_clip(_short_repr(array), max_chars))
    return RenderedInput("image", image=_resize(_to_image(array, layout), min_size, max_size))


def _as_array(x: Any) -> np.ndarray | None:
    """A numpy copy of a tensor or array, or None for anything else (no torch import needed)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):  # torch.Tensor
        tensor = x.detach().cpu()
        if getattr(tensor, "dtype", None) is not None and "bfloat16" in str(tensor.dtype):
            tensor = tensor.float()
        return tensor.numpy()
    return None


def _image_layout(shape: Sequence[int]) -> Literal["hw", "chw", "hwc"] | None:
    if len(shape) == 2 and min(shape) >= 2:
        return "hw"
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 2:
        return "chw"
    if len(shape) == 3 and shape[2] in (1, 3) and min(shape[:2]) >= 2:
        return "hwc"
    return None


def _to_image(array: np.ndarray, layout: str) -> Image.Image:
    data = np.asarray(array, dtype=np.float64)
    if layout == "chw":
        data = np.moveaxis(data, 0, -1)
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    finite = np.isfinite(data)
    if not finite.any():
        data = np.zeros_like(data)
    else:
        low, high = float(data[finite].min()), float(data[finite].max())
        data = np.where(finite, data, low)
        data = (data - low) / (high - low) if high > low else np.zeros_like(data)
    pixels = np.clip(np.rint(data * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")


def _resize(image: Image.Image, min_size: int, max_size: int) -> Image.Image:
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    longest = max(image.size)
    if longest < min_size:
        factor = math.ceil(min_size / longest)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if longest > max_size:
        scale = max_size / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.LANCZOS)
    return image


def _decode(decoder: Decoder, ids: list[int]) -> str:
    if callable(decoder):
        return str(decoder(ids))
    if isinstance(decoder, Mapping):
        return " ".join(str(decoder.get(i, f"[{i}]")) for i in ids)
    if isinstance(decoder, Sequence) and not isinstance(decoder, str):
        return " ".join(str(decoder[i]) if 0 <= i < len(decoder) else f"[{i}]" for i in ids)
    raise ConfigurationError(
        expected("decoder", "a callable, a list of tokens or a mapping id -> token", type(decoder).__name__)
    )


def _short_repr(x: Any) -> str:
    if isinstance(x, np.ndarray):
        head = np.array2string(x.ravel()[:8], precision=3, separator=", ")
        more = ", ..." if x.size > 8 else ""
        return f"array{list(x.shape)} {x.dtype}: {head.rstrip(']')}{more}]"
    return repr(x)


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(0, max_chars - 1)] + "…"
