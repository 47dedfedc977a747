"""The paper's analysis figures for a libra checkpoint, a result file or a training run.

    python analyze.py neg-iou --checkpoint work_dirs/libra_faster_rcnn_r50_fpn_synthetic/epoch_12.pth --images 50
    python analyze.py samples --checkpoint ... --images 2                 # Fig. 6
    python analyze.py bfp --checkpoint ... --index 0                      # Fig. 4
    python analyze.py loss-curves [--checkpoint ...] [--alpha 0.5 --gamma 1.5 --beta 1.0]   # Fig. 5
    python analyze.py errors --results faster/detections.json libra/detections.json \\
        --labels "Faster R-CNN" "Libra R-CNN" [--gt instances_val2017.json]           # Fig. 8
    python analyze.py curves --work-dir work_dirs/libra_faster_rcnn_r50_fpn_synthetic  # log.jsonl

Subcommands (``python analyze.py COMMAND --help``):

- ``neg-iou`` (Fig. 3, Sec. 3.1): IoU with the nearest gt of the negatives chosen by random
  sampling, IoU-balanced sampling and hard mining (the top classification losses under the model),
  over ``--images`` images with the model's own training-time RPN proposals; prints the share of
  each above IoU 0.05 (the paper: > 60 % of hard negatives, 30 % of random ones);
- ``samples`` (Fig. 6): positives and negatives of both samplers drawn on images;
- ``bfp`` (Fig. 4, Sec. 3.2): per-level feature magnitude before and after the balanced feature pyramid;
- ``loss-curves`` (Fig. 5, Sec. 3.3): gradient and loss of balanced L1 / LGR-L1 against smooth L1
  and LGR-CE against CE, by autograd through libra's loss modules, for the configured parameters
  (the checkpoint's or the preset's, or ``--alpha/--gamma/--beta``);
- ``errors`` (Fig. 8, Sec. 4.1.5): COCO error analysis (C75, C50, Loc, Sim, Oth, BG, FN) of one or
  more COCO results files (``eval.py`` writes ``detections.json``), overall and per super-category;
- ``curves``: losses, lr and AP per evaluation of a run, from its ``log.jsonl``.

The model commands rebuild the detector as ``eval.py`` does (the checkpoint's model, classes and
data settings; any other ``eval.py`` flag such as ``--dataset``, ``--data-root``, ``--model``,
``--set``, ``--device``, ``--threads`` may follow). Every figure is written atomically as
``NAME.png`` with its data as ``NAME.json`` into ``--out-dir`` (default: ``analysis/`` beside the
checkpoint, the first results file or in the run's work dir), which is checked before the work
starts. Exit code 1 with a one-line ``error:`` message for bad input (an unusable output folder
too), 4 when a figure cannot be written (disk full, read-only: the line names the file and why);
``LIBRA_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from libra.analysis._io import AnalysisError
from libra.atomic_io import WriteError, prepare_output_dir, remove_empty_dirs
from libra.engine.builders import DataError, build_split
from libra.engine.checkpoint import CheckpointError
from libra.detectors import FasterRCNN
from libra.engine.cli import apply_recipe, build_detector, data_settings, one_line
from libra.engine.loading import add_trust_argument, build_eval_parser, load_weights, resolve_checkpoint_args

EXIT_BAD_INPUT = 1
EXIT_WRITE_FAILED = 4
MODEL_COMMANDS = ("neg-iou", "samples", "bfp")


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The Libra R-CNN paper's analysis figures (Fig. 3, 4, 5, 6, 8) and training curves.",
        epilog="Model commands also take eval.py's data / model flags (--dataset, --data-root, --model, --set, "
        "--device, --threads, ...).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def model_command(name: str, help_text: str, split: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=fmt,
                                  epilog="Any other eval.py flag (--dataset, --data-root, --model, --set, --device, "
                                  "--threads, --trust-checkpoint, ...) is passed on to rebuild the model and data.")
        sub.add_argument("--checkpoint", required=True, help="libra (train.py) or MMDetection .pth of a two-stage detector")
        sub.add_argument("--split", choices=("train", "val"), default=split, help="images to analyse (test transform)")
        sub.add_argument("--out-dir", default=None, help="default: analysis/ beside the checkpoint")
        sub.add_argument("--seed", type=int, default=0, help="seed of the samplers' random draws")
        return sub

    neg = model_command("neg-iou", "Fig. 3: IoU distribution of random, IoU-balanced and hard negatives", "train")
    neg.add_argument("--images", type=int, default=50, help="images to gather negatives from (N)")
    neg.add_argument("--num-bins", type=int, default=None, help="K of IoU-balanced sampling (default: the model's, else 3)")
    neg.add_argument("--threshold", type=float, default=0.05, help="IoU of the headline shares (Sec. 3.1: 0.05)")

    samples = model_command("samples", "Fig. 6: training samples of random vs IoU-balanced sampling on images", "train")
    samples.add_argument("--images", type=int, default=2, help="images to draw (one row each)")
    samples.add_argument("--index", type=int, default=0, help="index of the first image in the split")
    samples.add_argument("--num-bins", type=int, default=None, help="K of IoU-balanced sampling")
    samples.add_argument("--draw-negatives", type=int, default=40, help="negatives drawn per panel (random subset; 0: all)")
    samples.add_argument("--draw-positives", type=int, default=12, help="positives drawn per panel (random subset; 0: all)")

    bfp = model_command("bfp", "Fig. 4: per-level feature magnitude before / after the balanced feature pyramid", "val")
    bfp.add_argument("--index", type=int, default=0, help="index of the image in the split")

    loss = commands.add_parser("loss-curves", formatter_class=fmt,
                               help="Fig. 5: balanced L1 / LGR-L1 vs smooth L1, LGR-CE vs CE (autograd)",
                               description="Fig. 5 from libra's loss modules; parameters from --checkpoint, else "
                               "the --model preset (with --set overrides), else the flags below.")
    loss.add_argument("--checkpoint", default=None, help="take the parameters from this libra checkpoint's model")
    loss.add_argument("--model", default=None, help="preset whose parameters are drawn (default libra_faster_rcnn_r50_fpn)")
    loss.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset override, e.g. box_loss_alpha=0.3")
    loss.add_argument("--alpha", type=float, default=None, help="balanced L1 alpha (preset: 0.5)")
    loss.add_argument("--gamma", type=float, default=None, help="balanced L1 gamma (preset: 1.5)")
    loss.add_argument("--beta", type=float, default=None, help="balanced L1 beta (preset: 1.0)")
    loss.add_argument("--ce-alpha", type=float, default=None, help="LGR-CE alpha (preset: 0.8)")
    loss.add_argument("--ce-gamma", type=float, default=None, help="LGR-CE gamma (preset: 1.0)")
    loss.add_argument("--extra-alphas", type=float, nargs="*", default=[], help="more balanced L1 curves (other alphas)")
    loss.add_argument("--out-dir", default=None, help="default: analysis/ beside the checkpoint, else work_dirs/analysis")
    add_trust_argument(loss)

    errors = commands.add_parser("errors", formatter_class=fmt,
                                 help="Fig. 8: COCO error analysis (C75 C50 Loc Sim Oth BG FN) of results files",
                                 description="Fig. 8: COCO error analysis of COCO-format bbox results against a "
                                 "COCO ground truth (--gt, else the --dataset / --data-root evaluation split).",
                                 epilog="eval.py's data flags (--dataset, --data-root, --synthetic-*) choose the "
                                 "ground truth when --gt is not given.")
    errors.add_argument("--results", nargs="+", required=True, help="one or more COCO results JSON files (detections.json)")
    errors.add_argument("--labels", nargs="*", default=None, help="a name per results file (default: its folder name)")
    errors.add_argument("--gt", default=None, help="COCO instances JSON (default: the evaluation split of the data flags "
                        "given, else of the run the first results file belongs to (its config.json), else synthetic)")
    errors.add_argument(
        "--groups", default="supercategory",
        help="category groups for Sim: supercategory (the COCO field; none -> one group 'all'), one (one group: Sim = "
        "Oth), class (each alone: Sim = Loc), or a JSON file {category name: group}",
    )
    errors.add_argument("--duplicates", choices=("fp", "loc"), default="fp",
                        help="fp: duplicates stay false positives until BG (COCO analyze); loc: ignored from Loc on "
                        "(Hoiem et al.)")
    errors.add_argument("--out-dir", default=None, help="default: analysis/ beside the first results file")

    browse = commands.add_parser(
        "browse", formatter_class=fmt,
        help="the ground truth of N images of a split as the model sees it (after the transforms), drawn to PNGs",
        description="Draw the ground truth (boxes, class names, masks for a mask model, crowd / ignore boxes "
        "dashed grey) of images of a split after the data pipeline: the training transforms (resize, "
        "multi-scale, flip) with --split train, the test transform with --split val. The first thing to look at "
        "when your own data trains badly.",
        epilog="Takes eval.py's data flags (--dataset, --data-root, --train-ann / --train-images / --val-ann / "
        "--val-images, --model (masks are drawn for a mask model), --min-size, ...).",
    )
    browse.add_argument("--split", choices=("train", "val"), default="train")
    browse.add_argument("--images", type=int, default=8, help="how many images")
    browse.add_argument("--index", type=int, default=0, help="index of the first image in the split")
    browse.add_argument("--epoch", type=int, default=0, help="the epoch whose augmentation is drawn (training split)")
    browse.add_argument("--out-dir", default="work_dirs/browse", help="where the PNGs go")

    curves = commands.add_parser("curves", formatter_class=fmt, help="training curves (losses, lr, AP) from log.jsonl",
                                 description="Losses, learning rate and AP per evaluation of a run, from its log.jsonl.")
    curves.add_argument("--work-dir", required=True, help="the run's folder (holding log.jsonl), or the log file itself")
    curves.add_argument("--out-dir", default=None, help="default: analysis/ in the work dir")
    return parser


# ------------------------------------------------------------------------------ helpers
def _progress(total: int, desc: str, unit: str = "image"):
    from tqdm import tqdm

    # Only on a terminal (where closing it clears its line, so an error that follows starts a clean
    # line); a log file or a pipe gets no bar fragments.
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty())


def _eval_args(argv: list[str]) -> argparse.Namespace:
    """eval.py's namespace for ``argv`` (its own flags only; a wrong one is a one-line error)."""
    parser = build_eval_parser()

    def refuse(message: str):
        raise AnalysisError(f"{message} (analyze.py takes eval.py's data / model flags besides its own)")

    parser.error = refuse  # argparse would print the usage and exit 2
    return parser.parse_args(argv)


def load_model(checkpoint: str, split: str, rest: list[str], two_stage: bool = True):
    """Rebuild the checkpoint's detector and the data of ``split`` as eval.py does.

    Returns ``(model in eval mode on its device, dataset, eval.py's resolved namespace)``; with
    ``two_stage`` a model without its own RPN and R-CNN stage is refused.
    """
    args = _eval_args(["--checkpoint", checkpoint, "--split", split, *rest])
    args, kind, saved = resolve_checkpoint_args(args)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dataset = build_split(data_settings(args), train=False, split=split)
    model = build_detector(args, dataset.num_classes)
    if two_stage and not isinstance(model, FasterRCNN):
        raise AnalysisError(f"{args.model} has no RPN and R-CNN stage of its own; this figure needs a two-stage detector")
    load_weights(model, kind, saved, args, dataset.num_classes, dataset.class_names)
    return model.to(device).eval(), dataset, args


# The data settings of a run (its config.json) that select its evaluation ground truth.
_RUN_DATA_FLAGS = ("dataset", "data_root", "synthetic_num_train", "synthetic_num_val", "synthetic_image_size",
                   "min_size", "max_size")


def _data_flags_of_run(results: Path) -> tuple[list[str], Path | None]:
    """eval.py data flags from the ``config.json`` of the train.py run a results file belongs to (in its
    folder, or its parent for eval.py's ``eval_<checkpoint>/`` folders); none when there is no such file."""
    for folder in (results.resolve().parent, results.resolve().parent.parent):
        config = folder / "config.json"
        if config.is_file():
            try:
                saved = json.loads(config.read_text())
            except (OSError, json.JSONDecodeError):
                return [], None
            flags: list[str] = []
            for key in _RUN_DATA_FLAGS:
                if saved.get(key) is not None:
                    flags += [f"--{key.replace('_', '-')}", str(saved[key])]
            return flags, config
    return [], None


_CREATED: list[Path] = []  # output folders this command created (removed again if it fails before writing)


def _out_dir(value: str | None, default: Path) -> Path:
    """The output folder, created and proven writable before the work whose figures go there (a file in
    the way, a read-only or full disk: one-line ``OutputLocationError``, exit code 1)."""
    out = Path(value) if value else default
    _CREATED.extend(prepare_output_dir(out, "--out-dir" if value else "the output folder (--out-dir)"))
    return out


def _checkpoint_out_dir(args: argparse.Namespace) -> Path:
    """A model command's output folder (default ``analysis/`` beside the checkpoint), after checking
    that the checkpoint exists (no folder is made beside a path that names nothing)."""
    if not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    return _out_dir(args.out_dir, Path(args.checkpoint).resolve().parent / "analysis")


def _iou_balanced(model, num_bins: int | None) -> dict | None:
    if num_bins is None:
        return None
    if num_bins < 1:
        raise AnalysisError(f"--num-bins must be >= 1, got {num_bins}")
    from libra.analysis.sampling import iou_balanced_settings

    settings = iou_balanced_settings(model.roi_head)
    settings["num_bins"] = num_bins
    return settings


def _indices(dataset, start: int, count: int, flag: str) -> list[int]:
    if count < 1:
        raise AnalysisError(f"{flag} must be >= 1, got {count}")
    if not 0 <= start < len(dataset):
        raise AnalysisError(f"--index {start} is outside the split ({len(dataset)} images: 0..{len(dataset) - 1})")
    return list(range(start, min(len(dataset), start + count)))


def _rgb(image: torch.Tensor, size: tuple[int, int]):
    """A normalised ``[3, H, W]`` tensor back to ``[h, w, 3]`` uint8 (unpadded)."""
    from libra.data.transforms import denormalize_image

    h, w = size
    return denormalize_image(image[:, :h, :w].float().cpu()).clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ------------------------------------------------------------------------------ commands
def run_neg_iou(args: argparse.Namespace, rest: list[str]) -> int:
    from libra.analysis.neg_iou import collect_negative_ious, plot_negative_ious
    from libra.data.transforms import collate

    out = _checkpoint_out_dir(args)  # checked before the model runs
    model, dataset, resolved = load_model(args.checkpoint, args.split, rest)
    if not 0.0 <= args.threshold < 1.0:
        raise AnalysisError(f"--threshold must be an IoU in [0, 1), got {args.threshold}")
    indices = _indices(dataset, 0, args.images, "--images")
    device = next(model.parameters()).device
    bar = _progress(len(indices), "neg-iou")
    try:
        batches = (collate([dataset[i]]) for i in indices)
        found = collect_negative_ious(model, batches, _generator(args.seed, device), _iou_balanced(model, args.num_bins),
                                      progress=bar.update)
    finally:
        bar.close()
    summary = found.summary(threshold=args.threshold)
    summary.update({"checkpoint": str(args.checkpoint), "model": resolved.model, "split": args.split,
                    "dataset": resolved.dataset, "roi_batch_size": model.roi_head.batch_size})
    png, data = plot_negative_ious(summary, out / "fig3_neg_iou.png")
    methods = summary["methods"]
    print(f"negatives over {summary['images']} images ({resolved.dataset} {args.split}): share with IoU > {args.threshold:g}")
    for name, label in (("hard", "hard negatives (top classification loss)"), ("random", "random sampling"),
                        ("iou_balanced", "IoU-balanced sampling"), ("all_candidates", "all candidate negatives")):
        print(f"  {label:42s} {100 * methods[name]['share_above_threshold']:5.1f} %  (mean IoU {methods[name]['mean_iou']:.3f}, "
              f"{methods[name]['count']} negatives)")
    print(f"  (paper Sec. 3.1: > 60 % of hard negatives vs 30 % of randomly sampled ones)\nwrote {png} and {data}")
    return 0


def run_samples(args: argparse.Namespace, rest: list[str]) -> int:
    from libra.analysis.samples import collect_samples, plot_samples
    from libra.data.transforms import collate

    out = _checkpoint_out_dir(args)  # checked before the model runs
    model, dataset, _ = load_model(args.checkpoint, args.split, rest)
    indices = _indices(dataset, args.index, args.images, "--images")
    device = next(model.parameters()).device
    generator = _generator(args.seed, device)
    images_rgb, entries = [], []
    for index in indices:
        images, targets = collate([dataset[index]])
        entries += collect_samples(model, images, targets, generator, _iou_balanced(model, args.num_bins))
        images_rgb.append(_rgb(images[0], tuple(int(v) for v in targets[0]["img_shape"])))
    if args.draw_negatives < 0 or args.draw_positives < 0:
        raise AnalysisError("--draw-negatives / --draw-positives must be >= 0 (0 draws all)")
    png, data = plot_samples(images_rgb, entries, out / "fig6_samples.png", max_negatives=args.draw_negatives or None,
                             max_positives=args.draw_positives or None, seed=args.seed)
    for entry in entries:
        parts = [f"{name}: {len(s['positives'])} pos / {len(s['negatives'])} neg" for name, s in entry["samplers"].items()]
        print(f"image {entry['image_id']}: {len(entry['gt_boxes'])} gt; " + "; ".join(parts))
    print(f"wrote {png} and {data}")
    return 0


def run_bfp(args: argparse.Namespace, rest: list[str]) -> int:
    from libra.analysis.bfp import plot_pyramid, pyramid_features
    from libra.data.transforms import collate

    out = _checkpoint_out_dir(args)  # checked before the model runs
    model, dataset, resolved = load_model(args.checkpoint, args.split, rest, two_stage=False)  # Libra RetinaNet too
    (index,) = _indices(dataset, args.index, 1, "--images")
    images, targets = collate([dataset[index]])
    try:
        features = pyramid_features(model, images)
    except ValueError as error:
        raise AnalysisError(f"{resolved.model}: {one_line(error)}") from None
    size = tuple(int(v) for v in targets[0]["img_shape"])
    png, data = plot_pyramid(_rgb(images[0], size), features, out / "fig4_bfp.png", image_id=int(targets[0]["image_id"]))
    summary = json.loads(data.read_text())
    for level in summary["levels"]:
        print(f"{level['name']} {level['shape'][0]}x{level['shape'][1]}: mean |x| {level['before_mean']:.3f} (FPN) -> "
              f"{level['after_mean']:.3f} (BFP)")
    print(f"wrote {png} and {data}")
    return 0


def run_loss_curves(args: argparse.Namespace, rest: list[str]) -> int:
    from libra.analysis.loss_curves import loss_curves, plot_loss_curves

    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    default = Path(args.checkpoint).resolve().parent / "analysis" if args.checkpoint else Path("work_dirs") / "analysis"
    out = _out_dir(args.out_dir, default)  # checked before the work
    flags: list[str] = []
    for item in args.set:
        flags += ["--set", item]
    if args.model:
        flags += ["--model", args.model]
    if args.checkpoint:
        trust = ["--trust-checkpoint"] if args.trust_checkpoint else []
        resolved, _, _ = resolve_checkpoint_args(_eval_args(["--checkpoint", args.checkpoint, *trust, *flags]))
    else:
        resolved = _eval_args(flags)
        resolved.model = resolved.model or "libra_faster_rcnn_r50_fpn"
        apply_recipe(resolved)
    config = resolved.model_config
    if "box_loss_alpha" not in config:
        raise AnalysisError(f"{resolved.model} has no box-loss parameters (box_loss_alpha / gamma / beta)")

    def pick(flag, key, default):
        value = flag if flag is not None else config.get(key, default)
        if not value > 0:
            raise AnalysisError(f"{key.replace('box_loss_', '')} must be > 0, got {value}")
        return float(value)

    data = loss_curves(
        alpha=pick(args.alpha, "box_loss_alpha", 0.5), gamma=pick(args.gamma, "box_loss_gamma", 1.5),
        beta=pick(args.beta, "box_loss_beta", 1.0), ce_alpha=pick(args.ce_alpha, "lgr_ce_alpha", 0.8),
        ce_gamma=pick(args.ce_gamma, "lgr_ce_gamma", 1.0), extra_alphas=[pick(a, "extra alpha", 0) for a in args.extra_alphas],
    )
    data["model"] = resolved.model
    data["configured_losses"] = {"box_loss": config.get("box_loss"), "cls_loss": config.get("cls_loss")}
    png, json_path = plot_loss_curves(data, out / "fig5_loss_curves.png")
    p = data["parameters"]
    print(f"{resolved.model} (box loss {config.get('box_loss')}, cls loss {config.get('cls_loss')}): balanced L1 alpha "
          f"{p['alpha']:g} gamma {p['gamma']:g} beta {p['beta']:g}; LGR-CE alpha {p['ce_alpha']:g} gamma {p['ce_gamma']:g}")
    print(f"wrote {png} and {json_path}")
    return 0


def run_errors(args: argparse.Namespace, rest: list[str]) -> int:
    from libra.analysis.error_analysis import analyze_errors, category_groups, load_results, write_error_figures
    from libra.coco_api import load_coco_api

    labels = args.labels or [Path(r).resolve().parent.name or Path(r).stem for r in args.results]
    if len(labels) != len(args.results):
        raise AnalysisError(f"--labels gives {len(labels)} names for {len(args.results)} results files: one per file")
    if len(set(labels)) != len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    if args.gt:
        if rest:
            raise AnalysisError(f"unrecognized arguments with --gt: {' '.join(rest)}")
        try:
            coco_gt = load_coco_api(args.gt)
        except (FileNotFoundError, ValueError) as error:
            raise AnalysisError(f"--gt: {one_line(error)}") from None
        gt_name = args.gt
    else:
        if not rest:
            rest, source = _data_flags_of_run(Path(args.results[0]))
            if source is not None:
                print(f"ground truth: the evaluation split of the run in {source.parent} (its config.json)")
        data_args = _eval_args(rest)
        data_args.model = data_args.model or "libra_faster_rcnn_r50_fpn"
        apply_recipe(data_args)
        dataset = build_split(data_settings(data_args), train=False, split="val")
        coco_gt, gt_name = dataset.coco_api, f"the {data_args.dataset} evaluation split"
    missing = [r for r in args.results if not Path(r).is_file()]
    if missing:
        raise AnalysisError(f"results file not found: {missing[0]} (eval.py writes detections.json in its work dir)")
    out = _out_dir(args.out_dir, Path(args.results[0]).resolve().parent / "analysis")  # checked before the analysis
    groups = category_groups(coco_gt, args.groups)
    analyses = []
    bar = _progress(len(args.results) * len(coco_gt.getCatIds()), "errors", unit="category")
    try:
        for label, path in zip(labels, args.results):
            analyses.append((label, analyze_errors(coco_gt, load_results(coco_gt, path), groups, args.duplicates,
                                                   progress=bar.update)))
    finally:
        bar.close()
    written = write_error_figures(analyses, out)
    types = analyses[0][1]["types"]
    print(f"error analysis against {gt_name} ({len(coco_gt.getImgIds())} images, {len(coco_gt.getCatIds())} categories, "
          f"groups: {', '.join(sorted(set(groups.values())))}; duplicates: {args.duplicates})")
    print(f"  {'':24s}" + "".join(f"{t:>7s}" for t in types))
    for label, analysis in analyses:
        print(f"  {label[:24]:24s}" + "".join(f"{analysis['overall']['ap'][t]:7.3f}" for t in types))
    if len(analyses) == 2:
        first, second = analyses[0][1]["overall"]["ap"], analyses[1][1]["overall"]["ap"]
        print(f"  {'difference':24s}" + "".join(f"{second[t] - first[t]:+7.3f}" for t in types))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_curves(args: argparse.Namespace, rest: list[str]) -> int:
    from libra.analysis._io import save_json
    from libra.analysis.training_curves import curve_data, plot_training_curves
    from libra.engine.metric_logger import JSONLinesLog

    source = Path(args.work_dir)
    log_path = source if source.is_file() else source / "log.jsonl"
    if not log_path.is_file():
        raise AnalysisError(f"no training log at {log_path} (train.py writes log.jsonl into its --work-dir)")
    out = _out_dir(args.out_dir, log_path.parent / "analysis")  # checked before the work
    records = JSONLinesLog(log_path).read()
    png = plot_training_curves(records, out / "curves.png", width=1200, height=600, title=f"training losses: {log_path.parent.name}")
    if png is None:
        raise AnalysisError(f"{log_path} has no training record with a finite loss yet: nothing to plot")
    data = curve_data(records)
    json_path = save_json({"log": str(log_path), **data}, out / "curves.json")
    last = {n: v[-1][1] for n, v in data["losses"].items()}
    evaluations = max((len(v) for v in data["metrics"].values()), default=0)
    print(f"{log_path}: {len(data['lr'])} training records, {evaluations} evaluations; last: "
          + "  ".join(f"{n} {v:.4f}" for n, v in last.items()))
    for name, points in data["metrics"].items():
        if name in ("AP", "AP50", "mAP"):
            print(f"  {name}: " + "  ".join(f"{v:.3f}@{int(i)}" for i, v in points))
    print(f"wrote {png} and {json_path}")
    return 0


def run_browse(args: argparse.Namespace, rest: list[str]) -> int:
    from libra.data.transforms import denormalize_image
    from libra.data.visualize import draw_detections

    data_args = _eval_args(rest)
    data_args.model = data_args.model or "libra_faster_rcnn_r50_fpn"
    apply_recipe(data_args)
    settings = data_settings(data_args)
    if args.split == "train":
        settings.multi_scale_range = None  # eval.py's flags have no --multi-scale: the recipe's single scale
    dataset = build_split(settings, train=args.split == "train", split=args.split)
    dataset.set_epoch(args.epoch)
    indices = _indices(dataset, args.index, args.images, "--images")
    out = _out_dir(args.out_dir, Path("work_dirs") / "browse")
    names = list(dataset.class_names)
    written = []
    for index in indices:
        image, target = dataset[index]
        boxes, labels = target["boxes"], target["labels"]
        ignore = target.get("ignore_boxes")
        if ignore is not None and len(ignore):
            names_with_ignore = names + ["ignore"]
            boxes = torch.cat([boxes, ignore])
            labels = torch.cat([labels, torch.full((len(ignore),), len(names), dtype=labels.dtype)])
        else:
            names_with_ignore = names
        masks = target.get("masks")
        if masks is not None and ignore is not None and len(ignore):
            masks = torch.cat([masks, masks.new_zeros((len(ignore), *masks.shape[1:]))])
        h, w = (int(v) for v in target["img_shape"])
        path = out / f"{args.split}_{index:05d}_{target['image_id']}.png"
        draw_detections(denormalize_image(image)[:, :h, :w].clamp(0, 255), boxes, labels, None, names_with_ignore, path,
                        masks=None if masks is None else masks[:, :h, :w])
        written.append(path)
    flips = sum(1 for i in indices if dataset[i][1].get("flip"))
    print(f"wrote {len(written)} PNGs of the {data_args.dataset} {args.split} split to {out} "
          f"({flips} flipped; short side {settings.min_size}, long side <= {settings.max_size})")
    return 0


COMMANDS = {"neg-iou": run_neg_iou, "samples": run_samples, "bfp": run_bfp, "loss-curves": run_loss_curves,
            "errors": run_errors, "curves": run_curves, "browse": run_browse}


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        if rest and args.command not in (*MODEL_COMMANDS, "errors", "browse"):
            raise AnalysisError(f"unrecognized arguments for {args.command}: {' '.join(rest)}")
        return COMMANDS[args.command](args, rest)
    except WriteError as error:  # disk full, read-only, ...: a figure is either written whole or not at all
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}; files written before are intact: free space or pass another --out-dir, "
              "then run again", file=sys.stderr, flush=True)
        return EXIT_WRITE_FAILED
    except (AnalysisError, DataError, CheckpointError, FileNotFoundError, ValueError) as error:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        remove_empty_dirs(_CREATED)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print("error: interrupted (Ctrl-C); figures are written atomically, those written before are intact",
              file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
