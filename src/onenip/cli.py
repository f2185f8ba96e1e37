"""Command line: `onenip fit`, `onenip test`, `onenip demo`.

Every configuration option is also a command-line option (`--section.option VALUE`), documented in `--help`.
Precedence: defaults < YAML files given with --config (in order) < command-line options < --set KEY=VALUE.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

from onenip.config import Override, closest, list_text, option_table
from onenip.errors import ConfigError, OnenipError, OnenipWarning


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


# Data options that only training reads (the model fixes data.input_size): `onenip test` does not offer them.
TRAINING_ONLY = ("data.input_size", "data.textures", "data.cache_images", "data.holdout")


VALUES = ("Each value is converted by its option's type and a text option keeps what was typed (--data.categories 02 "
          "is the category '02', --output_dir 010 the folder '010'). true/false (or yes/no, 1/0) for switches. A list "
          "option takes several values (--data.categories 01 02) or one [a, b] (quote an item holding a comma); [] "
          "empties it. The same in --set KEY=VALUE: --set 'data.categories=[01, 02]'.")


def _metavar(tp: Any, choices: tuple | None) -> str:
    """What an option's value is: {a,b} for choices, INT, NUMBER, TEXT (a list option's items alike)."""
    item = typing.get_args(tp)[0] if _is_list(tp) else tp
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return {bool: "{true,false}", int: "INT", float: "NUMBER"}.get(item, "TEXT")


def _shown(default: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(default, list):
        return " ".join(map(str, default)) if default else "[]"
    if isinstance(default, bool):
        return str(default).lower()
    return "unset" if default is None else str(default)


class _SetsOption(argparse.Action):
    """An option that sets the configuration option of its dest, 'opt:KEY' (`_overrides` reads them all): it keeps the
    value (a flag that takes none: its `const`) with the option as typed, which an error about the value names."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = [] if self.nargs == 0 else values if isinstance(values, list) else [values]
        setattr(namespace, self.dest, (" ".join([str(option_string), *given]), self.const if self.nargs == 0 else values))


def _add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, key: str, help_text: str,
                metavar: str | None = None, nargs: str | int | None = None, const: str | None = None) -> None:
    """The command-line option `flag` for the configuration option `key`: --KEY itself, or a shorter flag for it
    (--skip-bad, --device). A flag with nargs=0 takes no value and sets `const`."""
    parser.add_argument(flag, dest=f"opt:{key}", action=_SetsOption, metavar=metavar, nargs=nargs, const=const,
                        default=None, help=help_text)


def _add_config_options(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None,
                        exclude: tuple[str, ...] = ()) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, tp, default, help_text, choices in option_table():
        section = key.split(".")[0] if "." in key else "general"
        if sections is not None and section not in sections or key in exclude:
            continue
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options", None if groups else VALUES)
        _add_option(groups[section], f"--{key}", key, f"{help_text} (default: {_shown(default)})".replace("%", "%%"),
                    metavar=_metavar(tp, choices), nargs="+" if _is_list(tp) else None)


def _list_item(values: list[str]) -> str:
    """A list option's arguments as override text: each argument one item, kept as typed (`--data.categories 01 02`);
    a single `[a, b]` argument (or `[]`) is read as a list."""
    if len(values) == 1 and (values[0].strip().startswith("[") or not values[0].strip()):
        return values[0]
    return list_text(values)


def _overrides(args: argparse.Namespace) -> list[Override]:
    """The configuration options given on the command line (`_add_option`'s, then --set) as KEY=VALUE overrides,
    values as typed: the option's type converts them when `load_config` merges them, and an error names the option as
    it was given."""
    out = []
    for dest, given in vars(args).items():
        if dest.startswith("opt:") and given is not None:
            typed, value = given
            out.append(Override(f"{dest[4:]}={_list_item(value) if isinstance(value, list) else value}",
                                f"command line: {typed}"))
    return out + [Override(item, f"command line: --set {item}") for item in args.set or []]


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: --train.epoch is an error, not --train.epochs (the top parser and every command's).
    A command's error is printed under a one-line usage (`short_usage`), not the dozens of lines of its options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def short_usage(self) -> str:
        """'usage: onenip test [options] checkpoint (onenip test --help lists them)': the command, its positional
        arguments and where its options are listed."""
        names = []
        for action in self._actions:
            if action.option_strings or isinstance(action, argparse._SubParsersAction):
                continue
            name = action.metavar or action.dest
            names.append(f"{name} [{name} ...]" if action.nargs == "+" else name)
        return f"usage: {' '.join([self.prog, '[options]', *names])} ({self.prog} --help lists them)"

    def error(self, message: str) -> typing.NoReturn:
        if self._subparsers is not None:  # the top parser: its usage is one line already
            super().error(message)
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {message}\n")


def version_text() -> str:
    """'onenip 0.1.0 (torch 2.x)': onenip's version, and PyTorch's where it is installed (read without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    from onenip.version import __version__

    try:
        torch = f" (torch {version('torch')})"
    except PackageNotFoundError:
        torch = ""
    return f"onenip {__version__}{torch}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onenip",
        description="Unified multi-class anomaly detection with one normal image prompt (OneNIP, ECCV 2024).",
    )
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the versions of onenip and PyTorch, and exit")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{fit,test,predict,serve,calibrate,add-type,export,report,demo}",
                                parser_class=_Parser)

    fit = sub.add_parser("fit", help="train one model on all categories of the data roots",
                         description="Train one OneNIP (or UniAD) model on the defect-free training images of every "
                                     "category of the data roots at once.")
    fit.add_argument("--config", action="append", metavar="FILE", help="YAML configuration file (repeatable)")
    fit.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint (its configuration is the base)")
    fit.add_argument("--evaluate", action="store_true", help="evaluate on the test split after training")
    fit.add_argument("--no-progress", action="store_true", help="one log line per epoch instead of a progress bar")
    _add_option(fit, "--skip-bad", "data.skip_bad", "same as --data.skip_bad true: leave out unusable files", nargs=0,
                const="true")
    fit.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any option, e.g. train.epochs=10")
    _add_config_options(fit)

    test = sub.add_parser("test", help="evaluate a trained model on a test split",
                          description="Evaluate a checkpoint on the test split of its data roots (or of others given "
                                      "here): seven metrics per category and their mean, as JSON and Markdown.")
    test.add_argument("checkpoint", help="model.safetensors (or a checkpoint, or a run folder)")
    test.add_argument("--config", action="append", metavar="FILE", help="YAML configuration file (repeatable)")
    test.add_argument("--output", metavar="DIR", help="results folder (default: <checkpoint folder>/results/<protocol>)")
    _add_option(test, "--device", "train.device", "auto, cpu, cuda or cuda:N (default: the model's train.device)",
                metavar="DEVICE")
    test.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_option(test, "--skip-bad", "data.skip_bad", "same as --data.skip_bad true: leave out unusable files", nargs=0,
                const="true")
    test.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option, e.g. eval.protocol=paper")
    _add_config_options(test, sections=("data", "eval"), exclude=TRAINING_ONLY)

    pred = sub.add_parser("predict", help="judge new images: score, decision, category, heat map, defect mask",
                          description="Judge new images with a trained model. No category is needed: the most similar "
                                      "prompt of the model's pool is used, and its category's threshold decides. Writes "
                                      "predictions.csv, predictions.json, overlays/ and masks/ to --output.")
    pred.add_argument("checkpoint", help="model.safetensors of a training run, or a file of `onenip export`: .onnx "
                                         "(ONNX Runtime), .xml (OpenVINO), .torchscript.pt (TorchScript), run on the CPU")
    pred.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    pred.add_argument("--output", default="predictions", metavar="DIR", help="output folder (default: predictions)")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    pred.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")
    pred.add_argument("--no-images", action="store_true", help="only the CSV and JSON, no overlay and mask PNGs")
    pred.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (listed in the JSON)")
    pred.add_argument("--no-progress", action="store_true", help="no progress bar")
    pred.add_argument("--fast", action="store_true",
                      help="on a GPU: bf16 channels-last backbone and bf16 transformer (scores differ in the last digits)")
    pred.add_argument("--type", dest="product_type", metavar="NAME",
                      help="every image is of this product type: its prompt and threshold, no retrieval (on a line, "
                           "the type is usually known)")
    pred.add_argument("--threshold", type=float, metavar="LEVEL",
                      help="normalised score above which an image is defective (default 0.5: the calibrated threshold; "
                           "higher flags fewer images)")
    pred.add_argument("--far", type=float, metavar="RATE",
                      help="set each type's threshold at this false alarm rate on the held-out normal scores the model "
                           "keeps (no data needed; `onenip calibrate` writes a new model instead)")

    cal = sub.add_parser("calibrate", help="set new decision thresholds on a trained model",
                         description="Set each category's threshold again, one of two ways: at false alarm rate "
                                     "--far on the normal images held out of training, or F1-optimal on a labelled "
                                     "validation folder (--val, read like test data). Prints each category's old and "
                                     "new threshold and the images the new one rests on. The model file is rewritten "
                                     "(atomically) unless --output is given.")
    cal.add_argument("checkpoint", help="model.safetensors of a training run")
    cal.add_argument("--far", type=float, default=None, help="false alarm rate (default: the model's eval.far); not with --val")
    cal.add_argument("--val", nargs="+", metavar="ROOT", help="labelled validation roots (good and defective images); not with --far")
    cal.add_argument("--output", metavar="PATH", help="write the calibrated model here instead")
    cal.add_argument("--colour-margin", type=float, metavar="M",
                     help="the colour half of the unknown-type check at this margin (each type's limit is M x the "
                          "largest colour distance of one of its normal images to the others); 0 turns it off "
                          "(default: as the model has it)")
    cal.add_argument("--prompt-fusion", type=float, metavar="BETA",
                     help="fuse each trained type's prompt map (the map of a type added without training) into its "
                          "learned map with weight BETA in [0, 1] (banks and scales from the model's prompt-pool and "
                          "training images), then set the thresholds on the fused maps; 0 turns it off (default: as "
                          "the model has it)")
    cal.add_argument("--skip-bad", action="store_true", help="leave out unreadable images")

    add = sub.add_parser("add-type", help="add a product type to a trained model from a few normal images, no training",
                         description="Add a product type from K >= 1 normal images (files, folders or globs), with no "
                                     "gradient step: they join the prompt pool, the type is scored by the training-free "
                                     "prompt map (each patch's distance to the nearest patch of its prompt images), and "
                                     "it gets a threshold (from --normal images when given, else from the K images, "
                                     "each against a coreset of the others' patches, in at most 4 folds) and an unknown-type "
                                     "limit (and a colour check when the K and --normal images are 10 or more). "
                                     "predict, test, serve and "
                                     "export then treat it as a trained type. The model file is rewritten (atomically) "
                                     "unless --output is given.")
    add.add_argument("checkpoint", help="model.safetensors of a training run")
    add.add_argument("images", nargs="+", metavar="PATH", help="normal images of the new type: files, folders or globs")
    add.add_argument("--name", required=True, help="the new product type's name (with --replace: the added type's)")
    add.add_argument("--normal", nargs="+", metavar="PATH", default=[],
                     help="further normal images of the type, for its threshold and colour check (not added to the "
                          "prompts)")
    add.add_argument("--far", type=float, default=None, help="false alarm rate of the threshold (default: the model's eval.far)")
    add.add_argument("--output", metavar="PATH", help="write the model with the new type here instead")
    add.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (with a warning)")
    add.add_argument("--replace", action="store_true",
                     help="NAME is a type added before: replace its prompt images, threshold and limit")

    exp = sub.add_parser("export", help="export a trained model to ONNX, TorchScript or OpenVINO",
                         description="Write the whole image-to-decision path (backbone, prompt pool, reconstruction, "
                                     "fusion, thresholds) as one ONNX, TorchScript or OpenVINO (.xml + .bin) file. "
                                     "Before writing, the file is run and compared with PyTorch. ONNX needs `pip install "
                                     "'onenip[onnx]'`, OpenVINO `pip install 'onenip[openvino]'`. `onenip predict` "
                                     "runs the exported file.")
    exp.add_argument("checkpoint", help="model.safetensors of a training run")
    exp.add_argument("--format", default="onnx", choices=("onnx", "torchscript", "openvino"), help="default: onnx")
    exp.add_argument("--precision", default=None, choices=("fp32", "bf16", "int8"),
                     help="OpenVINO only: fp32 (default), bf16 (AMX / AVX-512 BF16 CPUs; the backbone's first block "
                          "stays float32) or int8 (post-training "
                          "quantization calibrated on the model's own normal training images, which must be there)")
    exp.add_argument("--output", metavar="PATH", help="output file (default: beside the checkpoint)")
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset, 14 to 20 (default: 17); ONNX only")

    rep = sub.add_parser("report", help="a self-contained HTML page of a test run or a predict run",
                         description="Write one self-contained HTML page (no external files) from a results folder of "
                                     "`onenip test`: per-category table, ROC and PR curves, score distributions of good "
                                     "and defective images, and a gallery of the misses and false alarms with their heat "
                                     "maps; or from the output folder of `onenip predict`: per product type the images "
                                     "judged good, defective and of an unknown type, the scores, and their overlays.")
    rep.add_argument("results", metavar="RUN_DIR", help="results folder of `onenip test` (results.json, scores.csv) or "
                                                        "output folder of `onenip predict` (predictions.json)")
    rep.add_argument("--output", metavar="FILE", help="HTML file (default: RUN_DIR/report.html)")
    rep.add_argument("--map", default="fused", choices=("fused", "rec", "ref"), help="which scored map (default: fused)")
    rep.add_argument("--gallery", type=int, default=8,
                     help="images shown per category: the misses and false alarms, or the hardest images "
                          "without thresholds (default: 8)")
    rep.add_argument("--checkpoint", help="model for the gallery's heat maps (default: the one results.json names)")
    rep.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    srv = sub.add_parser("serve", help="judge images over HTTP: a JSON API, a web page, a watched folder",
                         description="Serve a trained model over HTTP (needs `pip install 'onenip[serve]'`): POST "
                                     "/predict (one image), POST /predict/batch, GET /health, GET /model, a web page at "
                                     "/ to drop images on, the API documentation at /docs (no external request). "
                                     "Requests arriving together are judged in one batch. With --watch, every new "
                                     "image in a folder is judged too, and its result appended to "
                                     "FOLDER/onenip-results.csv.")
    srv.add_argument("checkpoint", help="model.safetensors of a training run, or a file of `onenip export` (.onnx, .xml, "
                                        ".torchscript.pt), run on the CPU")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; "
                                                         "0.0.0.0: every network interface)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0: a free one, printed)")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    srv.add_argument("--batch-size", type=int, default=8, help="most images judged in one batch (default: 8)")
    srv.add_argument("--max-wait-ms", type=float, default=0.0,
                     help="how long a batch waits for more images after its first (default: 0: it takes the images "
                          "queued while the model was busy; a few ms can help a GPU fill its batches)")
    srv.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024,
                     help="largest request body, in bytes; larger ones get 413 (default: 33554432, 32 MiB)")
    srv.add_argument("--watch", metavar="FOLDER",
                     help="also judge every new image appearing in FOLDER; results appended to FOLDER/onenip-results.csv")
    srv.add_argument("--type", dest="product_type", metavar="NAME",
                     help="judge every image as this product type unless a request gives another (?type=NAME): its "
                          "prompt and threshold, no retrieval (a line of one product; a model file only)")
    srv.add_argument("--access-log", action="store_true", help="log every request")

    demo = sub.add_parser("demo", help="generate a small dataset, train on the CPU, evaluate, print the table",
                          description="Runs with no download and no data of yours: generates a small multi-category "
                                      "dataset, trains one model briefly with the offline ImageNet backbone, "
                                      "evaluates it and prints the per-category table.")
    demo.add_argument("--output", default="runs/demo", metavar="DIR", help="run folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _calibration_basis(info: dict[str, Any]) -> str:
    """What a threshold rests on, from its `calibration` entry: the method and how many images."""
    if info.get("method") == "false_alarm_rate":
        n = info.get("normal_images", "?")
        return f"false alarm rate {info.get('far', '?')} on {n} normal image{'s' * (n != 1)} from {info.get('source', '?')}"
    if info.get("method") == "f1":
        n = info.get("images", "?")
        return f"F1-optimal on {n} images, {info.get('defective', '?')} defective: F1 {info.get('f1', float('nan')):.3f}"
    return str(info.get("method", "unknown method"))


def _calibration_table(before: Any, after: Any) -> str:  # models.deployment.Deployment (imported lazily, as torch)
    """Per category: the old threshold, the new one, and what the new one rests on (method, number of images)."""
    width = max(map(len, after.categories), default=0)
    lines = []
    for cat in after.categories:
        new, info = after.thresholds[cat], after.calibration.get(cat, {})
        old = before.thresholds.get(cat) if before is not None else None
        old_info = before.calibration.get(cat, {}) if before is not None else None
        head = f"{cat:<{width}}  threshold {'none' if old is None else f'{old:.4f}'} -> {new:.4f}"
        if old is not None and new == old and info == old_info:
            lines.append(f"{cat:<{width}}  threshold {new:.4f} unchanged  ({_calibration_basis(info)})")
        else:
            lines.append(f"{head}  ({_calibration_basis(info)})")
    return "\n".join(lines)


def _print_results(results: Any) -> None:  # evaluate.Results (imported lazily, as torch)
    if results.retrieval_accuracy is not None:
        print(f"prompt retrieval accuracy: {100 * results.retrieval_accuracy:.2f} %")
    if results.main_map == "fused":
        print(results.to_markdown("fused"))
    else:  # eval.maps left out fused: each scored map
        for name in results.maps:
            print(f"map {name}:\n{results.to_markdown(name)}\n")
    if results.decisions is not None:
        print("\ndecisions at the model's thresholds (as `onenip predict` decides):")
        print(results.decisions_markdown())
    elif results.decisions_note:  # why there are none (the paper protocol, K prompts, another prompt pool)
        print(f"\n{results.decisions_markdown()}")


_PACKAGE = Path(__file__).resolve().parent
_python_format_warning = warnings.formatwarning


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """onenip's own warnings as one `onenip: warning: ...` line, without the file, line number and source line that
    Python prints by default (they name onenip's code, not the user's problem); other packages' warnings keep Python's
    format, whose location helps to trace them."""
    if issubclass(category, OnenipWarning) or Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"onenip: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; an unknown option is reported by its command's parser (its usage), with the closest
    option it knows."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        sub = commands[args.command]
        known = [o for a in sub._actions for o in a.option_strings]
        first = next((e for e in extra if e.startswith("-")), extra[0]).split("=")[0]
        training_only = [f"--{k}" for k in TRAINING_ONLY] if args.command == "test" else []
        close = closest(first, known + training_only)
        if close and close[0] in training_only:
            sub.error(f"{close[0]} is read in training only; a trained model keeps its own")
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return args


class _LogFormat(logging.Formatter):
    """onenip's log records as the command line prints them: information as it is, warnings and errors marked."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"onenip: {record.levelname.lower()}: {text}"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _format_warning
    handler, logger = logging.StreamHandler(sys.stderr), logging.getLogger("onenip")
    handler.setFormatter(_LogFormat())
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = previous
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "fit":
            from onenip.api import fit

            result = fit(args.config, _overrides(args), resume=args.resume, evaluate=args.evaluate,
                         progress=not args.no_progress)
            print(f"trained {result.epochs} epoch{'s' * (result.epochs != 1)} ({result.steps} steps) in {result.seconds:.1f} s, "
                  f"{result.images_per_second:.1f} query images/s; model: {result.model_path}")
            if result.results is not None:
                _print_results(result.results)
                print(f"results: {result.run_dir / 'results' / result.results.protocol}")
        elif args.command == "test":
            from onenip.api import test

            results = test(args.checkpoint, args.config, _overrides(args), output=args.output,
                           progress=not args.no_progress)
            _print_results(results)
        elif args.command == "predict":
            from onenip.deploy.predictor import run_predict

            if args.batch_size < 1:
                raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
            rows = run_predict(args.checkpoint, args.inputs, args.output, device=args.device,
                               batch_size=args.batch_size, images=not args.no_images, skip_bad=args.skip_bad,
                               progress=not args.no_progress, fast=args.fast, product_type=args.product_type,
                               level=args.threshold, far=args.far)
            flagged, unknown = sum(r["anomalous"] for r in rows), sum(not r["known"] for r in rows)
            print(f"{len(rows)} images, {flagged} judged defective"
                  + (f", {unknown} of a product type the model does not know (not judged)" if unknown else "")
                  + f"; results in {args.output}")
        elif args.command == "calibrate":
            from onenip.api import calibrate

            path, after, before = calibrate(args.checkpoint, far=args.far, val_roots=args.val, output=args.output,
                                            skip_bad=args.skip_bad, colour_margin=args.colour_margin,
                                            prompt_fusion=args.prompt_fusion)
            print(_calibration_table(before, after))
            if args.prompt_fusion is not None:
                fused = after.fused_types
                print(f"prompt-map fusion at beta {after.prompt_fusion:g} on {len(fused)} trained types"
                      + (f" (scales {', '.join(f'{t} {after.prompt_scales[t]:.3g}' for t in fused)})" if fused else ""))
            had = bool(before is not None and before.colour_models)
            if after.colour_models and not had:
                print(f"colour check added: {len(after.colour_models)} types, from their training images")
            elif had and not after.colour_models:
                print("colour check turned off")
            elif args.colour_margin is not None and after.colour_models:
                print(f"colour check margin now {args.colour_margin:g}")
            print(f"calibrated model: {path}")
        elif args.command == "add-type":
            from onenip.api import add_type

            path, dep = add_type(args.checkpoint, args.name, args.images, normal=args.normal, far=args.far,
                                 output=args.output, skip_bad=args.skip_bad, replace=args.replace)
            info = dep.calibration[args.name]
            done = "replaced" if args.replace else "added"
            print(f"{done} {args.name!r} from {len(info['added_from'])} images (a bank of "
                  f"{len(dep.prompt_patches[args.name])} of their patches): threshold {dep.thresholds[args.name]:.6g} "
                  f"({info['source']}), unknown-type limit {dep.type_thresholds[args.name]:.6g}, colour check "
                  + (f"limit {dep.colour_models[args.name]['limit']:.3g}" if args.name in dep.colour_models
                     else info.get("colour_check", "off")) + f"; model: {path}")
        elif args.command == "export":
            from onenip.deploy.export import export_model

            print(f"exported: {export_model(args.checkpoint, args.format, args.output, opset=args.opset, precision=args.precision)}")
        elif args.command == "report":
            from onenip.report.page import make_report

            if args.gallery < 0:
                raise ConfigError(f"--gallery must be >= 0, got {args.gallery}")
            path = make_report(args.results, args.output, map_name=args.map, gallery=args.gallery,
                               checkpoint=args.checkpoint, device=args.device)
            print(f"report: {path}")
        elif args.command == "serve":
            try:
                from onenip.deploy.server import serve
            except ImportError as exc:
                raise ConfigError(f"onenip serve needs the serve extra: pip install 'onenip[serve]' ({exc})") from None

            def ready(url: str) -> None:
                print(f"onenip serve: {url} (API documentation: {url}docs); Ctrl+C stops", flush=True)

            serve(args.checkpoint, host=args.host, port=args.port, device=args.device, batch_size=args.batch_size,
                  max_wait_ms=args.max_wait_ms, max_bytes=args.max_bytes, watch=args.watch, access_log=args.access_log,
                  product_type=args.product_type, ready=ready)
        elif args.command == "demo":
            from onenip.demo.run import run_demo

            run_demo(args.output, steps=args.steps, device=args.device, progress=not args.no_progress)
    except OnenipError as exc:
        print(f"onenip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onenip: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
