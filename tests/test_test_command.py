"""`onenip test` on data other than the model's: a labelled folder in test layout is enough, and categories the model
was never trained on are named and left out unless asked for. Each test fails without the behaviour it names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import onenip
from onenip.errors import OnenipWarning


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    return tiny_model


def test_categories_the_model_never_saw_are_named_and_left_out(model: Path, gen_data: Path, tmp_path: Path) -> None:
    with pytest.warns(OnenipWarning, match=r"test categories bracket, grain are not among the model's \(disc, weave\): "
                                           r"their \d+ images are left out"):
        res = onenip.test(model, overrides=[f"data.roots=[{gen_data}]", "data.categories=[]"], output=tmp_path / "a",
                          progress=False)
    assert sorted(res.categories) == ["disc", "weave"]
    assert {r["category"] for r in res.scores} == {"disc", "weave"} and res.decisions is not None
    # asked for by name: evaluated, with a warning that other categories' prompts and thresholds judge them
    with pytest.warns(OnenipWarning, match="test categories grain are not among the model's: their images are judged"):
        res = onenip.test(model, overrides=[f"data.roots=[{gen_data}]", "data.categories=[disc, weave, grain]"],
                          output=tmp_path / "b", progress=False)
    assert sorted(res.categories) == ["disc", "grain", "weave"]


def test_a_labelled_folder_in_test_layout_is_enough(model: Path, gen_data: Path, tmp_path: Path) -> None:
    val = tmp_path / "val"
    for cat in ("disc", "weave"):
        for part in ("test", "ground_truth"):
            shutil.copytree(gen_data / cat / part, val / cat / part)
    with pytest.warns(OnenipWarning, match="the model's own prompt pool and fusion constant are used"):
        res = onenip.test(model, overrides=[f"data.roots=[{val}]", "data.categories=[]"], output=tmp_path / "out",
                          progress=False)
    assert sorted(res.categories) == ["disc", "weave"]
    assert res.decisions is not None, res.decisions_note  # the deployment's pool: predict's decisions, image for image
    with pytest.raises(onenip.DatasetError, match="the paper protocol needs the training images"):
        onenip.test(model, overrides=[f"data.roots=[{val}]", "data.categories=[]", "eval.protocol=paper"],
                    output=tmp_path / "p",
                    progress=False)
