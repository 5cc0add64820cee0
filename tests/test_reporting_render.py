"""Rendering rules: which inputs become images, which become text, and how images are sized."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.reporting.render import RenderedInput, png_data_uri, render_example


def test_string_is_text() -> None:
    rendered = render_example("a gripping film")
    assert rendered == RenderedInput("text", text="a gripping film")


@pytest.mark.parametrize(
    ("shape", "mode", "size"),
    [
        ((8, 8), "L", (64, 64)),
        ((1, 8, 8), "L", (64, 64)),
        ((3, 4, 6), "RGB", (66, 44)),  # [C, H, W]: width 6, height 4, upscaled by 11
        ((4, 6, 3), "RGB", (66, 44)),  # [H, W, C]
        ((28, 28), "L", (84, 84)),
        ((3, 32, 32), "RGB", (64, 64)),
    ],
)
def test_image_shaped_arrays_become_upscaled_images(
    shape: tuple[int, ...], mode: str, size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    rendered = render_example(torch.rand(shape))
    assert rendered.kind == "image"
    assert rendered.image is not None
    assert rendered.image.mode == mode
    assert rendered.image.size == size


def test_pixels_are_min_max_normalised_per_image_and_keep_their_layout() -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4) * 7.0 - 20.0
    image = render_example(x, min_size=1).image
    assert image is not None
    pixels = np.asarray(image)
    assert pixels.shape == (3, 4)
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels.ravel().astype(int)) > 0)  # row-major order preserved


def test_digits_vector_with_image_shape_is_a_visible_digit() -> None:
    from sklearn.datasets import load_digits

    vector = load_digits().data[0].astype(np.float32)  # 64 values in 0..16
    rendered = render_example(vector, image_shape=(8, 8))
    assert rendered.kind == "image"
    assert rendered.image is not None
    assert rendered.image.size == (64, 64)
    small = np.asarray(rendered.image.resize((8, 8), Image.Resampling.NEAREST)).astype(float)
    expected = (vector.reshape(8, 8) - vector.min()) / (vector.max() - vector.min()) * 255
    np.testing.assert_allclose(small, np.rint(expected), atol=1)


def test_flat_vector_without_image_shape_is_short_text() -> None:
    rendered = render_example(np.arange(64.0))
    assert rendered.kind == "text"
    assert rendered.text is not None
    assert rendered.text.startswith("array[64] float64")
    assert len(rendered.text) < 120


def test_image_shape_that_does_not_match_names_the_argument() -> None:
    with pytest.raises(ConfigurationError, match=r"`image_shape`.*64 elements"):
        render_example(np.zeros(64), image_shape=(7, 7))


@pytest.mark.parametrize(
    ("item", "text"),
    [
        ({"text": "plain", "label": 1}, "plain"),
        ({"sentence": "one sentence", "idx": 4}, "one sentence"),
        (
            {"premise": "A man sings.", "hypothesis": "Someone sings."},
            "premise: A man sings.\nhypothesis: Someone sings.",
        ),
    ],
)
def test_dicts_with_text_keys_are_text(item: dict, text: str) -> None:
    assert render_example(item) == RenderedInput("text", text=text)


def test_dict_with_image_key_renders_the_image() -> None:
    rendered = render_example({"image": torch.zeros(3, 16, 16), "label": 2})
    assert rendered.kind == "image"


def test_token_ids_are_decoded_with_a_vocabulary_or_a_callable() -> None:
    ids = torch.tensor([0, 2, 1])
    assert render_example(ids, decoder=["the", "movie", "great"]).text == "the great movie"
    assert render_example(ids, decoder={0: "a", 1: "b"}).text == "a [2] b"
    assert render_example({"input_ids": ids}, decoder=lambda t: "-".join(map(str, t))).text == "0-2-1"


def test_user_renderer_overrides_the_rules() -> None:
    assert render_example(np.zeros((8, 8)), renderer=lambda x: "custom").text == "custom"
    rendered = render_example("text", renderer=lambda x: Image.new("RGB", (10, 5)))
    assert rendered.image is not None and rendered.image.size == (70, 35)


def test_renderer_returning_something_else_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"`renderer`.*PIL.Image or a str.*int"):
        render_example("x", renderer=lambda x: 3)


def test_constant_and_non_finite_images_do_not_produce_nan() -> None:
    flat = np.asarray(render_example(np.full((8, 8), 3.0)).image)
    assert flat.min() == flat.max() == 0
    x = np.ones((8, 8))
    x[0, 0] = np.nan
    x[1, 1] = 2.0
    pixels = np.asarray(render_example(x, min_size=1).image)
    assert pixels[0, 0] == 0 and pixels[1, 1] == 255


def test_large_images_are_shrunk_to_max_size() -> None:
    rendered = render_example(np.random.default_rng(0).random((3, 512, 256)), max_size=128)
    assert rendered.image is not None and rendered.image.size == (64, 128)


def test_other_objects_become_a_short_repr() -> None:
    rendered = render_example(3.5)
    assert rendered == RenderedInput("text", text="3.5")
    assert len(render_example(list(range(10_000))).text or "") <= 600


def test_png_data_uri_round_trips() -> None:
    rendered = render_example(np.eye(8))
    uri = rendered.to_data_uri()
    assert uri.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.format == "PNG" and decoded.size == (64, 64)
    assert png_data_uri(b"\x89PNG") == "data:image/png;base64,iVBORw=="


def test_text_has_no_png() -> None:
    with pytest.raises(ConfigurationError, match=r"RenderedInput\.kind"):
        render_example("words").to_png_bytes()
