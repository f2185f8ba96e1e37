"""Python API: the same jobs as the command line.

    import onenip
    result = onenip.fit("configs/iad-mix-offline.yaml", overrides=["train.epochs=100"], evaluate=True)
    results = onenip.test(result.model_path, overrides=["eval.protocol=paper"])
    print(results.to_markdown())

`calibrate` and `add_type` change a trained model's deployment and write the model again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onenip.checkpoint import (
    adopt_resolved,
    check_output_file,
    check_output_folder,
    checkpoint_file,
    incompatible_keys,
    load_checkpoint,
)
from onenip.config import Config, load_config, merge_dict, validate
from onenip.deploy.predictor import expand_inputs
from onenip.errors import CheckpointError, ConfigError
from onenip.evaluation.calibration import add_type as _add_type
from onenip.evaluation.calibration import (
    check_colour_margin,
    check_far,
    check_one_method,
    check_prompt_fusion,
    recalibrate,
)
from onenip.evaluation.evaluate import Results, evaluate, write_results
from onenip.models.deployment import Deployment
from onenip.models.detector import Detector, resolve_device, set_threads
from onenip.training.trainer import FitResult
from onenip.training.trainer import fit as _fit

ConfigLike = Config | dict[str, Any] | str | Path | list[str | Path] | None


def make_config(config: ConfigLike = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """A new validated Config from a Config, a nested dict, one or several YAML files, plus KEY=VALUE overrides (neither
    `config` nor `base` is changed)."""
    if isinstance(config, Config):
        return load_config(overrides=overrides, base=config)
    if isinstance(config, dict):
        return load_config(overrides=overrides, base=merge_dict(base or Config(), config))
    files = [config] if isinstance(config, (str, Path)) else list(config or [])
    return load_config(files, overrides, base=base)


def fit(
    config: ConfigLike = None,
    overrides: list[str] | None = None,
    resume: str | Path | None = None,
    evaluate: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train one model on all categories of config data.roots (see `onenip fit --help` for every option).

    With `resume`, the checkpoint's configuration is the base and `config`/`overrides` are applied on top of it.
    """
    base = None
    if resume is not None:
        ckpt = checkpoint_file(resume)
        base = load_checkpoint(ckpt, with_training_state=False).config
        if ckpt.parent.name == "checkpoints":  # the run goes on in the folder it was found in, even when moved
            base.output_dir = str(ckpt.parent.parent)
    cfg = make_config(config, overrides, base=base)
    return _fit(cfg, resume=resume, progress=progress, evaluate=evaluate)


def test(
    checkpoint: str | Path,
    config: ConfigLike = None,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    progress: bool = True,
) -> Results:
    """Evaluate a trained model on the test split of its data roots (or others given in `config`/`overrides`).

    Results are written to `output` (default: <run folder>/results/<protocol>, the run folder being the one that
    holds the model, or checkpoints/ when it is a training checkpoint) as results.json, results.md and scores.csv,
    and returned.
    """
    checkpoint = checkpoint_file(checkpoint, with_training_state=False)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    out = check_output_folder(Path(output) if output else run / "results", "output")  # + the protocol, below
    state = load_checkpoint(checkpoint, with_training_state=False)
    cfg = make_config(config, overrides, base=state.config)
    adopt_resolved(state.config, cfg)
    diffs = incompatible_keys(state.config, cfg)
    if diffs:
        raise CheckpointError(f"{checkpoint} was trained with other values of: {', '.join(diffs)}")
    validate(cfg)
    state.config = cfg
    set_threads(cfg.train.threads)
    detector = Detector.from_state(state, source=str(checkpoint)).to(resolve_device(cfg.train.device))
    results = evaluate(detector, cfg, progress=progress)
    results.checkpoint = str(checkpoint.expanduser().absolute())  # as given, made absolute; links are not resolved
    write_results(results, out if output else out / cfg.eval.protocol)
    return results


def _rewrite_deployment(checkpoint: str | Path, output: str | Path | None,
                        change: Callable[[Detector], Deployment]) -> tuple[Path, Deployment, Deployment | None]:
    """Load the model `checkpoint` names (a run folder: its model.safetensors), give it the deployment
    `change(detector)` returns, and write it: in place (atomically) unless `output` is given; never over a training
    checkpoint. Returns the written path, the new deployment and the one it replaced (None: the model had none)."""
    source = checkpoint_file(checkpoint, with_training_state=False)
    target = check_output_file(output or source, "--output" if output else "MODEL")
    detector = Detector.load(source)
    before = detector.deployment
    detector.deployment = change(detector)
    return detector.save(target), detector.deployment, before


def calibrate(checkpoint: str | Path, far: float | None = None, val_roots: Sequence[str | Path] | None = None,
              output: str | Path | None = None, skip_bad: bool = False,
              colour_margin: float | None = None,
              prompt_fusion: float | None = None) -> tuple[Path, Deployment, Deployment | None]:
    """Set a trained model's thresholds again, at false alarm rate `far` (default: its eval.far) on the normal images
    held out of its training, or F1-optimal on the labelled validation roots `val_roots` (not both: a ConfigError
    before anything is loaded); see `onenip.evaluation.calibration.recalibrate`. The model is written in place
    (atomically) unless `output` is given. Returns the written path, the new deployment and the previous one (None for
    a model saved without one). `colour_margin`: the colour check's margin (0: off; see `recalibrate`).
    `prompt_fusion`: prompt-map fusion on the trained types at this beta (0: off), the model's eval.prompt_fusion
    with it, before the thresholds are set."""
    check_one_method(far, val_roots)
    check_colour_margin(colour_margin)
    check_prompt_fusion(prompt_fusion)

    def change(detector: Detector) -> Deployment:
        cfg = detector.cfg if prompt_fusion is None else \
            make_config(detector.cfg, [f"eval.prompt_fusion={prompt_fusion}"])  # checked before any work
        dep = recalibrate(detector, far=far, val_roots=val_roots, skip_bad=skip_bad, colour_margin=colour_margin,
                          prompt_fusion=prompt_fusion)
        detector.cfg = cfg
        return dep

    return _rewrite_deployment(checkpoint, output, change)


def add_type(checkpoint: str | Path, name: str, images: Sequence[str | Path], normal: Sequence[str | Path] = (),
             far: float | None = None, output: str | Path | None = None, skip_bad: bool = False,
             replace: bool = False) -> tuple[Path, Deployment]:
    """Add the product type `name` to a trained model from normal `images` (files, folders or globs; K >= 1) with no
    training (see `onenip.evaluation.calibration.add_type`; `replace`: `name` was added before, and its prompts,
    threshold and limit are replaced), and write the model: in place (atomically) unless `output` is given. Returns
    the written path and the new deployment."""
    if not images:
        raise ConfigError("give at least one normal image of the new type")
    check_far(far)  # before the model is loaded and the images are scored

    def change(detector: Detector) -> Deployment:
        files = expand_inputs([str(p) for p in images])
        extra = expand_inputs([str(p) for p in normal]) if normal else []
        return _add_type(detector, name, files, extra, far=far, skip_bad=skip_bad, replace=replace)

    path, deployment, _ = _rewrite_deployment(checkpoint, output, change)
    return path, deployment
