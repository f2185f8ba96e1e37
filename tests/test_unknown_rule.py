"""The product-type check's rule: for each of the R product types most similar to an image (the retrieved one first),
its type distance and its colour distance as fractions of that type's limits, summed; the image is of an unknown type
when the least of those sums exceeds the level. Models calibrated before the rule keep theirs (either distance of the
retrieved type beyond its limit), and `onenip calibrate` gives them the new one. Each test fails without the
behaviour it names."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from onenip.api import make_config
from onenip.data import read_sources
from onenip.data.tensors import SampleImages
from onenip.errors import ConfigError
from onenip.evaluation.calibration import build_deployment, split_holdout
from onenip.models.deployment import Deployment
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel
from onenip.models.prompts import candidate_types, descriptor, nearest, type_keys, type_similarities
from onenip.models.scoring import (
    colour_column,
    colour_distance,
    colour_distances,
    patch_distances,
    type_distance,
    unknown_scores,
)

CATS = ["bracket", "disc", "grain", "weave"]


def test_the_summed_rule_joins_the_halves_and_takes_the_best_candidate() -> None:
    t = torch.tensor([[0.9, 3.0], [0.9, 0.2], [2.0, 0.5]])
    c = torch.tensor([[0.9, 0.1], [0.9, 0.3], [0.0, 0.5]])
    one = torch.ones(3, 2)
    # a little off in both halves of the first type: 1.8 summed (unknown at 1.65), 0.9 by the larger (known at 1)
    assert unknown_scores(t[:1, :1], one[:1, :1], c[:1, :1], one[:1, :1], summed=True).item() == pytest.approx(1.8)
    assert unknown_scores(t[:1, :1], one[:1, :1], c[:1, :1], one[:1, :1], summed=False).item() == pytest.approx(0.9)
    # the least over the candidates: a second type that takes the image makes it known
    torch.testing.assert_close(unknown_scores(t, one, c, one, summed=True), torch.tensor([1.8, 0.5, 1.0]))
    # fractions of each type's own limits; an infinite limit (no check) is a fraction 0
    limits = torch.tensor([[2.0, 1.0], [1.0, 1.0], [math.inf, 1.0]])
    torch.testing.assert_close(unknown_scores(t, limits, c, one, summed=True), torch.tensor([1.35, 0.5, 0.0]))
    # a limit of 0 (every normal image at distance 0): distance 0 passes, anything more is far
    zero = torch.zeros(2, 1)
    got = unknown_scores(torch.tensor([[0.0], [1e-6]]), zero, torch.zeros(2, 1), torch.ones(2, 1), summed=True)
    assert got[0].item() == 0.0 and got[1].item() > 1e5


def test_candidate_types_are_the_retrieved_one_then_the_most_similar_others() -> None:
    sims = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.1]])
    retrieved = torch.tensor([2, 0])  # not the most similar in the first row: it is still tried first
    assert candidate_types(sims, retrieved, 3).tolist() == [[2, 1, 3], [0, 2, 1]]
    assert candidate_types(sims, retrieved, 1).tolist() == [[2], [0]]
    assert candidate_types(sims, retrieved, 9).tolist() == [[2, 1, 3, 0], [0, 2, 1, 3]]  # capped at the types


@pytest.mark.parametrize("by_mean", [False, True])
def test_types_are_ranked_as_retrieval_ranks_them(by_mean: bool) -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(7, 16, 3, 3, generator=g)
    kind = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    keys = descriptor(pool)
    feats = torch.randn(5, 16, 3, 3, generator=g)
    means = type_keys(keys, kind, 3) if by_mean else None
    sims = type_similarities(keys, feats, kind, 3, means)
    q = descriptor(feats)
    want = q @ means.T if by_mean else torch.stack([(q @ keys[kind == k].T).amax(1) for k in range(3)], 1)
    torch.testing.assert_close(sims, want)
    best, _ = nearest(keys, feats, 1, None, (means, kind) if by_mean else None)
    assert torch.equal(sims.argmax(1), kind[best[:, 0]])  # the most similar type is the retrieved one


@pytest.fixture(scope="module")
def four_types(gen_data: Path) -> tuple[Detector, list]:
    """An untrained small detector (the check reads the frozen backbone and the colours alone) deployed on the four
    generated types, trying two candidate types, and the test images of all four."""
    cfg = make_config(None, [f"data.roots=[{gen_data}]", "data.input_size=64", "data.workers=0",
                             "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
                             "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "model.refiner_channels=32",
                             "train.device=cpu", "eval.batch_size=16", "eval.prompt_pool=3", "data.holdout=0.25",
                             "eval.unknown_candidates=2", "eval.colour_margin=1.5"])
    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    train, held = split_holdout(read_sources(cfg.data.roots, "train", CATS), cfg.data.holdout, cfg.train.seed)
    det.extra.update(categories=CATS, holdout=[str(s.image) for s in held])  # what Trainer records
    det.deployment = build_deployment(det, train, held, far=0.1, cfg=cfg)
    return det, read_sources(cfg.data.roots, "test", CATS)


def _images(samples: list, size: int) -> torch.Tensor:
    return torch.stack([SampleImages(samples, size)[i]["image"] for i in range(len(samples))])


def test_the_deployed_model_applies_the_rule_to_its_two_most_similar_types(four_types) -> None:
    """Recomputed type by type, in plain loops: the two types whose pool images are most similar to the image, each
    one's type distance over its limit plus its colour distance over its limit, the least of the two at most 1.65."""
    det, test = four_types
    assert det.deployment.unknown_rule == (1.65, 2, True)
    # disc's limits shrunk (its images refused by it), bracket's (the type most like disc) widened and grain's
    # narrowed: some images are known through their second type only, some not at all
    dep = det.deployment
    grow = {"disc": 0.01, "bracket": 10.0, "grain": 0.7, "weave": 1.0}
    dep = dataclasses.replace(dep, type_thresholds={c: v * grow[c] for c, v in dep.type_thresholds.items()},
                              colour_models={c: {**m, "limit": m["limit"] * grow[c]} for c, m in dep.colour_models.items()})
    images = _images(test, 64)
    model = DeployModel(det, dep)
    with torch.no_grad():
        out = model(images)
        feats = det.extractor.combine(det.extractor.taps(images))
        whitening, colour_limits = dep.colour_check(dep.categories)
        colour = colour_column(images, model.texture)
        fractions = []
        for k, cat in enumerate(dep.categories):
            t = type_distance(patch_distances(feats, model.type_bank[k][None].expand(len(images), -1, -1)))
            c = colour_distance(colour, whitening[k][None].expand(len(images), -1, -1))
            fractions.append(t / dep.type_thresholds[cat] + c / colour_limits[k])
        fractions = torch.stack(fractions, 1)  # (N, 4)
        q = descriptor(feats)
        pool_kind = model.pool_category
        sims = torch.stack([(q @ model.pool_keys[pool_kind == k].T).amax(1) for k in range(4)], 1)
    top2 = sims.topk(2, dim=1).indices
    assert torch.equal(top2[:, 0], out["category"])
    want = fractions.gather(1, top2).amin(1) <= 1.65
    assert torch.equal(out["known"], want)
    assert bool((fractions.gather(1, top2[:, :1])[:, 0] > 1.65)[want].any()), "none known by its second type alone"
    assert not bool(want.all()), "every image known"
    torch.testing.assert_close(out["type_distance"], fractions.new_tensor(  # the retrieved type's, as before
        [type_distance(patch_distances(feats[i:i + 1], model.type_bank[int(k)][None])).item()
         for i, k in enumerate(out["category"])]), rtol=1e-5, atol=1e-6)


def test_a_second_candidate_type_takes_an_image_its_retrieved_type_refuses(four_types) -> None:
    """disc's limits shrunk to nothing: its images are refused by disc, and known only when another type (its
    limits made wide) is tried; given its type (predict --type), disc alone is tried."""
    det, test = four_types
    disc = [s for s in test if s.category == "disc"]
    images = _images(disc, 64)
    dep = det.deployment
    wide = {c: 1e6 for c in dep.categories}
    dep = dataclasses.replace(dep, type_thresholds={**wide, "disc": 1e-9}, colour_models={})
    with torch.no_grad():
        alone = DeployModel(det, dataclasses.replace(dep, unknown_candidates=1))(images)
        tried = DeployModel(det, dep)(images)
        given = DeployModel(det, dep)(images, torch.full((len(disc),), dep.categories.index("disc")))
    retrieved_disc = alone["category"] == dep.categories.index("disc")
    assert bool(retrieved_disc.any())
    assert not bool(alone["known"][retrieved_disc].any())  # disc alone refuses them
    assert bool(tried["known"].all())  # the next most similar type takes them
    assert not bool(given["known"].any()) and not bool(given["anomalous"].any())  # given disc: disc alone


def test_colour_distances_to_several_types_are_each_types_distance() -> None:
    g = torch.Generator().manual_seed(1)
    mean = torch.rand(3, 4, generator=g)
    a = torch.randn(3, 4, 4, generator=g)
    precision = a @ a.transpose(1, 2) + torch.eye(4)
    from onenip.models.scoring import colour_whitening

    w = colour_whitening(mean, precision)
    colour = torch.rand(5, 4, 1, generator=g)
    candidates = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1], [1, 0]])
    got = colour_distances(colour, w, candidates)
    for i in range(5):
        for j in range(2):
            d = colour[i, :, 0] - mean[candidates[i, j]]
            assert got[i, j].item() == pytest.approx(float(d @ precision[candidates[i, j]] @ d) ** 0.5, rel=1e-4)


def test_a_model_calibrated_before_the_rule_keeps_its_own_and_calibrate_gives_it_the_new_one(
        tiny_model: Path, gen_data: Path, tmp_path: Path) -> None:
    from onenip.api import calibrate

    det = Detector.load(tiny_model)
    tensors, meta = det.deployment.to_state()
    assert meta["unknown_level"] == 1.65 and meta["unknown_candidates"] == 3
    for key in ("unknown_level", "unknown_candidates"):  # as models written before the rule
        del meta[key]
    old = Deployment.from_state(tensors, meta)
    assert old.unknown_rule == (1.0, 1, False)
    images = _images([s for s in read_sources([str(gen_data)], "test") if s.label == 0], 64)
    model = DeployModel(det, old)
    with torch.no_grad():
        out = model(images)
    by_halves = (out["type_distance"] <= model.type_limits[out["category"]]) & \
        (out["colour_distance"] <= model.colour_limits[out["category"]])
    assert torch.equal(out["known"], by_halves)  # either half beyond the retrieved type's limit: unknown
    det.deployment = old
    _, after, _ = calibrate(det.save(tmp_path / "old.safetensors"), output=tmp_path / "new.safetensors")
    assert after.unknown_rule == (1.65, 3, True)
    assert Deployment.from_state(*after.to_state()).unknown_rule == (1.65, 3, True)  # saved with the model


def test_the_rule_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown_level"):
        make_config(None, ["eval.unknown_level=0"])
    with pytest.raises(ConfigError, match="unknown_candidates"):
        make_config(None, ["eval.unknown_candidates=0"])
    feats = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ConfigError, match="unknown-type level"):
        Deployment(feats, ["a"], ["a.png"], None, {"a": 1.0}, unknown_level=-1.0)
    with pytest.raises(ConfigError, match="candidate type"):
        Deployment(feats, ["a"], ["a.png"], None, {"a": 1.0}, unknown_level=1.0, unknown_candidates=0)


def test_evaluation_decides_unknown_as_the_deployed_model_over_the_candidates(four_types) -> None:
    """`onenip test` (clean protocol) records each image's unknown score and decides known as the deployed model,
    second candidate included (limits changed as above, so that it decides some images)."""
    from onenip.evaluation.evaluate import evaluate

    det, test = four_types
    dep = det.deployment
    grow = {"disc": 0.01, "bracket": 10.0, "grain": 0.7, "weave": 1.0}
    changed = dataclasses.replace(dep, type_thresholds={c: v * grow[c] for c, v in dep.type_thresholds.items()},
                                  colour_models={c: {**m, "limit": m["limit"] * grow[c]}
                                                 for c, m in dep.colour_models.items()})
    det.deployment = changed
    try:
        res = evaluate(det, det.cfg, progress=False)
    finally:
        det.deployment = dep
    assert res.decisions is not None, res.decisions_note
    rows = {r["image"]: r for r in res.scores}
    with torch.no_grad():
        out = DeployModel(det, changed)(_images(test, 64))
    known = [rows[str(s.image)]["known"] for s in test]
    assert known == out["known"].tolist()
    assert 0 < sum(known) < len(known)
    alone = DeployModel(det, dataclasses.replace(changed, unknown_candidates=1))
    with torch.no_grad():
        assert not torch.equal(alone(_images(test, 64))["known"], out["known"])  # the second candidate mattered


def test_the_nearest_patch_is_found_in_blocks_as_argmax_finds_it() -> None:
    from onenip.models.scoring import NEAREST_BLOCK, _argmax_last, pad_banks, type_banks

    g = torch.Generator().manual_seed(2)
    for m in (NEAREST_BLOCK * 49, NEAREST_BLOCK * 2, 50, NEAREST_BLOCK):
        x = torch.randn(2, 7, m, generator=g)
        assert torch.equal(_argmax_last(x), x.argmax(dim=2)), m
        ties = torch.randint(0, 4, (2, 7, m), generator=g).float()  # many equal maxima: the first, as argmax
        assert torch.equal(_argmax_last(ties), ties.argmax(dim=2)), m
    banks = type_banks(torch.randn(5, 8, 3, 3, generator=g), torch.tensor([0, 0, 1, 1, 1]), 2, NEAREST_BLOCK)
    assert banks.shape == (2, NEAREST_BLOCK, 8)  # 18 and 27 patches, both padded to a multiple of the block
    assert torch.equal(pad_banks([banks[0, :5]], 4)[0], torch.cat([banks[0, :5], banks[0, :3]]))  # repeated


def test_the_type_check_compares_a_coreset_of_each_types_prompt_patches(four_types) -> None:
    """A model fit builds compares each query with a k-center coreset of its candidate types' prompt patches (the
    added types' bank rule: a quarter, at least one image's worth); a model built before, with every patch."""
    from onenip.models.scoring import bank_size, coreset, type_bank

    det, _ = four_types
    dep = det.deployment
    assert dep.type_coresets and Deployment.from_state(*dep.to_state()).type_coresets
    reduced = DeployModel(det, dep).type_bank
    full = DeployModel(det, dataclasses.replace(dep, type_coresets=False)).type_bank
    for k, cat in enumerate(dep.categories):
        feats = dep.pool_feats[[i for i, c in enumerate(dep.pool_categories) if c == cat]].float()
        size = bank_size(feats.shape[0], feats.shape[2] * feats.shape[3])
        assert size < feats.shape[0] * feats.shape[2] * feats.shape[3]  # three pool images: fewer patches kept
        torch.testing.assert_close(reduced[k, :size], coreset(type_bank(feats), size))
        torch.testing.assert_close(full[k, :len(type_bank(feats))], type_bank(feats))


def _as_before_the_rule(dep: Deployment) -> Deployment:
    tensors, meta = dep.to_state()
    for key in ("unknown_level", "unknown_candidates", "type_coresets"):  # as models written before the rule
        del meta[key]
    return Deployment.from_state(tensors, meta)


def test_calibrate_sets_an_older_models_type_limits_again_on_the_coresets(four_types, tmp_path: Path) -> None:
    """Limits set on every patch, the model's until now, are set again on the coresets it compares now: three pool
    images a type, of whose 48 patches the coreset keeps 16, so every type's limit grows."""
    from onenip.api import calibrate

    det, _ = four_types
    built = det.deployment
    old = dataclasses.replace(built, type_coresets=False, unknown_level=None, unknown_candidates=1)
    old_model = DeployModel(det, old)  # its limits as fit set them on every patch
    det.deployment = old
    try:
        from onenip.evaluation.calibration import type_check_images, type_limits

        normal = read_sources(det.cfg.data.roots, "train", CATS)
        full, _ = type_limits(old_model, type_check_images(normal, set(old.pool_images), det.cfg.eval.seed), 1.2, 16)
        det.deployment = dataclasses.replace(old, type_thresholds=full)
        path = det.save(tmp_path / "old.safetensors")
    finally:
        det.deployment = built
    before = Detector.load(path).deployment
    assert not before.type_coresets and before.unknown_rule == (1.0, 1, False)
    _, after, _ = calibrate(path, output=tmp_path / "new.safetensors")
    assert after.type_coresets and after.unknown_rule == (1.65, 2, True)
    for c in CATS:
        assert after.type_thresholds[c] == pytest.approx(1.2 * after.calibration[c]["largest_type_distance"], rel=1e-6)
        assert after.type_thresholds[c] > before.type_thresholds[c] * 1.01  # the coreset lies farther than every patch
    assert after.type_thresholds == pytest.approx(built.type_thresholds, rel=1e-5)  # as fit sets them on coresets


def test_calibrate_keeps_the_limits_of_an_older_model_with_an_added_type(tiny_model: Path, gen_data: Path,
                                                                        tmp_path: Path) -> None:
    from onenip.api import calibrate
    from onenip.evaluation.calibration import add_type

    det = Detector.load(tiny_model)
    old = _as_before_the_rule(det.deployment)
    assert not old.type_coresets
    grain = [s.image for s in read_sources([str(gen_data)], "train", ["grain"])][:4]
    det.deployment = old
    det.deployment = add_type(det, "grain", grain)  # an added type's limit comes from its own images
    assert not det.deployment.type_coresets
    old = det.deployment
    _, kept, _ = calibrate(det.save(tmp_path / "added.safetensors"), output=tmp_path / "kept.safetensors")
    assert not kept.type_coresets and kept.type_thresholds == old.type_thresholds
