"""`Predictor.prepare` and `Predictor.judge`: reading and resizing an image apart from judging it (the server prepares
each request's image in its own thread while the model judges the batch before) gives what `predict` gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onenip.data.images import load_batch
from onenip.deploy.batching import Batcher
from onenip.deploy.predictor import Predictor
from onenip.errors import ConfigError, DatasetError


def _images(gen_data: Path) -> list[Path]:
    return sorted(gen_data.glob("*/test/*/*.png"))[::3][:7]


def test_prepared_and_judged_in_parts_equals_predict(tiny_model: Path, gen_data: Path) -> None:
    predictor = Predictor.load(tiny_model, device="cpu", batch_size=4)
    paths = _images(gen_data)
    want = predictor.predict(paths)
    with ThreadPoolExecutor(3) as pool:  # prepared in other threads, in any order
        prepared = list(pool.map(predictor.prepare, paths))
    first = prepared[0]
    assert first.source == str(paths[0]) and first.pixels.shape == (64, 64, 3) and first.pixels.dtype == np.uint8
    assert first.image.size == Image.open(paths[0]).size and first.image.mode == "RGB"
    got = predictor.judge(prepared[:3]) + predictor.judge(prepared[3:])  # batches cut elsewhere than predict's
    assert len(got) == len(want)
    with torch.no_grad():  # the deployed model on the evaluation's reader (load_batch), one batch: the reference
        ref = predictor.model(torch.from_numpy(load_batch(paths, 64)))
    assert [g.score for g in got] == pytest.approx(ref["score"].tolist(), rel=1e-5)
    assert [g.category for g in got] == [predictor.categories[int(c)] for c in ref["category"]]
    for g, w in zip(got, want):
        assert g.source == w.source and g.category == w.category and g.decision == w.decision
        assert g.score == pytest.approx(w.score, rel=1e-5)
        assert g.anomaly_map.shape == w.anomaly_map.shape  # back at the image's own size
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=1e-4, atol=1e-6)
        assert np.array_equal(g.mask, w.mask)
    assert predictor.judge([]) == []
    array = np.asarray(Image.open(paths[1]).convert("RGB"))
    assert predictor.prepare(array, index=5).source == "<image 5>"
    with pytest.raises(DatasetError, match="missing.png"):
        predictor.prepare(gen_data / "missing.png")


def test_the_batcher_judges_what_its_callers_prepared(tiny_model: Path, gen_data: Path) -> None:
    predictor = Predictor.load(tiny_model, device="cpu", batch_size=4)
    images = [Image.open(p) for p in _images(gen_data)]
    want = predictor.predict(images)
    batcher = Batcher(predictor, batch_size=4).start()
    try:
        got = batcher.predict(images)
    finally:
        batcher.close()
    assert [g.source for g in got] == [w.source for w in want]
    for g, w in zip(got, want):
        assert g.decision == w.decision and g.score == pytest.approx(w.score, rel=1e-5)
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=1e-4, atol=1e-6)
    assert batcher.images == len(images)


def test_judge_takes_images_with_and_without_a_given_type_together(tiny_model: Path, gen_data: Path) -> None:
    predictor = Predictor.load(tiny_model, device="cpu", batch_size=4)
    disc = sorted(gen_data.glob("disc/test/*/*.png"))[:2]
    plain = [predictor.prepare(p) for p in disc]
    typed = predictor.prepare(disc[0], product_type="weave")
    assert typed.given == predictor.categories.index("weave") and plain[0].given is None
    got = predictor.judge([plain[0], typed, plain[1]])  # the model takes a type for all images or none: two batches
    alone = predictor.judge(plain) + predictor.judge([typed])
    assert [g.category for g in got] == ["disc", "weave", "disc"]
    for g, w in zip(got, [alone[0], alone[2], alone[1]]):
        assert g.category == w.category and g.score == pytest.approx(w.score, rel=1e-5)
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="'gear' is not one of the model's product types: disc, weave"):
        predictor.prepare(disc[0], product_type="gear")
