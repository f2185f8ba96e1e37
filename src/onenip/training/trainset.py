"""Training samples (§5): a normal query image, its synthesized anomalous copy with mask (§3), and a normal prompt image.

Every random choice of an item (the prompt, the kind and shape of the pseudo-anomaly, the texture) is drawn from a
generator seeded by (seed, epoch, index): an item is the same whatever the number of workers or processes, and a
resumed run sees exactly the data an uninterrupted run would have seen. The sampler yields (epoch, index) pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from onenip.config import SynthesisConfig
from onenip.data import Sample
from onenip.data.images import load_image, resize_image
from onenip.synthesis.per_image import FolderTextures, TextureSource, synthesize


class EpochSampler(Sampler[tuple[int, int]]):
    """A fresh permutation of the indices every epoch, seeded by (seed, epoch); yields (epoch, index).

    With `world_size` > 1 each rank takes every world_size-th element of the permutation (padded to equal length).
    `skip` leaves out the first positions of this rank's order (a run resumed in the middle of an epoch).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch, 0x5A]).permutation(self.n)
        total = len(self) * self.world_size
        order = np.concatenate([order, order[: total - self.n]])
        for i in order[self.rank :: self.world_size][self.skip :]:
            yield self.epoch, int(i)


class _TrainImages(TextureSource):
    """Textures drawn from the training images themselves (when no texture folder is given)."""

    def __init__(self, dataset: "TrainSet") -> None:
        self.dataset = dataset

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self.dataset.image(int(rng.integers(len(self.dataset))))


class TrainSet(Dataset):
    """Items: uint8 tensors image (3,S,S), synthetic (3,S,S), mask (1,S,S), prompt (3,S,S); ints index, prompt_index,
    category. Without `return_normals` the image and prompt tensors are left out (their features are cached)."""

    def __init__(
        self,
        samples: list[Sample],
        size: int,
        synthesis: SynthesisConfig,
        textures: str | None = None,
        prompt: str = "dynamic",
        synthesize: bool = True,
        seed: int = 133,
        cache: bool = True,
        threads: int = 4,
        return_normals: bool = True,
    ) -> None:
        if not samples:
            raise ValueError("no training samples")
        self.samples = samples
        self.size = size
        self.synthesis = synthesis
        self.prompt = prompt
        self.do_synthesize = synthesize
        self.return_normals = return_normals  # False: only indices of query and prompt (their features are cached)
        self.seed = seed
        self.categories = sorted({s.category for s in samples})
        cat_index = {c: i for i, c in enumerate(self.categories)}
        self.labels = np.array([cat_index[s.category] for s in samples])
        self.members = [np.flatnonzero(self.labels == i) for i in range(len(self.categories))]
        rng = np.random.default_rng([seed, 0x57A71C])
        self.static_prompt = [int(rng.choice(m)) for m in self.members]
        self.textures: TextureSource = FolderTextures(textures, synthesis.texture_resize) if textures else _TrainImages(self)
        self.cache: list[np.ndarray] | None = None
        if cache:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                self.cache = list(pool.map(self._load, range(len(samples))))

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> np.ndarray:
        return resize_image(load_image(self.samples[i].image), self.size)

    def image(self, i: int) -> np.ndarray:
        """(S, S, 3) uint8 RGB of training image i."""
        return self.cache[i] if self.cache is not None else self._load(i)

    def prompt_index(self, i: int, rng: np.random.Generator) -> int:
        """The prompt of query i: a random image of its category (dynamic; can be i itself, as in the reference) or the
        category's fixed image (static)."""
        members = self.members[self.labels[i]]
        if self.prompt == "static":
            return self.static_prompt[self.labels[i]]
        return int(members[rng.integers(len(members))])

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor | int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, i])
        image = self.image(i)
        out: dict[str, torch.Tensor | int] = {"index": i, "category": int(self.labels[i])}
        if self.return_normals:
            out["image"] = _chw(image)
        if self.do_synthesize:
            synthetic, mask = synthesize(image, rng, self.textures, self.synthesis)
            out["synthetic"] = _chw(synthetic)
            out["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None]
        if self.prompt != "none":
            j = self.prompt_index(i, rng)
            out["prompt_index"] = j
            if self.return_normals:
                out["prompt"] = _chw(self.image(j))
        return out


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class DeviceBatches:
    """The fast path's batches (train.engine=fast): the items of `TrainSet`, made in batches on the training device.

    Every training image is decoded once and kept on the device as uint8 (N, 3, S, S); textures too (or the images
    themselves serve as textures, as in the plain path). Each batch's pseudo-anomalies are synthesized there in one go
    (`onenip.synthesis.batched.BatchSynthesizer`, the same distributions as `onenip.synthesis.per_image.synthesize`)
    and its prompts are drawn there. The order of queries is the same `EpochSampler` permutation the plain path uses;
    the random draws of a batch come from a generator seeded by (seed, epoch, batch, rank), so a resumed run sees the
    batches an uninterrupted one would. Batches are dicts like the plain DataLoader's without image and prompt
    (their features are cached): index (B,), category (B,), synthetic (B, 3, S, S) uint8, mask (B, 1, S, S) uint8, prompt_index (B,).
    """

    def __init__(self, dataset: TrainSet, sampler: EpochSampler, batch_size: int, device: torch.device,
                 textures: torch.Tensor | None = None) -> None:
        from onenip.synthesis.batched import BatchSynthesizer

        self.dataset, self.sampler, self.batch_size, self.device = dataset, sampler, batch_size, device
        n = len(dataset)
        self.images = torch.empty((n, 3, dataset.size, dataset.size), dtype=torch.uint8, device=device)  # (N, 3, S, S)
        for s in range(0, n, 256):  # copied in chunks: no second full copy in host memory
            chunk = np.stack([dataset.image(i) for i in range(s, min(s + 256, n))])  # (n, S, S, 3)
            self.images[s : s + len(chunk)] = torch.from_numpy(chunk).to(device).permute(0, 3, 1, 2)
        self.textures = textures.to(device) if textures is not None else None
        self.synthesizer = BatchSynthesizer(dataset.synthesis, self.textures)
        self.labels = torch.as_tensor(dataset.labels, device=device)  # (N,) category of each image
        counts = [len(m) for m in dataset.members]
        self.counts = torch.tensor(counts, device=device)  # (K,)
        members = torch.zeros((len(counts), max(counts)), dtype=torch.long)  # (K, max members), padded
        for c, m in enumerate(dataset.members):
            members[c, : len(m)] = torch.as_tensor(m)
        self.members = members.to(device)
        self.static_prompt = torch.tensor(dataset.static_prompt, device=device)  # (K,)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def generator(self, epoch: int, batch: int) -> torch.Generator:
        seed = hash((self.dataset.seed, epoch, batch, self.sampler.rank, 0xFA57)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator(device=self.device).manual_seed(seed)

    def prompts(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B,) prompt image of each query: a random image of its category (dynamic) or the category's fixed one."""
        lab = self.labels[index]
        if self.dataset.prompt == "static":
            return self.static_prompt[lab]
        pick = (torch.rand(index.shape, generator=gen, device=self.device) * self.counts[lab]).long()
        return self.members[lab, pick.clamp_max(self.counts[lab] - 1)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.tensor([i for _, i in self.sampler], dtype=torch.long).to(self.device)  # one copy per epoch
        epoch, first = self.sampler.epoch, self.sampler.skip // self.batch_size  # resumed mid-epoch: batch `first`
        for b, start in enumerate(range(0, len(order), self.batch_size), start=first):
            index = order[start : start + self.batch_size]
            gen = self.generator(epoch, b)
            out: dict[str, torch.Tensor] = {"index": index, "category": self.labels[index]}
            if self.dataset.do_synthesize:
                pool = self.textures if self.textures is not None else self.images
                out["synthetic"], out["mask"] = self.synthesizer(self.images[index], gen, pool)
            if self.dataset.prompt != "none":
                out["prompt_index"] = self.prompts(index, gen)
            yield out
