"""The steps of inference from a reconstruction to a decision (method §6), each written once: evaluation, calibration
and the deployed model (`onenip.models.inference.DeployModel`, which the Predictor runs and the exports trace) call
these, and nothing else computes a map, a fusion or a score.

* maps (`anomaly_maps`): the reconstruction error ||F_hat - F||_2 over channels, upsampled bilinearly to the input
  size (Eq. 9), and the refiner's map, the sigmoid of its upsampled logits; with K prompts, the mean of the K maps.
* fusion (`fuse`): alpha * rec + (1 - alpha) * c * ref, with c = (max(rec) + min(rec)) / 2 over a reference set of
  maps (`fusion_scale`: normal training images in the clean protocol, the whole test set in the authors' code), so
  that the refiner's [0, 1] output is brought to the scale of the reconstruction error.
* image score (`image_scores`): the maximum of the map average-pooled with a 16 x 16 window (stride 1, no padding).
* product type (`type_distance`): how far the image is from every normal image of its type it was shown, from the
  frozen backbone's features alone: for each query patch the cosine distance to the nearest patch of the type's
  prompt images, and of those the 25th percentile (a defect, which changes a minority of patches, barely moves it;
  another product moves all of them). Each type's limit is a margin times the largest type distance of its normal
  images.
* colour (`colour_column`, `texture_contrast`, `colour_whitening`, `colour_distance`): the second half of the
  product-type check. The median colour of the image (an intensity and two opponent colours over 4 x 4 cells) and,
  in models calibrated since it, its surface's fine contrast (the median over 8 x 8 cells of the log energy of the
  intensity's 2-4-pixel octave), and their Mahalanobis distance to its type's (mean and covariance of up to 100 of
  the type's normal images), and a limit set as the type distance's is. Products that differ mostly in colour or in
  how finely their surface varies (variants of one material) are told apart by it.
* unknown type (`candidate_distances`, `unknown_scores`): the check tries the retrieved type and the next most
  similar ones (eval.unknown_candidates, 3), and for each sums the two distances as fractions of that type's limits;
  when the least of the sums exceeds eval.unknown_level (1.65) the image is of a type the model does not know, and is
  not judged. An image a little off in both halves counts as far as one well off in one, and a known image that
  retrieval sends to a neighbouring type is still taken by its own. (Models calibrated before this rule: unknown when
  either distance exceeds the retrieved type's limit.)
* a type added after training (`onenip add-type`, from a few normal images, no gradient step) is scored by
  `prompt_map`, a training-free map in the manner of PatchCore in place of the learned one: the frozen backbone's
  stride-8 and stride-16 taps, each averaged over 3 x 3 neighbours on the stride-8 grid and scaled to unit length
  (`FeatureExtractor.patches`); for each query patch and each tap the Euclidean distance to the nearest patch of the
  type's bank (a k-center coreset of its prompt images' patches, `added_type_bank`), summed over the taps
  (`prompt_distances`); upsampled to the input size and smoothed with a
  Gaussian of sigma = input size / 56 (4 pixels at 224) (`prompt_map`; both steps: `added_type_map`). With
  prompt-map fusion a trained type gets the same map from a bank of its prompt-pool images (`banks_by_type`), and
  each image's map is the weighted sum of its learned and its prompt map (`weigh_maps`: the prompt map alone for an
  added type, the learned map alone for an unfused one).
* decision (`decide`): anomalous when the score exceeds the threshold of the retrieved category and the image is of a
  known type. The normalised score 1 - 2^(-score / threshold) is 0 for a zero map, 0.5 exactly at the threshold and
  approaches 1 above; it is monotone, so it ranks images as the raw score does, and never saturates into ties.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from onenip.models.networks import ReconstructionNet, bilinear_weights, upsample


@dataclass
class Maps:
    """Anomaly maps at the input resolution, each (B, S, S) float32."""

    rec: Tensor  # ||F_hat - F||_2, upsampled (Eq. 9)
    ref: Tensor | None  # sigmoid of the refiner logits (None without refiner)


def anomaly_maps(net: ReconstructionNet, feats: Tensor, rec: Tensor, size: int,
                 autocast: torch.dtype | None = None) -> Maps:
    """Features F (B, C, H, W) and their reconstruction F_hat -> the reconstruction-error map and, with a refiner, its
    map (§4), each (B, size, size) float32. `autocast`: the refiner runs under autocast to this dtype (the fast path)."""
    delta = rec.float() - feats.float()  # (B, C, H, W)
    rec_map = upsample(delta.norm(dim=1, keepdim=True), size)[:, 0]
    if net.refiner is None:
        return Maps(rec=rec_map, ref=None)
    low = torch.autocast(delta.device.type, dtype=autocast) if autocast is not None else nullcontext()
    with low:
        logits = net.refiner(delta.abs())  # (B, 1, H', W')
    return Maps(rec=rec_map, ref=torch.sigmoid(upsample(logits.float(), size))[:, 0])


def mean_maps(maps: list[Maps]) -> Maps:
    """K-prompt fusion: the mean of the reconstruction maps and of the refiner maps of K prompts."""
    if len(maps) == 1:
        return maps[0]
    rec = torch.stack([m.rec for m in maps]).mean(0)
    ref = torch.stack([m.ref for m in maps]).mean(0) if maps[0].ref is not None else None
    return Maps(rec=rec, ref=ref)


def fusion_scale(rec_min: float, rec_max: float) -> float:
    """c = (max + min) / 2 of the reconstruction maps of the reference set."""
    return 0.5 * (float(rec_max) + float(rec_min))


def fuse(rec: Tensor, ref: Tensor | None, alpha: float, scale: float | None) -> Tensor:
    """alpha * rec + (1 - alpha) * scale * ref (rec alone when there is no refiner map)."""
    if ref is None or scale is None:
        return rec
    return alpha * rec + (1.0 - alpha) * scale * ref


def image_scores(maps: Tensor, kernel: int = 16) -> Tensor:
    """(N, H, W) maps -> (N,) the maximum of the kernel x kernel mean filter over the valid positions. The mean
    filter is separable: a running mean along each row, then along each column, each pass with the lines as channels
    (the same means up to float rounding; OpenVINO's pooling vectorises over channels, and a map has one: two
    single-channel passes took 0.45 ms of the default model's 12 ms at batch 1 in bf16, these drop out of its
    profile, `benchmarks/line_network.py --profile`)."""
    k = min(kernel, maps.shape[-2], maps.shape[-1])
    rows = F.avg_pool2d(maps.float().unsqueeze(2), (1, k), stride=1)  # (N, H, 1, W - k + 1): rows as channels
    columns = rows.squeeze(2).transpose(1, 2).unsqueeze(2)  # (N, W - k + 1, 1, H): columns as channels
    return F.avg_pool2d(columns, (1, k), stride=1).flatten(1).amax(dim=1)


def normalize_score(score: Tensor | np.ndarray | float, threshold: Tensor | np.ndarray | float):
    """1 - 2^(-score / threshold): 0.5 at the threshold, monotone, in [0, 1) for scores >= 0."""
    return 1.0 - 2.0 ** (-score / threshold)


MIN_THRESHOLD = 1e-12
"""`decide` floors thresholds at this: a zero threshold (every normal score 0) divides nothing by zero."""


def decide(score: Tensor | np.ndarray, threshold: Tensor | np.ndarray,
           known: Tensor | np.ndarray) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
    """The decision on N images: their scores (N,), the threshold of each one's product type (N,) and whether that
    type is known (N,) bool -> (normalized (N,) float, `normalize_score` at the threshold floored at MIN_THRESHOLD;
    anomalous (N,) bool, score above that threshold and the type known: an image of an unknown type is not judged).
    Torch tensors (traceable: the deployed model and its exports) or numpy arrays alike; the result is of the kind
    given."""
    if isinstance(threshold, Tensor):
        threshold = threshold.clamp_min(MIN_THRESHOLD)
    else:
        threshold = np.maximum(threshold, MIN_THRESHOLD)
    return normalize_score(score, threshold), (score > threshold) & known


TYPE_QUANTILE = 0.25  # of the query patches' nearest-patch distances: robust to defects, not to another product


NEAREST_BLOCK = 32  # `_argmax_last` finds the largest of M in blocks of this many; type banks are padded to a multiple


def _argmax_last(x: Tensor) -> Tensor:
    """(N, L, M) -> (N, L) the index of the largest of each row, the first of equal ones (as argmax). With M a multiple
    of NEAREST_BLOCK above it, in two steps: the block holding the largest of the block maxima, then the largest
    within that block. An argmax over M is a TopK in OpenVINO, about 1.4 ns an element on a 2-core AMX Xeon, where a
    maximum reduces the row at a fraction of that: the two steps run TopK over M / 32 + 32 elements instead of M
    (1,568 for eight prompt images of 196 patches)."""
    n, length, m = x.shape
    if m <= NEAREST_BLOCK or m % NEAREST_BLOCK:
        return x.argmax(dim=2)
    blocks = x.view(n, length, m // NEAREST_BLOCK, NEAREST_BLOCK)
    block = blocks.amax(dim=3).argmax(dim=2)  # (N, L)
    within = blocks.gather(2, block[:, :, None, None].expand(-1, -1, 1, NEAREST_BLOCK))[:, :, 0].argmax(dim=2)
    return block * NEAREST_BLOCK + within


def pad_banks(banks: list[Tensor], multiple: int = 1) -> Tensor:
    """Banks of patches (M_i, C) -> one tensor (len(banks), M, C), each brought to the longest length (rounded up to
    a `multiple` of rows) by repeating its first patches: a repeated patch cannot change a nearest-patch distance, so
    no mask is needed."""
    longest = -(-max(b.shape[0] for b in banks) // multiple) * multiple
    return torch.stack([b.repeat(-(-longest // b.shape[0]), 1)[:longest] for b in banks])


def prompt_bank(patches: Tensor) -> Tensor:
    """Prompt images' features or patches (P, C, H, W) -> one row per position (P * H * W, C), a type's bank."""
    return patches.float().flatten(2).transpose(1, 2).reshape(-1, patches.shape[1])


BANK_SHARE = 0.25  # of an added type's prompt patches kept in its bank (k-center greedy), but one image's worth at least
BANK_MAX_IMAGES = 4  # and at most this many images' worth: the per-image search stops growing beyond K = 16


def bank_size(images: int, per_image: int) -> int:
    """How many patches the bank of a type added from `images` prompt images of `per_image` patches each keeps:
    BANK_SHARE of them, at least one image's worth and at most BANK_MAX_IMAGES' (so at 784 patches an image: every
    patch of 1 image, 784 of 4 x 784, 3,136 of 16 x 784 and of 64 x 784)."""
    share = min(math.ceil(BANK_SHARE * images * per_image), BANK_MAX_IMAGES * per_image)
    return min(images * per_image, max(per_image, share))


def coreset(bank: Tensor, size: int) -> Tensor:
    """Rows of `bank` (M, C) -> `size` of them (size, C) chosen by k-center greedy (Euclidean): from row 0, each next
    row is the one farthest from those chosen, so every row lies close to a kept one (PatchCore's coreset, without
    its random projection: deterministic). All rows when size >= M; `size` distinct rows (by index) otherwise, even
    where rows repeat."""
    if size >= bank.shape[0]:
        return bank
    x = bank.float()
    norms = (x * x).sum(dim=1)
    chosen = torch.zeros(size, dtype=torch.int64)
    nearest = torch.addmv(norms, x, x[0], alpha=-2.0).add_(norms[0])  # squared distance to the nearest chosen row
    nearest[0] = -1.0  # a chosen row stays below every distance, so it is never chosen again (a row equal to it may be)
    for i in range(1, size):  # one matrix-vector product a step: ~0.5 ms for 12,000 rows of 152 on one core
        c = int(nearest.argmax())
        chosen[i] = c
        torch.minimum(nearest, torch.addmv(norms, x, x[c], alpha=-2.0).add_(norms[c]), out=nearest)
        nearest[c] = -1.0
    return bank[chosen.to(bank.device)]


def added_type_bank(patches: Tensor) -> Tensor:
    """An added type's prompt images' patches (K, C', H, W) -> its bank (M, C'), M = `bank_size` (K, H * W): the
    `coreset` of all K * H * W, a quarter of the search of every patch at K >= 4 and none larger beyond K = 16. What
    `onenip add-type` stores and what its threshold is set on."""
    return coreset(prompt_bank(patches), bank_size(patches.shape[0], patches.shape[-2] * patches.shape[-1]))


def banks_by_type(patches: Tensor, categories: list[str]) -> dict[str, Tensor]:
    """Prompt images' patches (P, C', H, W) and each one's type (P,) -> per type, `added_type_bank` of its images'
    patches: the banks of prompt-map fusion, one per type of a prompt pool."""
    return {t: added_type_bank(patches[[i for i, c in enumerate(categories) if c == t]]) for t in sorted(set(categories))}


def type_bank(feats: Tensor) -> Tensor:
    """Prompt images' features (P, C, H, W) -> their patches as unit vectors (P * H * W, C), a type's bank for the
    product-type check."""
    return F.normalize(prompt_bank(feats), dim=1)


def type_check_bank(feats: Tensor, reduced: bool) -> Tensor:
    """Prompt images' features (P, C, H, W) -> the bank the product-type check compares a query of their type with:
    `type_bank`, every patch, or `reduced`, its k-center `coreset` of `bank_size` (P, H * W) patches, the rule of an
    added type's bank (a quarter of the patches, at least one image's worth and at most four images'). Every patch
    lies near a kept one, and the limits are set on the same bank; the search is a quarter of the cost for a type of
    eight prompt images, which the check pays for each of the types it tries."""
    bank = type_bank(feats)
    return coreset(bank, bank_size(feats.shape[0], feats.shape[-2] * feats.shape[-1])) if reduced else bank


def type_banks(pool_feats: Tensor, pool_category: Tensor, n_types: int, multiple: int = 1,
               reduced: bool = False) -> Tensor:
    """The prompt pool's features (P, C, H, W) and each entry's type index (P,) -> every type's bank of patches
    (`type_check_bank`, `reduced` or not), brought to one length by `pad_banks` (K, M, C), M a `multiple` of rows
    (the deployed model's: NEAREST_BLOCK, so that `patch_distances` searches them in blocks)."""
    kind = pool_category.to(pool_feats.device)
    return pad_banks([type_check_bank(pool_feats[kind == k], reduced) for k in range(n_types)], multiple)


def patch_distances(feats: Tensor, bank: Tensor) -> Tensor:
    """Query features (N, C, H, W) and each query's bank of patches (N, M, C, unit vectors) -> (N, H * W): every
    query patch's cosine distance to its nearest bank patch, 1 - cos = |q - b|^2 / 2 for unit vectors. The nearest
    patch is found by the largest dot product, the distance is taken from the difference: 1 - max(q . b) would lose
    it to rounding wherever the product runs in bf16 (OpenVINO's bf16 on AMX CPUs keeps cos to 2^-8, as large as
    the distance of a close patch), the difference keeps it."""
    q = F.normalize(feats.float().flatten(2).transpose(1, 2), dim=2)  # (N, L, C)
    nearest = _argmax_last(q @ bank.transpose(1, 2))  # (N, L, M) -> (N, L)
    b = bank.gather(1, nearest[:, :, None].expand(-1, -1, bank.shape[2]))  # (N, L, C)
    return 0.5 * (q - b).pow(2).sum(dim=2)


def type_distance(nearest: Tensor) -> Tensor:
    """`patch_distances` (N, L) -> (N,) their TYPE_QUANTILE: how far the image is from its type's prompt images."""
    k = int(TYPE_QUANTILE * (nearest.shape[1] - 1)) + 1
    return nearest.topk(k, dim=1, largest=False).values[:, -1]  # the k-th smallest: exportable, unlike quantile


COLOUR_POOL = 4  # the colour check reads the image in cells of this many pixels a side (56 x 56 cells at 224 px)
OPPONENT = ((1 / 3, 1 / 3, 1 / 3), (1.0, -1.0, 0.0), (0.5, 0.5, -1.0))  # RGB -> intensity, r - g, (r + g) / 2 - b


TEXTURE_CELL = 8  # the texture statistic reads the image in cells of this many pixels a side (28 x 28 at 224 px)
TEXTURE_EPS = (0.5 / 255) ** 2  # added to each cell's energy before the log: a flat cell reads as half a grey level


def colour_stats(images: Tensor, texture: bool = False) -> Tensor:
    """(N, 3, S, S) uint8 RGB or float in [0, 1] -> (N, 3), or (N, 4) with `texture`: the image's colour and its
    texture contrast (`colour_column` as rows)."""
    return colour_column(images, texture)[:, :, 0]


def colour_column(images: Tensor, texture: bool = False) -> Tensor:
    """(N, 3, S, S) uint8 RGB or float in [0, 1] -> (N, 3, 1), with `texture` (N, 4, 1): the image's colour and its
    `texture_contrast` below it. The colour is robust to a defect: each cell of
    COLOUR_POOL x COLOUR_POOL pixels is averaged and turned into an intensity (r + g + b) / 3 and two opponent colours,
    r - g and (r + g) / 2 - b, in [0, 1] units; of each, the median over the cells (the lower one: topk, exportable,
    unlike median). A defect covers a minority of the cells and barely moves a median; a product of another colour
    moves all three. Averaging and colour transform are one strided convolution on the pixel values as they come
    (integers for uint8): a bf16 export keeps it in float32 (`onenip.deploy.stem_precision`), where a pooling of
    pixels rounded to bf16 moved the medians by about half a grey level, as far as the colours of one paper type
    spread. A column, as `colour_distance` multiplies it: no reshape in between, which a bf16 export would round."""
    pool = COLOUR_POOL if min(images.shape[-2:]) >= COLOUR_POOL else 1
    scale = (1.0 / 255.0 if images.dtype == torch.uint8 else 1.0) / (pool * pool)
    weight = (torch.tensor(OPPONENT, device=images.device) * scale)[:, :, None, None].expand(3, 3, pool, pool)
    cells = F.conv2d(images.float(), weight.contiguous(), stride=pool).flatten(2)  # (N, 3, h * w)
    k = (cells.shape[2] - 1) // 2 + 1
    colour = cells.topk(k, dim=2, largest=False).values[:, :, k - 1:]
    return torch.cat([colour, texture_contrast(images)], dim=1) if texture else colour


def texture_contrast(images: Tensor) -> Tensor:
    """(N, 3, S, S) uint8 RGB or float in [0, 1] -> (N, 1, 1): how strongly the surface varies at a fine scale, robust
    to a defect. The intensity averaged over 2 x 2 pixels, less the average of the 2 x 2 of those (4 x 4 pixels) it
    lies in, is the image's 2-4-pixel octave (a band of a Laplacian pyramid); its energy (mean square) over each cell
    of TEXTURE_CELL x TEXTURE_CELL pixels, as a log, and of those the median over the cells (the lower one). Papers of
    one colour family differ in it: at a given brightness one varies less than another, which the colour alone and
    the backbone's cosine distances (directions, not sizes) do not see. Each averaging is a strided convolution on
    the pixel values as they come, as the colour's cells are, so that a bf16 export keeps the branch in float32 (a
    band is a small difference of two averages). An image under TEXTURE_CELL pixels a side has no cell: the floor."""
    if min(images.shape[-2:]) < TEXTURE_CELL:
        return torch.full((images.shape[0], 1, 1), math.log(TEXTURE_EPS), device=images.device)
    unit = 12.0 * (255.0 if images.dtype == torch.uint8 else 1.0)  # what a sum of 2 x 2 pixels' 3 channels counts as 1
    dev = images.device
    fine = F.conv2d(images.float(), torch.ones((1, 3, 2, 2), device=dev), stride=2)  # (N, 1, S/2, S/2), x unit
    deviation = torch.eye(4, device=dev).view(4, 1, 2, 2) - 0.25  # each of a 2 x 2 block less the block's mean
    band = F.conv2d(fine, deviation, stride=2)  # (N, 4, S/4, S/4): the octave, the block's four pixels as channels
    cells = TEXTURE_CELL // 4  # a cell is this many blocks a side
    weight = torch.full((1, 4, cells, cells), 1.0 / (4 * cells * cells * unit * unit), device=dev)
    energy = F.conv2d(band.square(), weight, torch.full((1,), TEXTURE_EPS, device=dev), stride=cells)  # (N, 1, h, w)
    # the log is the last step before the median: OpenVINO rewrites an operation after it into a new node, which a
    # bf16 export would run in bf16 (a log energy near -8 rounded to a sixteenth)
    energy = torch.log(energy).flatten(2)  # (N, 1, cells)
    k = (energy.shape[2] - 1) // 2 + 1
    return energy.topk(k, dim=2, largest=False).values[:, :, k - 1:]


def colour_whitening(mean: Tensor, precision: Tensor) -> Tensor:
    """Types' colour models, means (K, D) and inverse covariances (K, D, D) -> (K, D, D + 1) matrices W = L^T [I |
    -mean] with precision = L L^T (Cholesky), so that |W [c; 1]| is colour c's Mahalanobis distance to the type. A
    zero precision (a type without a colour model) gives W = 0: distance 0."""
    d = mean.shape[1]
    w = torch.zeros(mean.shape[0], d, d + 1, dtype=torch.float32)
    for k in range(mean.shape[0]):
        if bool(precision[k].abs().sum() > 0):
            lower = torch.linalg.cholesky(precision[k].double())
            w[k] = (lower.T @ torch.cat([torch.eye(d, dtype=torch.float64), -mean[k].double()[:, None]], dim=1)).float()
    return w


def colour_distance(colour: Tensor, whitening: Tensor) -> Tensor:
    """`colour_column` (N, D, 1) and each image's type's `colour_whitening` (N, D, D + 1) -> (N,) the Mahalanobis
    distance |W [c; 1]| (`colour_distances`, each image with its own whitening)."""
    own = torch.arange(whitening.shape[0], device=whitening.device)[:, None]  # (N, 1)
    return colour_distances(colour, whitening, own)[:, 0]


def colour_distances(colour: Tensor, whitening: Tensor, candidates: Tensor) -> Tensor:
    """`colour_column` (N, D, 1), the types' `colour_whitening` (K, D, D + 1) and R types for each image (N, R) int64
    -> (N, R) the Mahalanobis distance |W [c; 1]| of each image's colour to each of its types'. The mean is
    subtracted inside the matrix product, which a bf16 export keeps in float32: an element-wise difference of two
    colours rounded to bf16 lost half a grey level. Once whitened, rounding costs only a relative 2^-8 of the
    distance. Nothing here reshapes a float tensor (OpenVINO ran a reshape of the colour in bf16, marked or not): the
    R whitenings are gathered as R * D rows by integer indices, and each one's squares summed by a matrix product."""
    n, r = candidates.shape
    d = whitening.shape[1]
    rows = (candidates[:, :, None] * d + torch.arange(d, device=candidates.device)).reshape(n, r * d)  # (N, R * D)
    w = whitening.reshape(-1, d + 1)[rows]  # (N, R * D, D + 1): image i's R whitenings, one below the other
    z = w @ torch.cat([colour.float(), torch.ones_like(colour[:, :1])], dim=1)  # (N, R * D, 1)
    block = (torch.arange(r * d, device=z.device) // d == torch.arange(r, device=z.device)[:, None]).float()
    return (block @ z.square()).sqrt()[:, :, 0]  # (R, R * D) @ (N, R * D, 1) -> (N, R)


def candidate_distances(feats: Tensor, colour: Tensor, candidates: Tensor, banks: Tensor,
                        whitening: Tensor) -> tuple[Tensor, Tensor]:
    """Query features (N, C, H, W), their `colour_column` (N, D, 1) and R candidate types each (N, R) int64 (indices
    of the types' `type_banks` (K, M, C) and `colour_whitening` (K, D, D + 1)) -> the `type_distance` (N, R) and the
    `colour_distances` (N, R) of every query to each of its candidates, all R at once (the query's features repeated
    R times)."""
    n, r = candidates.shape
    flat = candidates.reshape(-1)  # (N * R,): query i's candidates at rows i * R ... i * R + R - 1
    feats = feats[:, None].expand(n, r, *feats.shape[1:]).reshape(n * r, *feats.shape[1:])
    distance = type_distance(patch_distances(feats, banks[flat])).view(n, r)
    return distance, colour_distances(colour, whitening, candidates)


LIMIT_FLOOR = 1e-12  # a limit of 0 (every image of the type at distance 0) divides by this: 0 stays 0, any more is far


def unknown_scores(distance: Tensor, limit: Tensor, colour: Tensor, colour_limit: Tensor, summed: bool) -> Tensor:
    """The product-type check's verdict as one number: the type distances (N, R) and colour distances (N, R) of each
    image to its R candidate types, and those types' limits (N, R) each (inf: that half unchecked) -> (N,) how far
    the image lies from the known type it fits best. Each distance is taken as a fraction of its limit; a type's fit
    is the sum of the two fractions (`summed`: an image a little off in both is as far as one well off in one) or
    the larger (models calibrated before the summed rule: each half within its limit), and the image's score the
    least over its candidates (it is of a known type when one of them takes it). The deployed model and evaluation
    compare it with the deployment's level (`Deployment.unknown_rule`): above it, the image is of an unknown type."""
    t = distance / limit.clamp_min(LIMIT_FLOOR)
    c = colour / colour_limit.clamp_min(LIMIT_FLOOR)
    return (t + c if summed else torch.maximum(t, c)).amin(dim=1)


BANK_CHUNK = 2048  # bank patches compared at once: bounds the (N, L, chunk) similarities whatever the bank's size


def _best_cosine(queries: Tensor, bank: Tensor) -> Tensor:
    """(N, L, c) and one bank for all (M, c) or one per query (N, M, c) -> (N, L): each query's largest dot product
    with its bank, BANK_CHUNK bank patches at a time (each a matrix product, what CPU runtimes run fastest)."""
    return torch.stack([(queries @ chunk.transpose(-1, -2)).amax(dim=2)
                        for chunk in bank.split(BANK_CHUNK, dim=-2)]).amax(dim=0)


def prompt_distances(patches: Tensor, banks: Tensor, rows: Tensor, widths: list[int]) -> Tensor:
    """Query patches (N, C', G, G), the banks of the types scored by a prompt map (A, M, C') and each query's bank
    (N,) int64 (a negative row: none, the distances of bank 0 are returned and not used), the patches made of taps of
    `widths` channels, each tap a unit vector -> (N, G * G): for every query patch, the sum over the taps of the
    Euclidean distance to the tap's nearest patch of its bank, sqrt(2 - 2 max cos) (each tap finds its own nearest
    patch). With one bank every query is compared with it in one matrix product; with several each query gathers its
    own (N, M, C'), so the cost does not grow with the number of banks (ten banks compared with every query took about
    nine times as long)."""
    q = patches.float().flatten(2).transpose(1, 2)  # (N, L, C')
    bank = banks[0] if banks.shape[0] == 1 else banks[rows.clamp_min(0)]  # (M, C') or (N, M, C')
    total = q.new_zeros(q.shape[:2])
    for q_tap, b_tap in zip(q.split(widths, dim=2), bank.float().split(widths, dim=-1)):
        total = total + (2.0 - 2.0 * _best_cosine(q_tap, b_tap)).clamp_min(0.0).sqrt()
    return total


SMOOTHING = 1 / 56  # the prompt map's Gaussian: sigma as a fraction of the input size (4 pixels at 224, as PatchCore)


def gaussian_weights(size: int, sigma: float, like: Tensor) -> Tensor:
    """The (size, size) matrix of 1-D Gaussian smoothing (truncated at 4 sigma, reflected at the borders as
    F.pad(mode="reflect") would), in `like`'s dtype and device: row i holds output i's weights, summing to 1."""
    radius = min(int(4 * sigma + 0.5), size - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pos = torch.arange(size)[:, None] + offsets.long()[None, :]  # (size, taps)
    pos = pos.abs()  # reflect at 0 ...
    pos = torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)  # ... and at size - 1
    weights = torch.zeros(size, size).scatter_add_(1, pos, kernel.expand(size, -1).contiguous())
    return weights.to(device=like.device, dtype=like.dtype)


def prompt_map(distances: Tensor, size: int) -> Tensor:
    """`prompt_distances` (N, G * G) -> (N, size, size): upsampled bilinearly (align_corners=True) and smoothed with a
    Gaussian of sigma = SMOOTHING * size, both as one matrix W (size, G) on each side, W @ D @ W^T (the map of a type
    added from its prompt images alone; method: beyond the paper)."""
    grid = math.isqrt(distances.shape[1])
    w = gaussian_weights(size, SMOOTHING * size, distances) @ bilinear_weights(grid, size, distances)  # (size, G)
    return w @ distances.view(-1, grid, grid) @ w.transpose(0, 1)


def weigh_maps(learned: Tensor, prompt: Tensor, weights: Tensor) -> Tensor:
    """Each image's learned map and prompt map (N, S, S) and its type's weights (N, 2) (`Deployment.map_weights`)
    -> the map it is judged by, w_0 * learned + w_1 * prompt (N, S, S): exact for the weights (1, 0) and (0, 1)."""
    return weights[:, 0, None, None] * learned + weights[:, 1, None, None] * prompt


def added_type_map(patches: Tensor, banks: Tensor, rows: Tensor, widths: list[int], size: int) -> Tensor:
    """The map of a type added from its prompt images: query patches (N, C', G, G) against the banks (A, M, C'), each
    query its own (`rows`, (N,)) -> (N, size, size), `prompt_map` of `prompt_distances`. Evaluation, calibration
    and the deployed model all call this."""
    return prompt_map(prompt_distances(patches, banks, rows, widths), size)
