"""`onenip demo`: the whole job on an embedded default, with no download and no user data.

It generates a small multi-category dataset (`onenip.demo.dataset`: procedural textures and objects whose defects are drawn
differently from the training pseudo-anomalies), trains one OneNIP model on all categories on the CPU with the offline
ImageNet EfficientNet-Lite0 backbone (the paper uses EfficientNet-B4; here at 96 px and 300 steps of batch 16 to take minutes),
evaluates it (clean protocol: the category is not given) and prints the table.
"""

from __future__ import annotations

import time
from pathlib import Path

from onenip.api import make_config
from onenip.checkpoint import check_output_folder
from onenip.demo.dataset import make_demo_dataset
from onenip.errors import ConfigError
from onenip.evaluation.evaluate import evaluate, write_results
from onenip.training.trainer import Trainer

DEMO_STEPS = 300


def demo_config(output: str | Path, data_root: str | Path, steps: int, device: str) -> list[str]:
    """Overrides of the demo: small input, the offline backbone, a short schedule."""
    return [
        f"data.roots=[{Path(data_root).as_posix()}]",
        "data.input_size=96",  # the 128-px demo images at 96 px: 36 tokens per image, minutes on 2 CPU cores
        "data.workers=0",  # synthesis is cheap at this size; worker processes would compete for the 2 cores
        "backbone.name=tf_efficientnet_lite0",
        "backbone.weights=efficientnet-lite",
        "train.batch_size=16",
        "train.epochs=1000",
        f"train.max_steps={steps}",
        "train.lr=4e-4",
        "train.lr_decay_epoch=1000",
        "train.save_every=0",
        f"train.device={device}",
        "eval.prompt_pool=2",
        "eval.maps=[rec, ref, fused]",
        f"output_dir={Path(output).as_posix()}",
    ]


TINY_TYPES = ("disc", "weave")
"""The product types of the tiny model (`tiny_config`): an object and a texture of the demo's data."""


def tiny_config(input_size: int = 64) -> list[str]:
    """Overrides of the smallest complete OneNIP (Lite0 backbone, hidden size 64, refiner, prompts; 3 training steps
    of batch 8 on the CPU: seconds) on the demo's `TINY_TYPES`, a quarter of the normal images held out for the
    thresholds. The test suite's model (tests/conftest.py) and benchmarks/serve_load.py's; add ``data.roots`` (the
    demo's data, `make_demo_dataset`), ``output_dir`` and, optionally, ``data.textures``. Its speed is that of a real
    model of this input size and backbone; its judgement is not (the transformer is small and barely trained)."""
    return [
        f"data.categories=[{', '.join(TINY_TYPES)}]", f"data.input_size={input_size}", "data.workers=0",
        "data.holdout=0.25", "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
        "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "model.refiner_channels=32", "train.batch_size=8",
        "train.max_steps=3", "train.device=cpu",
    ]


def run_demo(output: str | Path = "runs/demo", steps: int | None = None, device: str = "auto", progress: bool = True):
    start = time.perf_counter()
    output = check_output_folder(output, "--output")  # a file there (or above) is an error, not a traceback
    steps = DEMO_STEPS if steps is None else steps
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if (output / "run").exists():  # before generating the data again
        raise ConfigError(f"{output} already holds a demo run ({output / 'run'}); choose another --output")
    data_root = make_demo_dataset(output / "data")
    print(f"demo data: {data_root} (generated)")
    cfg = make_config(None, demo_config(output / "run", data_root, steps, device))
    trainer = Trainer(cfg, progress=progress)  # refuses to overwrite an earlier demo run in the same folder
    print(f"training one model on {len(trainer.dataset.categories)} categories ({', '.join(trainer.dataset.categories)}) "
          f"for {steps} steps on {trainer.device} ...")
    fit = trainer.run()
    print(f"trained in {fit.seconds:.0f} s ({fit.images_per_second:.1f} query images/s)")
    results = evaluate(trainer.detector, cfg, progress=progress)
    results.checkpoint = str(Path(fit.model_path).absolute())  # saved paths keep links (as typed)
    folder = write_results(results, Path(cfg.output_dir) / "results" / cfg.eval.protocol)
    print()
    print(f"clean protocol: category not given; prompt retrieval right for "
          f"{100 * (results.retrieval_accuracy or 0):.1f} % of test images")
    print(results.to_markdown("fused"))
    print()
    print(f"results: {folder}; model: {fit.model_path}; total {time.perf_counter() - start:.0f} s")
    return results

