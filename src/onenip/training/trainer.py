"""Training (§5): reconstruction + restoration MSE and the refiner's Dice loss, AdamW, gradient clipping, step decay.

A run folder (`output_dir`) holds `config.json` (also a valid --config file), `train_log.csv` (one row per epoch),
`checkpoints/last.safetensors` (everything needed to resume, written atomically every `train.save_every` epochs) and,
when training ends, `model.safetensors` (weights and configuration, what `onenip test` takes).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from onenip.checkpoint import (
    CheckpointState,
    adopt_resolved,
    atomic_write_csv,
    atomic_write_text,
    check_output_folder,
    incompatible_keys,
    load_checkpoint,
    save_checkpoint,
)
from onenip.config import Config
from onenip.data import Sample, load_split
from onenip.data.sources import absolute_spec, check_roots
from onenip.errors import CheckpointError, OnenipError
from onenip.evaluation.calibration import build_deployment, split_holdout
from onenip.evaluation.evaluate import evaluate as run_evaluation
from onenip.evaluation.evaluate import write_results
from onenip.logs import progress_bar, stop_on_sigint
from onenip.models.backbone import check_weights, tap_indices
from onenip.models.detector import Detector, resolve_device, set_threads
from onenip.synthesis.batched import load_texture_bank
from onenip.training import distributed
from onenip.training.losses import dice_loss, feature_mse
from onenip.training.trainset import DeviceBatches, EpochSampler, TrainSet

log = logging.getLogger(__name__)

# What a run writes in its folder: a folder holding any of them holds an earlier run, which fit never overwrites.
RUN_FILES = ("model.safetensors", "checkpoints", "config.json", "train_log.csv", "skipped_train.csv", "results")


class TrainingError(OnenipError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass
class FitResult:
    run_dir: Path
    model_path: Path
    epochs: int
    steps: int
    seconds: float
    images_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # one row per logged epoch
    results: Any = None  # evaluation results when asked for


def lr_at(cfg: Config, epoch: int) -> float:
    """Learning rate of 0-based `epoch` (§5): the authors call StepLR(step_size=0.8 * epochs).step(epoch) after each
    epoch, so epoch `step_size` itself still runs at the full rate (801 of 1000 epochs at 1e-4, 199 at 1e-5)."""
    t = cfg.train
    decay_epoch = t.lr_decay_epoch or int(round(0.8 * t.epochs))
    return t.lr * (t.lr_decay if epoch > decay_epoch else 1.0)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """One training run: `Trainer(cfg)` checks everything and builds model, optimiser and data; `run()` trains to
    cfg.train.epochs and writes the deployable model.

    The construction goes in four steps, each a method: `_preflight` (the output folder, the checkpoint to resume, the
    backbone, data roots and weights: every cheap check before any image is decoded), `_read_data` (every training image
    and mask decoded once, the held-out split), `_build_model` (detector, optimiser, the resumed state) and
    `_build_loader` (training set, feature cache, sampler and batches).
    """

    def __init__(self, cfg: Config, resume: str | Path | None = None, progress: bool = True,
                 evaluate: bool = False) -> None:
        cfg.data.roots = [absolute_spec(r) for r in cfg.data.roots]  # config.json and the model work from anywhere
        if cfg.data.textures:
            cfg.data.textures = str(Path(cfg.data.textures).expanduser().absolute())
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.safetensors"
        self.dist, dist_device = distributed.setup(cfg.train.device)  # several processes under torchrun
        self.device = dist_device or resolve_device(cfg.train.device)
        self.local_batch = distributed.per_rank_batch(cfg.train.batch_size, self.dist)
        set_threads(cfg.train.threads)
        state = self._preflight(resume)
        samples = self._read_data(evaluate)
        self._build_model(samples, state, resume)
        self._build_loader(samples)

    # -- construction ------------------------------------------------------------------------------------------------
    def _preflight(self, resume: str | Path | None) -> CheckpointState | None:
        """The checks that need no image decoded: the output folder (an earlier run in it is never overwritten), the
        checkpoint to resume (compatible, not already complete), the backbone's taps, the data roots, the weights."""
        cfg, t = self.cfg, self.cfg.train
        state: CheckpointState | None = None
        if resume is not None:
            state = load_checkpoint(resume)
            if state.optimizer is None:
                raise CheckpointError(
                    f"cannot resume {resume}: it holds no training state (a trained model, or one written by onenip "
                    "calibrate); resume from RUN/checkpoints/last.safetensors"
                )
            adopt_resolved(state.config, cfg)
            diffs = incompatible_keys(state.config, cfg)
            if diffs:
                raise CheckpointError(f"cannot resume {resume}: options differ from the checkpoint's: {', '.join(diffs)}")
            if state.epoch >= t.epochs or (t.max_steps and state.step >= t.max_steps):
                done = f"{state.epoch} of {t.epochs} epochs" + (f", {state.step} of {t.max_steps} steps" if t.max_steps else "")
                raise TrainingError(
                    f"{resume}: the run is complete ({done}); nothing to resume and nothing was written. To train "
                    "longer, resume it with a larger --train.epochs (or --train.max_steps)"
                )
        elif self.dist.is_main:
            earlier = sorted(p.name for p in map(self.run_dir.joinpath, RUN_FILES) if p.exists())
            if self.ckpt_path.exists():
                raise TrainingError(
                    f"{self.run_dir} already holds a training run ({self.ckpt_path}); resume it with --resume "
                    f"{self.ckpt_path} or choose another output_dir"
                )
            if "model.safetensors" in earlier:
                raise TrainingError(f"{self.run_dir} already holds a trained model ({self.run_dir / 'model.safetensors'}); "
                                    "choose another output_dir")
            if earlier:
                raise TrainingError(f"{self.run_dir} holds an earlier run ({', '.join(earlier)}), which a new run would "
                                    "overwrite or mix with its own files; choose another output_dir or remove them")
        check_output_folder(self.run_dir, "output_dir")
        tap_indices(cfg.backbone.name, cfg.backbone.strides)  # a backbone without the needed taps fails first,
        check_roots(cfg.data.roots)  # so do missing data roots,
        if state is None:  # a missing weights file or package and an unreachable hub (a checkpoint has its own)
            check_weights(cfg.backbone)
        return state

    def _read_data(self, evaluate: bool) -> list[Sample]:
        """Every training image and mask decoded once (bad data stops here, before any work), the images held out for
        the thresholds, and with `evaluate` the test split too. Logs the counts per category."""
        cfg = self.cfg
        threads = max(1, cfg.data.workers)
        samples, self.skipped = load_split(cfg.data.roots, "train", cfg.data.categories or None, cfg.data.skip_bad,
                                           threads=threads)
        samples, self.holdout = split_holdout(samples, cfg.data.holdout, cfg.train.seed)  # never trained on
        self.test_samples: list[Sample] | None = None
        self.test_skipped: list[tuple[Sample, str]] = []
        if evaluate:
            self.test_samples, self.test_skipped = load_split(cfg.data.roots, "test", cfg.data.categories or None,
                                                              cfg.data.skip_bad, threads=threads)
        if self.dist.is_main:
            log.info(data_summary(samples, self.holdout, self.test_samples))
        return samples

    def _build_model(self, samples: list[Sample], state: CheckpointState | None, resume: str | Path | None) -> None:
        """The detector (new, or the resumed checkpoint's), the optimiser, and the counters and random state."""
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
        if state is not None:
            self.detector = Detector.from_state(state, source=str(resume))
            self.detector.cfg = cfg
        else:
            self.detector = Detector.build(cfg)
        self.detector.to(self.device)
        self.detector.extra["categories"] = sorted({smp.category for smp in samples + self.holdout})
        self.detector.extra["holdout"] = [str(smp.image) for smp in self.holdout]  # evaluation leaves them out too
        self.net = self.detector.net
        self.fast = t.engine == "fast"
        fused = self.fast and self.device.type == "cuda"  # one kernel for the whole optimizer step
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=t.lr, betas=(0.9, 0.999), weight_decay=t.weight_decay,
                                           fused=fused or None)
        self.epoch, self.step, self.history = 0, 0, []
        self.epoch_step = 0  # batches of the current epoch already trained (a run interrupted mid-epoch resumes there)
        if state is not None:
            if state.optimizer is not None:
                self.optimizer.load_state_dict(state.optimizer)
            set_rng_state(state.rng, self.device)
            self.epoch, self.step, self.history = state.epoch, state.step, state.history
            self.epoch_step = int(state.extra.get("epoch_step", 0))
            self.detector.extra.pop("epoch_step", None)
        if self.dist.rank > 0:  # jitter and dropout: each process its own stream
            torch.manual_seed(hash((t.seed, self.dist.rank, self.step)) & 0x7FFF_FFFF)
        self.model: torch.nn.Module = self.net  # what the training forward runs: the network or its DDP wrapper
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.model.v1_decoder_bug,  # the v1 decoder leaves image_to_prompt unused
            )
        if t.compile != "none":
            self.model = torch.compile(self.model, mode=t.compile, dynamic=False)

    def _build_loader(self, samples: list[Sample]) -> None:
        """The training set, the backbone of the training step (and its feature cache), the sampler and the batches:
        a DataLoader (plain engine) or batches made on the device (fast engine)."""
        cfg, t = self.cfg, self.cfg.train
        self.synthesize = t.restoration or cfg.model.refiner
        self.dataset = TrainSet(
            samples, cfg.data.input_size, cfg.synthesis, cfg.data.textures, prompt=t.prompt,
            synthesize=self.synthesize, seed=t.seed, cache=cfg.data.cache_images, threads=max(1, cfg.data.workers),
            return_normals=not t.cache_features,
        )
        # the backbone that sees the synthesized images at every step; the fast path's is channels-last, its weights
        # in bf16 on CUDA with train.amp (where the plain path autocasts), and it computes the feature cache too, so
        # that both halves of a batch, [normal; synthetic], come from the same backbone
        self.step_backbone = self.detector.extractor
        if self.fast:
            self.step_backbone = self.detector.extractor.fast_copy(torch.bfloat16 if self.amp else torch.float32)
        self.feature_cache = self.cache_normal_features() if t.cache_features else None
        self.sampler = EpochSampler(len(self.dataset), t.seed, self.dist.rank, self.dist.world_size)
        self.loader: DataLoader | DeviceBatches
        if self.fast:
            textures = None
            if cfg.data.textures:
                textures = load_texture_bank(cfg.data.textures, cfg.data.input_size, self.device, cfg.synthesis.texture_resize)
            self.loader = DeviceBatches(self.dataset, self.sampler, self.local_batch, self.device, textures)
            if t.compile_synthesis != "none":
                self.loader.synthesizer.compile(self.local_batch, t.compile_synthesis)
        else:
            self.loader = DataLoader(
                self.dataset, batch_size=self.local_batch, sampler=self.sampler, num_workers=cfg.data.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=cfg.data.workers > 0, drop_last=False,
                generator=torch.Generator().manual_seed(t.seed),  # worker seeds must not consume the global RNG (resume)
            )
        # how often the CPU waits for the loss (NaN check, progress): every step, or every 25 on the fast CUDA path
        self.sync_every = 25 if self.fast and self.device.type == "cuda" else 1
        self._unchecked: torch.Tensor | None = None  # summed losses since the last NaN check (on the device)
        self._unchecked_from = self.step + 1

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and self.cfg.train.amp

    @torch.no_grad()
    def cache_normal_features(self) -> torch.Tensor:
        """Backbone features of every (unaugmented) training image, (N, C, H, W) on the training device."""
        size, bs = self.cfg.data.input_size, self.local_batch
        out = []
        for s in range(0, len(self.dataset), bs):
            images = torch.stack([torch.from_numpy(self.dataset.image(i).transpose(2, 0, 1).copy())
                                  for i in range(s, min(s + bs, len(self.dataset)))]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp and not self.fast):
                out.append(self.step_backbone(images))
        feats = torch.cat(out)
        assert feats.shape[-1] == size // 16
        return feats

    def batch_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Backbone features (clean query, synthetic, prompt), each (B, C, H, W); None where not used."""
        dev, use_prompt = self.device, self.net.uses_prompt
        if self.feature_cache is not None:
            clean = self.feature_cache[batch["index"].to(dev)]
            prompt = self.feature_cache[batch["prompt_index"].to(dev)] if use_prompt else None
            synthetic = None
            if self.synthesize:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp and not self.fast):
                    synthetic = self.step_backbone(batch["synthetic"].to(dev, non_blocking=True))
            return clean, synthetic, prompt
        parts = [batch["image"].to(dev, non_blocking=True)]  # one backbone pass over [query; synthetic; prompt]
        if self.synthesize:
            parts.append(batch["synthetic"].to(dev, non_blocking=True))
        if use_prompt:
            parts.append(batch["prompt"].to(dev, non_blocking=True))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            feats = self.detector.features(torch.cat(parts))
        chunks = list(feats.chunk(len(parts)))
        return chunks[0], chunks[1] if self.synthesize else None, chunks[-1] if use_prompt else None

    # -- one optimizer step ------------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (§5)."""
        cfg, dev = self.cfg, self.device
        clean, synthetic, prompt = self.batch_features(batch)
        b, size = clean.shape[0], cfg.data.input_size
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            query = torch.cat([clean, synthetic]) if synthetic is not None else clean  # [normal; synthetic]
            rec, logits = self.model(query, prompt, size if self.net.refiner is not None else 0)
            if cfg.train.restoration:
                mse = feature_mse(rec, clean.repeat(2, 1, 1, 1))  # the synthetic half is restored to its clean features
            else:
                mse = feature_mse(rec[:b], clean)
            out = {"mse": mse, "loss": mse}
            if logits is not None:
                masks = torch.cat([torch.zeros_like(batch["mask"]), batch["mask"]]).to(dev)
                dice = dice_loss(logits, masks, standard=cfg.train.dice_standard)
                out["dice"] = dice
                out["loss"] = mse + cfg.train.dice_weight * dice
        return out

    def check_finite(self, force: bool = False) -> None:
        """Stop with a clear message when the loss of a step since the last check was NaN or infinite.

        The plain engine checks every step. The fast engine on CUDA keeps the losses on the GPU and checks every
        `sync_every` steps and at the end of every epoch (before a checkpoint is written), so the CPU never waits for the
        GPU in between; a bad step's checkpoint is never written either way."""
        if self._unchecked is None or not (force or self.step % self.sync_every == 0):
            return
        bad = not bool(torch.isfinite(self._unchecked))
        first, self._unchecked, self._unchecked_from = self._unchecked_from, None, self.step + 1
        if bad:
            where = f"step {self.step}" if first == self.step else f"one of steps {first}-{self.step}"
            raise TrainingError(
                f"the loss became NaN or infinite at {where} (epoch {self.epoch + 1}); training stopped. "
                f"The last good checkpoint is {self.ckpt_path if self.ckpt_path.exists() else 'not written yet'}. "
                "Try a lower train.lr or check the input images."
            )

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the loss terms (detached, on the device; mean over processes)."""
        self.net.train()
        terms = self.losses(batch)
        loss = terms["loss"]
        if self.dist.enabled:  # the log and the NaN check see the mean over processes, so all stop together
            keys = list(terms)
            mean = distributed.mean_over_ranks(torch.stack([terms[k].detach().float() for k in keys]), self.dist)
            logged = dict(zip(keys, mean))
        else:
            logged = terms
        if self.sync_every == 1 and not torch.isfinite(logged["loss"]):  # before the step: the weights stay good
            raise TrainingError(
                f"the loss became {logged['loss'].item()} at epoch {self.epoch + 1}, step {self.step + 1}; training stopped. "
                f"The last good checkpoint is {self.ckpt_path if self.ckpt_path.exists() else 'not written yet'}. "
                "Try a lower train.lr or check the input images."
            )
        if self.sync_every > 1:  # checked later, in check_finite
            loss_sum = logged["loss"].detach().float()
            self._unchecked = loss_sum if self._unchecked is None else self._unchecked + loss_sum
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.check_finite()
        return {k: v.detach() for k, v in logged.items()}

    # -- checkpoints and logs ----------------------------------------------------------------------------------------
    def save(self, path: Path | None = None, training_state: bool = True) -> Path:
        """Write a checkpoint (rank 0 only; the others return the path it is written to)."""
        if not self.dist.is_main:
            return path or self.ckpt_path
        ckpt = self.detector.checkpoint_state(
            epoch=self.epoch, step=self.step, optimizer=self.optimizer.state_dict() if training_state else None,
            rng=rng_state(self.device) if training_state else {}, history=self.history,
        )
        return save_checkpoint(path or self.ckpt_path, ckpt)

    def write_log(self) -> None:
        if self.dist.is_main:
            atomic_write_csv(self.run_dir / "train_log.csv", self.history)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self, evaluate_every: int | None = None) -> FitResult:
        """Train to cfg.train.epochs (or train.max_steps), then build the deployment and write model.safetensors.

        Ctrl-C (SIGINT) stops after the step in progress: the checkpoint is written (atomically) with the position in
        the epoch, so that `onenip fit --resume` continues exactly where the run stopped; a second Ctrl-C stops at once.
        """
        cfg, t = self.cfg, self.cfg.train
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.json", cfg.to_json())
        if self.skipped and main:  # data.skip_bad: what was left out, and why
            atomic_write_csv(self.run_dir / "skipped_train.csv",
                             [{"image": str(smp.image), "mask": str(smp.mask or ""), "reason": why} for smp, why in self.skipped])
        total = t.epochs * len(self.loader)
        if t.max_steps:
            total = min(total, t.max_steps)
        bar = progress_bar(total=total, initial=min(self.step, total), unit="step", disable=not (self.progress and main),
                           desc="fit")
        clock = {"start": time.perf_counter(), "images": 0, "first_step": self.step, "total": total}
        evaluate_every = t.eval_every if evaluate_every is None else evaluate_every
        try:
            with stop_on_sigint() as stop:
                while not self.finished:
                    self._train_epoch(bar, clock, evaluate_every, stop)
                    if stop() and not self.finished:  # a Ctrl-C on the last step lets the run end as planned
                        self._save_interrupted()
                        raise KeyboardInterrupt
        finally:
            bar.close()
        elapsed = time.perf_counter() - clock["start"]
        model_path = self.run_dir / "model.safetensors"
        if main:  # thresholds and prompt pool: one process is enough
            self.detector.deployment = build_deployment(self.detector, self.dataset.samples, self.holdout, cfg.eval.far)
            self.save(model_path, training_state=False)
        distributed.barrier(self.dist)
        return FitResult(
            run_dir=self.run_dir, model_path=model_path, epochs=self.epoch, steps=self.step, seconds=elapsed,
            images_per_second=clock["images"] / max(elapsed, 1e-9), history=self.history,
        )

    @property
    def out_of_steps(self) -> bool:
        """train.max_steps is set and reached."""
        return bool(self.cfg.train.max_steps and self.step >= self.cfg.train.max_steps)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.train.epochs or self.out_of_steps

    def _train_epoch(self, bar: Any, clock: dict[str, Any], evaluate_every: int, stop: Callable[[], bool]) -> None:
        """Train the rest of the current epoch (from batch `epoch_step`), log its row, write the checkpoint when due.
        A stop asked for (Ctrl-C) before the epoch's last batch ends it after the step in progress, without its row:
        `epoch_step` says where."""
        cfg, t, main = self.cfg, self.cfg.train, self.dist.is_main
        lr = lr_at(cfg, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sampler.set_epoch(self.epoch, skip=self.epoch_step * self.local_batch)
        sums: dict[str, torch.Tensor] = {}
        n_batches, n_images, t0 = 0, 0, time.perf_counter()
        for batch in self.loader:
            terms = self.train_step(batch)
            self.epoch_step += 1
            for k, v in terms.items():
                sums[k] = sums[k] + v if k in sums else v
            n_batches += 1
            n_images += len(batch["index"]) * self.dist.world_size
            bar.update(1)
            if self.step % self.sync_every == 0:
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{float(terms['loss']):.4f}",
                                img_s=f"{n_images / max(time.perf_counter() - t0, 1e-9):.1f}")
            if self.out_of_steps or stop():
                break
        self.check_finite(force=True)  # before this epoch's row and checkpoint
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        clock["images"] += n_images
        if self.epoch_step < len(self.loader) and not self.out_of_steps:  # stopped part way
            return
        seconds = time.perf_counter() - t0
        self.epoch += 1
        self.epoch_step = 0
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "lr": lr}
        row.update({k: round(float(v) / max(n_batches, 1), 6) for k, v in sums.items()})
        row.update({"images_per_s": round(n_images / max(seconds, 1e-9), 2), "seconds": round(seconds, 3)})
        if main and evaluate_every and self.epoch % evaluate_every == 0 and self.epoch < t.epochs:
            row.update(self._evaluate_row())
        self.history.append(row)
        self.write_log()
        if not self.progress and main:  # one line per epoch, with an estimate of the time left
            done = max(self.step - clock["first_step"], 1)
            left = (clock["total"] - min(self.step, clock["total"])) * (time.perf_counter() - clock["start"]) / done
            log.info(" ".join(f"{k}={v}" for k, v in row.items()) + f" eta={left / 60:.1f}min")
        if self.finished or (t.save_every and self.epoch % t.save_every == 0):
            self.save()

    def _save_interrupted(self) -> None:
        """The checkpoint of a run stopped by Ctrl-C, with the batches of the current epoch already trained."""
        self.detector.extra["epoch_step"] = self.epoch_step
        try:
            path = self.save()
        finally:
            self.detector.extra.pop("epoch_step", None)
        if self.dist.is_main:
            where = f"epoch {self.epoch + 1}, after batch {self.epoch_step} of {len(self.loader)}" if self.epoch_step \
                else f"the end of epoch {self.epoch}"
            log.warning(f"interrupted: the checkpoint {path} holds the run at step {self.step} ({where}); continue it "
                        f"with: onenip fit --resume {path}")

    def _evaluate_row(self) -> dict[str, float]:
        results = run_evaluation(self.detector, self.cfg, progress=False)
        return {f"test_{k}": round(v, 6) for k, v in results.mean(results.main_map).items() if not math.isnan(v)}


def data_summary(train: list[Sample], holdout: list[Sample], test: list[Sample] | None) -> str:
    """One line per category: training images, held out (for the thresholds) and test images (when read)."""
    cats = sorted({s.category for s in train + holdout + (test or [])})
    count = {name: Counter(s.category for s in part) for name, part in (("train", train), ("held", holdout),
                                                                         ("test", test or []))}
    width = max(len(c) for c in cats)
    lines = [f"{len(cats)} categories: {len(train)} training images, {len(holdout)} held out for the thresholds"
             + (f", {len(test)} test images" if test is not None else "")]
    for c in cats:
        line = f"  {c:<{width}}  train {count['train'][c]:>5}  held out {count['held'][c]:>4}"
        lines.append(line + (f"  test {count['test'][c]:>5}" if test is not None else ""))
    return "\n".join(lines)


def fit(cfg: Config, resume: str | Path | None = None, progress: bool = True, evaluate: bool = False) -> FitResult:
    """Train one model on every category of cfg.data.roots; optionally evaluate it on their test splits (read and
    decoded before training starts, so that a bad test file stops the run before any work)."""
    trainer = Trainer(cfg, resume=resume, progress=progress, evaluate=evaluate)
    try:
        result = trainer.run()
    finally:
        distributed.teardown(trainer.dist)
    if evaluate and trainer.dist.is_main:
        result.results = run_evaluation(trainer.detector, cfg, progress=progress, samples=trainer.test_samples,
                                        skipped=trainer.test_skipped)
        result.results.checkpoint = str(result.model_path.absolute())  # as saved paths are: links not resolved
        write_results(result.results, trainer.run_dir / "results" / cfg.eval.protocol)
    return result
