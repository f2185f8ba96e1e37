"""Prompt choice: the paper's random same-category prompt and class-agnostic retrieval from a pool (§3.5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from onenip.data import Sample
from onenip.models.prompts import PromptPool, descriptor, nearest, paper_prompts, pool_samples, type_keys


def _samples(split: str, per_cat: int, cats=("a", "b", "c")) -> list[Sample]:
    return [Sample(Path(f"/{split}/{c}/{i}.png"), c, 0, "good", None, split) for c in cats for i in range(per_cat)]


def test_paper_prompts_same_category_and_seeded() -> None:
    train, test = _samples("train", 10), _samples("test", 5)
    p1, p2, p3 = paper_prompts(test, train, 0), paper_prompts(test, train, 0), paper_prompts(test, train, 1)
    assert p1 == p2 and p1 != p3
    assert all(p.category == t.category and p.split == "train" for p, t in zip(p1, test))
    assert len({p.image for p in p1}) > 3  # redrawn per test image, not one fixed prompt
    with pytest.raises(ValueError, match="no training images"):
        paper_prompts(_samples("test", 1, cats=("z",)), train, 0)


def test_pool_samples_per_category_distinct() -> None:
    train = _samples("train", 6)
    pool = pool_samples(train, 4, seed=3)
    assert [s.category for s in pool] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert len({s.image for s in pool}) == 12
    assert len(pool_samples(train, 50, seed=3)) == 18  # capped at what a category has
    excl = {s.image for s in pool}
    other = pool_samples(train, 2, seed=3, exclude=excl)
    assert not ({s.image for s in other} & excl)


def test_retrieval_picks_most_similar() -> None:
    torch.manual_seed(0)
    feats = torch.rand(3, 8, 4, 4)
    pool = PromptPool(_samples("train", 1), feats)
    query = feats[[2, 0]] * 3.0 + 0.01 * torch.rand(2, 8, 4, 4)  # scale does not matter for cosine
    idx, sim = pool.retrieve(query)
    assert idx.tolist() == [2, 0]
    assert torch.all(sim > 0.99)
    d = descriptor(feats)
    assert torch.allclose(d.norm(dim=1), torch.ones(3))


def test_k_prompts_per_test_image() -> None:
    from onenip.models.prompts import paper_prompt_sets

    train, test = _samples("train", 10), _samples("test", 5)
    sets = paper_prompt_sets(test, train, 0, 4)
    assert [s[0] for s in sets] == paper_prompts(test, train, 0)  # K = 1 is the paper's prompt
    assert all(len(s) == 4 and all(p.category == t.category for p in s) for s, t in zip(sets, test))
    assert any(len({p.image for p in s}) > 1 for s in sets)
    torch.manual_seed(0)
    feats = torch.randn(6, 8, 3, 3)
    pool = PromptPool(_samples("train", 2)[:6], torch.randn(6, 8, 3, 3))
    j, sim = pool.retrieve_top(feats, 3)
    assert j.shape == sim.shape == (6, 3) and bool((sim[:, :-1] >= sim[:, 1:]).all())
    j1, s1 = pool.retrieve(feats)
    assert torch.equal(j[:, 0], j1) and torch.equal(sim[:, 0], s1)
    assert pool.retrieve_top(feats, 50)[0].shape == (6, 6)  # capped at the pool's size


def test_retrieval_within_a_given_type() -> None:
    """With each query's type given (eval.given_type, predict --type), the prompt is the most similar entry of that
    type (not merely one of its entries), even where another type's entry is more similar; and asking for more
    prompts than the type has returns only its own entries."""
    torch.manual_seed(0)
    feats = torch.randn(6, 8, 4, 4)  # types a, a, b, b, c, c
    pool = PromptPool(_samples("train", 2), feats)
    query = (feats[[4]] + 0.5 * feats[[3]]) * 3.0  # nearest overall: entry 4 (type c); within type b: entry 3
    cos = (descriptor(query) @ descriptor(feats).T)[0]
    assert int(cos.argmax()) == 4 and cos[3] > cos[2]  # the construction holds
    assert pool.retrieve_top(query, 1)[0][0, 0].item() == 4
    idx, sim = pool.retrieve_top(query, 1, ["b"])
    assert idx[0, 0].item() == 3
    assert sim[0, 0].item() == pytest.approx(float(descriptor(query) @ descriptor(feats[[3]]).T), abs=1e-6)
    idx, _ = pool.retrieve_top(query, 5, ["b"])  # type b has two entries
    assert sorted(idx[0].tolist()) == [2, 3]


def test_retrieval_takes_type_indices_mapped_once() -> None:
    """The types of a whole test set can be mapped to indices once (`type_indices`) and passed per batch: the result
    is the one the names give; an unknown name is refused with the pool's types."""
    torch.manual_seed(0)
    feats = torch.randn(6, 8, 4, 4)  # types a, a, b, b, c, c
    pool = PromptPool(_samples("train", 2), feats)
    query = torch.randn(3, 8, 4, 4)
    names = ["c", "a", "b"]
    index = pool.type_indices(names)
    assert index.dtype == torch.int64 and index.tolist() == [2, 0, 1]
    by_name, by_index = pool.retrieve_top(query, 2, names), pool.retrieve_top(query, 2, index)
    assert torch.equal(by_name[0], by_index[0]) and torch.equal(by_name[1], by_index[1])
    assert [[pool.categories[j] for j in row] for row in by_index[0].tolist()] == [["c", "c"], ["a", "a"], ["b", "b"]]
    with pytest.raises(ValueError, match="'z' is not in the prompt pool"):
        pool.retrieve_top(query, 1, ["a", "z", "b"])


def test_retrieval_by_type_mean() -> None:
    """eval.retrieval type_mean: the type whose entries' mean descriptor is most similar first, then its most similar
    entry, even where one entry of another type is the most similar of all; a given type still wins; an unknown rule
    is refused."""
    c = torch.zeros(5, 8, 1, 1)  # descriptors along axes: type a = entries 0, 1 (one close outlier), b = 2, 3, 4
    c[0, 0], c[1, 1] = 1.0, 1.0  # a: far apart
    c[2, 2], c[3, 2], c[3, 3], c[4, 2], c[4, 4] = 1.0, 1.0, 0.3, 1.0, 0.3  # b: all near axis 2
    samples = [Sample(Path(f"/t/{k}/{i}.png"), k, 0, "good", None, "train") for i, k in enumerate("aabbb")]
    query = torch.zeros(1, 8, 1, 1)
    query[0, 0], query[0, 2] = 1.0, 0.9  # closest single entry: 0 (type a); closest mean: type b
    plain, by_type = PromptPool(samples, c), PromptPool(samples, c, "type_mean")
    assert plain.retrieve(query)[0].item() == 0
    idx, sim = by_type.retrieve(query)
    assert idx.item() == 2 and by_type.categories[2] == "b"  # b's most similar entry (2 is b's purest)
    assert sim.item() == pytest.approx(float(descriptor(query) @ descriptor(c[[2]]).T), abs=1e-6)
    assert by_type.retrieve_top(query, 1, ["a"])[0].item() == 0  # a given type is not overruled
    assert by_type.retrieve_top(query, 5)[0].shape == (1, 3)  # only the retrieved type's entries
    means = type_keys(descriptor(c), torch.tensor([0, 0, 1, 1, 1]), 2)
    assert torch.allclose(means.norm(dim=1), torch.ones(2))
    assert torch.equal(nearest(descriptor(c), query, 1, None, (means, torch.tensor([0, 0, 1, 1, 1])))[0],
                       torch.tensor([[2]]))
    with pytest.raises(ValueError, match="unknown retrieval 'mean'"):
        PromptPool(samples, c, "mean")

