"""Choosing the normal image prompt of a test image.

- paper protocol (the authors' code, §6): a random normal training image of the test image's TRUE category, drawn
  independently for each test image (here seeded by (seed, index) so a run repeats exactly);
- clean protocol (the retrieval of the paper's §3.5, never run by the authors' code): the category is not given. A
  pool holds a few normal training images of every category (the paper's §3.5 selects one per class: `eval.prompt_pool=1`); a
  test image takes the pool image whose spatially averaged backbone features are most similar (cosine) to its own.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import Tensor

from onenip.data import Sample, group_by_category
from onenip.errors import OnenipWarning
from onenip.models.scoring import type_banks


def paper_prompts(test: list[Sample], train: list[Sample], seed: int) -> list[Sample]:
    """For each test sample, a random training sample of the same category (seeded by (seed, index))."""
    return [p[0] for p in paper_prompt_sets(test, train, seed, 1)]


def paper_prompt_sets(test: list[Sample], train: list[Sample], seed: int, k: int) -> list[list[Sample]]:
    """For each test sample, k random training samples of its category (with replacement; seeded by (seed, index)).
    The first is the one `paper_prompts` draws."""
    by_cat = group_by_category(train)
    out = []
    for i, s in enumerate(test):
        members = by_cat.get(s.category)
        if not members:
            raise ValueError(f"category {s.category!r} has test images but no training images to draw a prompt from")
        out.append([members[int(j)] for j in np.random.default_rng([seed, i]).integers(len(members), size=k)])
    return out


def pool_samples(train: list[Sample], per_category: int, seed: int, exclude: set = frozenset()) -> list[Sample]:
    """`per_category` distinct training samples of every category, drawn with a seeded generator."""
    out: list[Sample] = []
    for c, (cat, members) in enumerate(group_by_category(train).items()):
        kept = [m for m in members if m.image not in exclude]
        if not kept and exclude:
            warnings.warn(f"category {cat}: all its {len(members)} training images are excluded (e.g. all in the "
                          "prompt pool); drawing from them anyway", OnenipWarning, stacklevel=2)
        members = kept or members
        rng = np.random.default_rng([seed, c, 0xB001])
        take = rng.choice(len(members), size=min(per_category, len(members)), replace=False)
        out.extend(members[int(i)] for i in sorted(take))
    return out


def descriptor(feats: Tensor) -> Tensor:
    """(B, C, H, W) features -> (B, C) unit-norm spatial means."""
    return torch.nn.functional.normalize(feats.float().mean(dim=(2, 3)), dim=1)


RETRIEVALS = ("nearest", "type_mean")
"""How a query finds its prompt (eval.retrieval): the most similar pool entry of all (the paper's), or the type whose
mean descriptor is most similar first and then the most similar entry of that type (`nearest`'s `kinds`)."""


def type_keys(keys: Tensor, kind: Tensor, n: int) -> Tensor:
    """Pool descriptors (P, C) and each entry's type index (P,) -> (n, C) each type's unit-norm mean descriptor."""
    sums = torch.zeros(n, keys.shape[1], dtype=keys.dtype, device=keys.device).index_add_(0, kind.to(keys.device), keys)
    return torch.nn.functional.normalize(sums, dim=1)


def nearest(keys: Tensor, feats: Tensor, k: int, allowed: Tensor | None = None,
            kinds: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Class-agnostic retrieval (§6): pool descriptors `keys` (P, C) and query features (B, C, H, W) -> (indices
    (B, k), cosine similarities (B, k)) of the k most similar pool entries, best first (k capped at P). `allowed`
    (B, P) bool limits each query to some entries (a product type given by the user); k is then also capped at the
    fewest entries a query may take, so that no entry it may not take is returned. `kinds` (the types' mean
    descriptors (T, C) of `type_keys`, each entry's type (P,)), when no `allowed` is given: each query takes the type
    whose mean descriptor is most similar, then its entries only (retrieval by type mean: a type with few pool
    entries, e.g. one added from K images, is not outvoted by a type that has more chances of one close entry)."""
    desc = descriptor(feats)
    sim = desc @ keys.to(feats.device).T  # (B, P)
    if allowed is None and kinds is not None:
        means, kind = kinds
        best = (desc @ means.to(feats.device).T).argmax(dim=1)  # (B,)
        allowed = kind.to(feats.device)[None, :] == best[:, None]
    if allowed is not None:
        sim = sim.masked_fill(~allowed, -2.0)  # below any cosine similarity
        if k > 1:  # (every type has an entry: one is always there; no host sync when tracing or compiling)
            k = min(k, int(allowed.sum(dim=1).min()))
    top = sim.topk(min(k, sim.shape[1]), dim=1)
    return top.indices, top.values


def type_similarities(keys: Tensor, feats: Tensor, kind: Tensor, n_types: int, means: Tensor | None = None) -> Tensor:
    """Pool descriptors (P, C), query features (B, C, H, W) and each entry's type index (P,) -> (B, n_types): how
    similar each type is to each query, as retrieval ranks them: the cosine similarity of the type's most similar
    pool entry, or with `means` (`type_keys`, retrieval by type mean) of the type's mean descriptor."""
    desc = descriptor(feats)
    if means is not None:
        return desc @ means.to(feats.device).T
    member = kind.to(feats.device)[None, :] == torch.arange(n_types, device=feats.device)[:, None]  # (T, P)
    sim = (desc @ keys.to(feats.device).T)[:, None, :]  # (B, 1, P)
    return sim.masked_fill(~member[None], -2.0).amax(dim=2)  # below any cosine similarity: a type's own entries only


def candidate_types(similarities: Tensor, retrieved: Tensor, r: int) -> Tensor:
    """Each query's type similarities (B, T) and retrieved type (B,) -> (B, min(r, T)) int64: the retrieved type
    first, then the r - 1 most similar other types, most similar first: the types the product-type check tries."""
    own = torch.arange(similarities.shape[1], device=similarities.device)[None, :] == retrieved[:, None]
    others = similarities.masked_fill(own, -3.0).topk(min(r, similarities.shape[1]) - 1, dim=1).indices
    return torch.cat([retrieved[:, None], others], dim=1)


def tried_types(keys: Tensor, feats: Tensor, kind: Tensor, n_types: int, retrieved: Tensor, r: int,
                means: Tensor | None = None) -> Tensor:
    """The types the product-type check tries for each query (B, min(r, n_types)): `candidate_types` of the
    `type_similarities` (arguments as there), or the retrieved (or given) type alone when r is 1, without ranking
    the types. The deployed model and evaluation both call this."""
    if r <= 1 or n_types == 1:
        return retrieved[:, None]
    return candidate_types(type_similarities(keys, feats, kind, n_types, means), retrieved.to(feats.device), r)


class PromptPool:
    """Prompt features of normal images of every category and class-agnostic retrieval by cosine similarity."""

    def __init__(self, samples: list[Sample], feats: Tensor, retrieval: str = "nearest") -> None:
        if retrieval not in RETRIEVALS:
            raise ValueError(f"unknown retrieval {retrieval!r}: use one of {', '.join(RETRIEVALS)}")
        if len(samples) != feats.shape[0] or not samples:
            raise ValueError("the prompt pool needs one feature map per sample, and at least one sample")
        self.samples = samples
        self.categories = [s.category for s in samples]
        self.feats = feats  # (P, C, H, W)
        self.keys = descriptor(feats)  # (P, C)
        self.kinds = sorted(set(self.categories))  # the product types, as the deployed model indexes them
        self.kind_index = {k: i for i, k in enumerate(self.kinds)}  # type name -> its index in `kinds`
        self.kind = self.type_indices(self.categories)  # (P,)
        self.retrieval = retrieval
        self._type_banks: dict[bool, Tensor] = {}  # `type_banks`, by whether reduced

    @functools.cached_property
    def type_keys(self) -> Tensor:
        """Every type's mean descriptor (T, C) (`type_keys`), for retrieval by type mean; built once."""
        return type_keys(self.keys, self.kind, len(self.kinds))

    def type_banks(self, reduced: bool = False) -> Tensor:
        """Every type's bank of prompt patches (K, M, C) (`scoring.type_banks`, `reduced` to coresets or not), built
        once each."""
        if reduced not in self._type_banks:
            self._type_banks[reduced] = type_banks(self.feats, self.kind, len(self.kinds), reduced=reduced)
        return self._type_banks[reduced]

    def candidates(self, feats: Tensor, retrieved: Tensor, r: int) -> Tensor:
        """(B, C, H, W) query features and their retrieved types (B,) (indices of `kinds`) -> (B, min(r, T)) the
        types the product-type check tries (`tried_types`), ranked as this pool retrieves."""
        means = self.type_keys if self.retrieval == "type_mean" else None
        return tried_types(self.keys, feats, self.kind, len(self.kinds), retrieved, r, means)

    def retrieve(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) query features -> (indices (B,), cosine similarities (B,)) of the best pool entries."""
        j, sim = self.retrieve_top(feats, 1)
        return j[:, 0], sim[:, 0]

    def type_indices(self, types: list[str]) -> Tensor:
        """Type names -> their indices in `kinds` (int64, on the pool's device): `retrieve_top` takes them, so a
        caller that retrieves batch by batch can map its images' types once and index the result per batch."""
        try:
            return torch.tensor([self.kind_index[t] for t in types], dtype=torch.int64, device=self.feats.device)
        except KeyError as exc:
            raise ValueError(f"type {exc.args[0]!r} is not in the prompt pool (its types: {self.kinds})") from None

    def retrieve_top(self, feats: Tensor, k: int, types: list[str] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (indices (B, k), similarities (B, k)) of the k most similar pool entries, best first
        (k is capped at the pool's size, and with a type given or retrieved first at the fewest entries a query of the
        batch may take); `types` limits each query to the entries of its given type: B type names,
        or their indices in `kinds` (a (B,) int64 tensor, e.g. from `type_indices`)."""
        allowed = None
        if types is not None:
            wanted = types if isinstance(types, Tensor) else self.type_indices(types)
            allowed = self.kind[None, :] == wanted.to(self.kind.device)[:, None]  # (B, P)
        kinds = (self.type_keys, self.kind) if self.retrieval == "type_mean" else None
        return nearest(self.keys, feats, k, allowed, kinds)
