"""The fast training path (train.engine=fast) computes what the plain path computes (CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import tiny  # the small OneNIP on two generated categories at 64 px (output in <folder>/run)
from torch.utils.data import default_collate

from onenip.api import make_config
from onenip.checkpoint import load_checkpoint
from onenip.errors import ConfigError
from onenip.synthesis.batched import load_texture_bank
from onenip.training.trainer import Trainer


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, gen_data: Path, gen_textures: Path) -> tuple[Trainer, Trainer]:
    root = tmp_path_factory.mktemp("fast")
    plain = Trainer(tiny(root / "plain", gen_data, gen_textures), progress=False)
    fast = Trainer(tiny(root / "fast", gen_data, gen_textures, "train.engine=fast"), progress=False)
    fast.net.load_state_dict(plain.net.state_dict())
    return plain, fast


def spread(trainer: Trainer, n: int) -> list[int]:
    """`n` training indices spread evenly over the dataset (so over both categories): the first, ..., the last."""
    last = len(trainer.dataset) - 1
    return [round(k * last / (n - 1)) for k in range(n)]


def plain_batch(trainer: Trainer, indices: list[int]) -> dict[str, torch.Tensor]:
    return default_collate([trainer.dataset[(0, i)] for i in indices])


def assert_same_losses_and_gradients(a: Trainer, b: Trainer, batch: dict[str, torch.Tensor], seed: int, rel: float,
                                     grad_rtol: float, grad_atol: float) -> None:
    """`a` and `b` in training mode on `batch`, each after torch.manual_seed(seed): the same loss terms (relative
    tolerance `rel`) and the same gradients of every network parameter."""
    terms, grads = [], []
    for trainer in (a, b):
        trainer.net.train()
        trainer.net.zero_grad()
        torch.manual_seed(seed)
        out = trainer.losses(batch)
        out["loss"].backward()
        terms.append({k: v.item() for k, v in out.items()})
        grads.append(torch.cat([p.grad.flatten() for p in trainer.net.parameters()]))
    assert terms[0].keys() == terms[1].keys() == {"mse", "dice", "loss"}
    for k in terms[0]:
        assert terms[1][k] == pytest.approx(terms[0][k], rel=rel), k
    torch.testing.assert_close(grads[1], grads[0], rtol=grad_rtol, atol=grad_atol)


def test_same_batch_gives_the_same_losses_and_maps(pair: tuple[Trainer, Trainer]) -> None:
    """On fixed inputs (the same queries, synthetic images, masks and prompts) the fast path's losses equal the plain
    path's, in training mode with the same jitter and dropout draws, and so do the gradients."""
    plain, fast = pair
    batch = plain_batch(plain, spread(plain, 8))
    assert batch["synthetic"].shape == (8, 3, 64, 64)
    assert_same_losses_and_gradients(plain, fast, batch, seed=7, rel=1e-5, grad_rtol=1e-4, grad_atol=1e-6)
    # the backbone pass on the synthesized images: channels-last copy, same features
    synth = batch["synthetic"]
    torch.testing.assert_close(fast.step_backbone(synth), plain.detector.features(synth), rtol=1e-4, atol=1e-4)


def test_bf16_backbone_stays_within_bf16_tolerance(pair: tuple[Trainer, Trainer]) -> None:
    plain, _ = pair
    images = plain_batch(plain, spread(plain, 4))["synthetic"]
    ref = plain.detector.features(images)
    low = plain.detector.extractor.fast_copy(torch.bfloat16)(images)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert plain.detector.extractor.dtype == torch.float32  # the original (what checkpoints store) is untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain path's precision on a GPU
        auto = plain.detector.features(images)
    rel, rel_auto = (low - ref).norm() / ref.norm(), (auto - ref).norm() / ref.norm()
    # bf16 keeps 8 bits of mantissa; through ~50 layers that is a few percent either way (measured: 6.5 % and 5.7 %)
    assert rel < 0.1 and rel < 1.5 * rel_auto, (float(rel), float(rel_auto))


def test_device_batches_follow_the_plain_order_and_rules(pair: tuple[Trainer, Trainer]) -> None:
    plain, fast = pair
    for epoch in (0, 1):
        plain.sampler.set_epoch(epoch)
        fast.sampler.set_epoch(epoch)
        p_order = torch.cat([b["index"] for b in plain.loader])
        batches = list(fast.loader)
        assert len(batches) == len(plain.loader) == len(fast.loader)
        assert torch.equal(torch.cat([b["index"] for b in batches]), p_order)  # the same queries in the same order
    images, labels = fast.loader.images, fast.loader.labels
    for b in batches:
        assert torch.equal(labels[b["prompt_index"]], b["category"])  # the prompt is of the query's category
        x = images[b["index"]]
        outside = (b["mask"] == 0).expand_as(x)
        assert torch.equal(b["synthetic"][outside], x[outside])  # only the masked pixels change
        assert b["synthetic"].dtype == b["mask"].dtype == torch.uint8
    areas = torch.cat([b["mask"].flatten(1).float().mean(1) for b in batches])
    assert (areas > 0).float().mean() > 0.6  # pseudo-anomalies are there (Perlin masks may come out empty by chance)
    # the images kept on the device are the ones the plain path decodes
    assert torch.equal(images[5], torch.from_numpy(plain.dataset.image(5)).permute(2, 0, 1))
    # the same (seed, epoch, batch) gives the same batch; another epoch another one
    fast.sampler.set_epoch(1)
    again = next(iter(fast.loader))
    assert torch.equal(again["synthetic"], batches[0]["synthetic"]) and torch.equal(again["mask"], batches[0]["mask"])
    fast.sampler.set_epoch(0)
    assert not torch.equal(next(iter(fast.loader))["synthetic"], again["synthetic"])


def test_fast_training_lowers_the_loss_and_resumes_exactly(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    straight = Trainer(tiny(tmp_path / "a", gen_data, gen_textures, "train.engine=fast", "train.lr=2e-3"), progress=False)
    result = straight.run()
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    per_epoch = len(straight.loader)
    first = Trainer(tiny(tmp_path / "b", gen_data, gen_textures, "train.engine=fast", "train.lr=2e-3",
                         f"train.max_steps={per_epoch}"), progress=False)
    first.run()
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "last.safetensors"
    assert load_checkpoint(ckpt).epoch == 1
    resumed = Trainer(tiny(tmp_path / "b", gen_data, gen_textures, "train.engine=fast", "train.lr=2e-3"), resume=ckpt,
                      progress=False)
    resumed.run()
    assert resumed.step == straight.step
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "a" / "run" / "model.safetensors").is_file()


def test_fast_engine_needs_cached_features(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.engine"):
        make_config(None, ["train.engine=fast", "train.cache_features=false"])
    with pytest.raises(ConfigError, match="train.engine"):
        make_config(None, ["train.engine=turbo"])


def test_lazy_nan_check_stops_before_a_bad_checkpoint(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the fast path checks the loss every few steps (no wait for the GPU in between); a NaN is still caught
    before the epoch's checkpoint, which stays the last good one. Forced here on the CPU."""
    from onenip.training.trainer import TrainingError

    trainer = Trainer(tiny(tmp_path, gen_data, gen_textures, "train.engine=fast", "train.save_every=1", "train.epochs=3"),
                      progress=False)
    trainer.sync_every = 4
    per_epoch = len(trainer.loader)
    real = trainer.losses

    def poisoned(batch):
        out = real(batch)
        if trainer.step == per_epoch + 1:  # the second step of epoch 2
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer, "losses", poisoned)
    with pytest.raises(TrainingError, match=rf"NaN or infinite at (one of steps \d+-\d+|step {per_epoch + 2}) "
                                            r"\(epoch 2\).*last good checkpoint is .*last.safetensors"):
        trainer.run()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert state.epoch == 1 and state.step == per_epoch
    assert all(torch.isfinite(v).all() for v in state.net.values())


def test_fast_feature_cache_comes_from_the_step_backbone(pair: tuple[Trainer, Trainer]) -> None:
    """Both halves of a fast batch, [normal; synthetic], come from one backbone: the cached normal features are the
    step backbone's (and, in float32 on the CPU, the plain path's)."""
    plain, fast = pair
    chosen = [0, 1, len(fast.dataset) - 1]  # both categories
    images = torch.stack([torch.from_numpy(fast.dataset.image(i).transpose(2, 0, 1).copy()) for i in chosen])
    torch.testing.assert_close(fast.feature_cache[chosen], fast.step_backbone(images), rtol=0, atol=0)
    torch.testing.assert_close(fast.feature_cache, plain.feature_cache, rtol=1e-4, atol=1e-4)
    assert fast.step_backbone.channels_last and fast.step_backbone.dtype == torch.float32  # no CUDA, or amp off
    assert fast.feature_cache.is_contiguous()  # the standard layout: the jitter draws as on the plain path


def test_fast_texture_bank_follows_the_texture_resize_option(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    trainer = Trainer(tiny(tmp_path, gen_data, gen_textures, "train.engine=fast", "synthesis.texture_resize=antialias",
                           "synthesis.brightness_spaces=[Lab]"), progress=False)
    assert torch.equal(trainer.loader.textures, load_texture_bank(gen_textures, 64, resize="antialias"))
    assert trainer.loader.synthesizer.cfg.brightness_spaces == ["Lab"]


def test_compile_synthesis_option_reaches_the_synthesizer(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from onenip.synthesis.batched import BatchSynthesizer

    with pytest.raises(ConfigError, match="train.compile_synthesis.*train.engine=fast"):
        make_config(None, ["train.compile_synthesis=default"])
    with pytest.raises(ConfigError, match="train.compile_synthesis"):
        make_config(None, ["train.engine=fast", "train.compile_synthesis=fastest"])
    asked = []
    monkeypatch.setattr(BatchSynthesizer, "compile", lambda self, batch_size, mode: asked.append((mode, batch_size)))
    Trainer(tiny(tmp_path / "a", gen_data, gen_textures, "train.engine=fast"), progress=False)
    assert asked == []  # eager by default
    trainer = Trainer(tiny(tmp_path / "b", gen_data, gen_textures, "train.engine=fast", "train.compile_synthesis=max-autotune"),
                      progress=False)
    assert asked == [("max-autotune", trainer.local_batch)]


@pytest.mark.slow
def test_compiled_training_forward_gives_the_eager_losses_and_gradients(pair: tuple[Trainer, Trainer], tmp_path: Path,
                                                                        gen_data: Path, gen_textures: Path) -> None:
    """train.compile wraps the training forward in torch.compile (the fast engine's default on CUDA, so every GPU run
    goes through it). With inductor's random ops falling back to eager's (the same jitter and dropout draws), a batch
    in training mode gives the eager losses and gradients, and a compiled optimizer step moves the network that
    checkpoints store."""
    _, eager = pair
    compiled = Trainer(tiny(tmp_path, gen_data, gen_textures, "train.engine=fast", "train.compile=default"), progress=False)
    assert compiled.model is not compiled.net  # the compiled wrapper runs the forward; the network keeps the weights
    compiled.net.load_state_dict(eager.net.state_dict())
    batch = plain_batch(eager, spread(eager, 4))
    with torch._inductor.config.patch(fallback_random=True):
        assert_same_losses_and_gradients(eager, compiled, batch, seed=11, rel=1e-4, grad_rtol=1e-3, grad_atol=1e-5)
        before = [p.detach().clone() for p in compiled.net.parameters()]
        step = compiled.train_step(batch)
    assert torch.isfinite(step["loss"]) and compiled.step == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, compiled.net.parameters()))
    assert not any(k.startswith("_orig_mod") for k in compiled.net.state_dict())
