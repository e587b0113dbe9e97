"""The ``rsitr`` console script.

Every sub-command is a thin layer over the library (:mod:`rsitr`) or one of its applications
(:mod:`rsitr_train`; :mod:`rsitr_serve`); ``main(argv)`` takes an explicit argument list so tests
run commands end to end. Messages and progress lines go to standard output through the library's
logger; results are printed. Errors about user input print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rsitr.errors import ConfigError, RsitrError
from rsitr.progress import log_to_console

#: Help texts several sub-commands share.
LAYOUT_HELP = "auto | karpathy | precomp | pir (default auto: detected from the files)"
IMAGES_HELP = "image folder, when not beside the caption files"
INDEX_HELP = "index folder of rsitr index build"


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default auto: the best available; "
                                         "under torchrun, cuda means one GPU per process, cuda:LOCAL_RANK)")


def _add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """The SeLo window options of ``localize`` and ``localize-eval``."""
    parser.add_argument("--scales", help="window sides in px, comma-separated (default 128,256,512)")
    parser.add_argument("--blur", type=int, default=251, help="median-blur kernel in px (default 251, SeLo's; 1: none)")
    parser.add_argument("--batch-size", type=int, default=64, help="windows encoded at once (default 64)")
    _add_device_argument(parser)


def _add_train_arguments(parser: argparse.ArgumentParser, experiment: bool = False) -> None:
    """The run-config options of ``train``; of ``benchmark`` and ``ablate`` too with ``experiment``.

    An experiment runs many models and seeds, so it takes one spelling of each, the plural
    (``--models``, ``--seeds``); its ``--model`` and ``--seed`` are hidden and refused with one line
    naming the plural (:func:`_refuse_singular`) instead of being silently overridden, or, left
    undefined, silently read by argparse as abbreviations of the plural.
    """
    _add_device_argument(parser)
    parser.add_argument("--config", help="run config YAML or a shipped recipe name (sections data/features/model/text/train)")
    parser.add_argument("--dataset", help="dataset file or folder (sets data.path)")
    parser.add_argument("--layout", help="auto | karpathy | precomp | pir (sets data.layout; default auto: detected)")
    parser.add_argument("--images", help="image folder, when not beside the caption files (sets data.image_dir)")
    hidden = argparse.SUPPRESS
    parser.add_argument("--model", help=hidden if experiment else "registered model name or model YAML (sets model.name)")
    parser.add_argument("--epochs", type=int, help="training epochs (sets train.epochs)")
    parser.add_argument("--batch-size", type=int, help="captions per training batch (sets train.batch_size)")
    parser.add_argument("--seed", type=int, help=hidden if experiment else "seed of the initialisation and batch order (sets train.seed)")
    parser.add_argument("--backbone-weights", help="torchvision-layout ResNet weights (.safetensors or .pth)")
    parser.add_argument("--detections", help="detections json giving the region boxes")
    parser.add_argument("--glove", help="GloVe vectors text file for the word embedding")
    parser.add_argument("--bands", help=BANDS_HELP)
    parser.add_argument("--cache-dir", help="feature cache folder (sets features.cache_dir; default $RSITR_CACHE_DIR, "
                                            "else ~/.cache/rsitr)")
    parser.add_argument("--exclude", help="audit JSON (rsitr data audit) whose training items are dropped (sets data.exclude)")
    parser.add_argument("--exclude-against", help="comma-separated evaluation splits (rsitmd/test, or a dataset name): "
                                                  "drop only what collides with them (sets data.exclude_against)")
    parser.add_argument("--train-backbone", action="store_true", default=None,
                        help="train the backbone end to end with the model (sets train.train_backbone; slower, augments images)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config field")


#: --bands of rsitr features and rsitr train (multispectral TIFF datasets).
BANDS_HELP = "1-based TIFF source bands for R,G,B, e.g. 4,3,2 (sets features.bands; default: the file's RGB, else bands 1-3)"


def _train_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [
        ("data.path", args.dataset), ("data.layout", args.layout), ("data.image_dir", args.images),
        ("model.name", args.model), ("train.epochs", args.epochs), ("train.batch_size", args.batch_size),
        ("train.seed", args.seed), ("features.backbone_weights", args.backbone_weights),
        ("features.detections", args.detections), ("text.glove", args.glove), ("features.cache_dir", args.cache_dir),
        ("data.exclude", args.exclude),
        ("data.exclude_against", None if args.exclude_against is None  # a list: YAML reads its repr as a flow sequence
         else [part.strip() for part in args.exclude_against.split(",") if part.strip()]),
        ("train.train_backbone", True if args.train_backbone else None),
        ("features.bands", _numbers(args.bands, int, "--bands")),
    ]
    return [f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in pairs if value is not None] + list(args.set)


def cmd_train(args: argparse.Namespace) -> int:
    from rsitr_train.config import load_config
    from rsitr_train.trainer import train

    config = load_config(args.config, _train_overrides(args))
    if args.json:
        from rsitr.io import check_writable

        check_writable(Path(args.json).resolve().parent, "--json file's folder")  # before the training, not after it
    summary = train(config, args.out, progress=not args.quiet, device=args.device)
    if _main_process():
        print(train_summary_table(summary, args.out))
        if args.json:
            from rsitr.io import write_json

            write_json(args.json, summary)
    return 0


def train_summary_table(summary: dict, run_dir: str) -> str:
    """What ``rsitr train`` prints at the end: the summary as aligned lines, and the command that evaluates the run.

    The command reports the run's report split (``summary["report_split"]``, the default of
    ``rsitr evaluate``); when every split trained or selected, it names the selection split and
    says its figures are optimistic, with the override that carves a clean one.
    """
    import shlex

    epochs = summary.get("epochs")
    best = summary.get("best_val_mR")
    selection = summary.get("selection_split", "val")
    rows = [("best epoch", f"{summary.get('best_epoch')} of {epochs}" if epochs else str(summary.get("best_epoch"))),
            ("validation mR", "none" if best is None else f"{best:.2f} (on {selection}, the split that chose the epoch)")]
    trained = f"{summary.get('parameters', 0) / 1e6:.2f} M trainable"
    if summary.get("backbone_parameters"):
        trained += f" (+ {summary['backbone_parameters'] / 1e6:.2f} M backbone trained end to end)"
    rows += [("parameters", trained), ("time per epoch", f"{summary.get('seconds_per_epoch', 0.0):.1f} s"),
             ("run directory", str(run_dir))]
    command = f"rsitr evaluate {shlex.quote(str(run_dir))}"
    report = summary.get("report_split")
    if report:
        rows.append(("evaluate with", f"{command}   (reports {report})"))
    else:
        rows.append(("evaluate with", f"{command} --split {selection}   (optimistic: {selection} chose the epoch; "
                                      f"--set data.val_split=select --set data.selection_fraction=0.1 carves a "
                                      "selection split out of train so that val stays clean)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _main_process() -> bool:
    """Whether this is the process that reports (rank 0 under torchrun; always otherwise)."""
    from rsitr.distributed import env_world

    return env_world().main


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rsitr_train.runs import evaluate_run, result_table

    result = evaluate_run(args.run_dir, args.split, args.json, progress=not args.quiet,
                          precision=args.precision, dataset=args.dataset, device=args.device)
    print(result_table(result))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from rsitr_train.ensemble import ensemble_table, evaluate_ensemble, parse_weights

    weights = parse_weights(args.weights, len(args.run_dirs))
    result = evaluate_ensemble(args.run_dirs, args.split, weights, args.json, progress=not args.quiet,
                               precision=args.precision, dataset=args.dataset, device=args.device)
    print(ensemble_table(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rsitr.bundle import export_model, load_model

    manifest = export_model(args.run_dir, args.out)
    bundle = load_model(args.out)  # read back and verify every digest before saying it is done
    size = sum(p.stat().st_size for p in manifest.parent.iterdir() if p.is_file())
    stage = "with a separable first stage" if bundle.has_first_stage else "no separable first stage"
    print(f"exported {bundle.spec.name} ({bundle.spec.architecture}, {bundle.spec.backbone}; {stage}) to {args.out}: "
          f"{size / 2**20:.1f} MiB")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rsitr_train.demo import run_demo
    from rsitr_train.runs import result_table

    out = Path(args.out).resolve()  # the run's config must stay valid from any working directory
    started = time.perf_counter()
    summary, result = run_demo(out, num_images=args.num_images, epochs=args.epochs, progress=not args.quiet)
    print(result_table(result))
    total = time.perf_counter() - started
    print(f"demo finished in {total:.0f} s; best validation epoch {summary['best_epoch']}; "
          f"test mR {result['metrics']['mR']:.2f} vs chance {result['chance']['mR']:.2f}")
    print(f"run directory: {out / 'run'}  (rsitr evaluate {out / 'run'}; rsitr export {out / 'run'} --out MODEL_DIR)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from rsitr.data.synth import generate_synthetic

    dataset = generate_synthetic(args.out, num_images=args.num_images, image_size=args.image_size, seed=args.seed,
                                 progress=not args.quiet)
    print(f"wrote {dataset.num_images} images and {dataset.num_captions} captions to {args.out} ({dataset.summary()})")
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from rsitr.data.synth import generate_large_scenes

    scenes = generate_large_scenes(args.out, num_scenes=args.count, seed=args.seed, size_range=(args.min_size, args.max_size),
                                   block_range=(args.min_block, args.max_block), captions_per_block=args.captions,
                                   progress=not args.quiet)
    samples = sum(len(b.captions) for s in scenes for b in s.blocks)
    print(f"wrote {len(scenes)} scenes and {samples} localisation samples to {args.out} (anno.json, scenes.json)")
    return 0


def cmd_mosaics(args: argparse.Namespace) -> int:
    from rsitr.data.mosaics import build_mosaics

    mosaics = build_mosaics(args.path, args.out, split=args.split, rows=args.rows, cols=args.cols, count=args.count,
                            queries_per_mosaic=args.queries, seed=args.seed, cell_size=args.cell_size,
                            image_format=args.format, layout=args.layout, progress=not args.quiet)
    samples = sum(len(m.queries) for m in mosaics)
    print(f"wrote {len(mosaics)} mosaics and {samples} localisation samples to {args.out} (anno.json, mosaics.json)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rsitr.data import load_dataset

    dataset = load_dataset(args.path, layout=args.layout, image_dir=args.images)
    print(f"{dataset.name}: {dataset.num_images} images, {dataset.num_captions} captions; {dataset.summary()}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from rsitr.data import detect_layout, load_dataset
    from rsitr.data.audit import DEFAULT_THRESHOLD, audit_datasets, write_audit

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    started = time.perf_counter()
    datasets = [load_dataset(path, layout=args.layout) for path in args.paths]
    layouts = [args.layout if args.layout != "auto" else detect_layout(path) for path in args.paths]
    report = audit_datasets(datasets, threshold=threshold, hash_images=not args.no_images, layouts=layouts,
                            progress=not args.quiet)
    json_path, md_path = write_audit(report, args.out)
    excl = report["exclusions"]
    print(f"{len(report['captions']['within_split'])} texts repeated within a split, "
          f"{len(report['captions']['cross_split'])} shared between splits, "
          f"{len(report['captions']['cross_dataset'])} val/test texts in another dataset's train; "
          f"{len(report['images']['pairs'])} image pairs within distance {threshold}; "
          f"exclusions: {len(excl['images'])} train images, {len(excl['captions'])} train (image, caption) entries")
    print(f"wrote {md_path} and {json_path} ({time.perf_counter() - started:.1f} s)")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from rsitr.data import load_dataset
    from rsitr.distributed import setup
    from rsitr.features import FeatureSpec, default_cache_dir, extract_features

    world, device = setup(args.device)  # under torchrun: join the processes that share the images out
    dataset = load_dataset(args.path, layout=args.layout, image_dir=args.images)
    spec = FeatureSpec(backbone=args.backbone, weights=args.backbone_weights, image_size=args.image_size,
                       detections=args.detections, precision=args.precision, boxes=args.boxes,
                       bands=_numbers(args.bands, int, "--bands"), dihedral=args.dihedral)
    cache_dir = Path(args.cache_dir or default_cache_dir())
    cached = spec.cache_path(dataset, cache_dir).is_file()
    started = time.perf_counter()
    features = extract_features(dataset, spec, cache_dir, batch_size=args.batch_size, progress=not args.quiet, device=device)
    seconds = time.perf_counter() - started
    if not world.main:
        return 0
    if cached:
        print(f"{features.num_images} images: features loaded from the cache in {cache_dir} ({seconds:.1f} s)")
    else:
        print(f"{features.num_images} images: features extracted in {seconds:.1f} s "
              f"({features.num_images / max(seconds, 1e-9):.1f} images/s), cached in {cache_dir}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rsitr.models import get_model_spec, list_models

    for name in list_models():
        spec = get_model_spec(name)
        print(f"{name:20s} architecture={spec.architecture:8s} backbone={spec.backbone}")
    return 0


def _experiment_base(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict:
    """The base run config of an experiment as a dict: ``--config`` (or the defaults) plus overrides."""
    from rsitr_train.config import load_config

    _refuse_singular(args)
    config = load_config(args.config, _train_overrides(args))
    if not config.data.path:
        raise ConfigError("give the dataset with --dataset PATH (or data.path in --config)")
    data = config.to_dict()
    for key in exclude:
        data["model"].pop(key, None)
    return data


def _refuse_singular(args: argparse.Namespace) -> None:
    """One-line ConfigError for ``--model`` / ``--seed`` on ``benchmark`` or ``ablate``, naming the plural they take."""
    if args.model is not None:
        right = "--models NAME[,NAME...]" if args.command == "benchmark" else "the study's model (see: rsitr ablate --list)"
        raise ConfigError(f"--model is for one run (rsitr train); rsitr {args.command} takes {right}")
    if args.seed is not None:
        raise ConfigError(f"--seed is for one run (rsitr train); rsitr {args.command} takes --seeds N (seeds 0..N-1)")


def _add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-selection-split", action="store_true",
                        help="report the split the checkpoints were chosen on (tables say: selection split, optimistic); "
                             "by default test is reported, or val with a selection split carved from train")


def _seeds(value: int) -> list[int]:
    if value < 1:
        raise ConfigError(f"--seeds must be >= 1, got {value}")
    return list(range(value))


def cmd_benchmark(args: argparse.Namespace) -> int:
    from rsitr_train.experiments import run_benchmark

    _refuse_singular(args)  # first: a --model given instead of --models is named as such
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if not models:
        raise ConfigError("give the models to compare with --models NAME[,NAME...] (see: rsitr models)")
    started = time.perf_counter()
    if args.resplits < 0:
        raise ConfigError(f"--resplits must be >= 0, got {args.resplits}")
    path, text = run_benchmark(_experiment_base(args), models, _seeds(args.seeds), Path(args.out),
                               report_selection=args.report_selection_split, resplits=args.resplits,
                               progress=not args.quiet, device=args.device or "auto")
    print(text)
    print(f"written {path} and {path.with_suffix('.json')} in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from rsitr_train.experiments import list_studies, load_study, run_study

    if args.list or not args.study:
        for name in list_studies():
            study = load_study(name)
            print(f"{name:14s} {study.model:6s} {len(study.rows)} rows  {study.title}")
        return 0
    study = load_study(args.study)
    started = time.perf_counter()
    path, text = run_study(study, _experiment_base(args), _seeds(args.seeds), Path(args.out),
                           report_selection=args.report_selection_split, progress=not args.quiet, device=args.device)
    print(text)
    print(f"written {path} and {path.with_suffix('.json')} in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from rsitr.data.imagefolder import load_classification_data
    from rsitr_train.pretrain import PretrainConfig, load_pretrain_config, pretrain

    data = load_classification_data(args.path, val_fraction=args.val_fraction, seed=args.seed,
                                    train_split=args.train_split,
                                    val_split=None if args.val_split.lower() == "none" else args.val_split,
                                    hold_out=args.hold_out)
    if _main_process():  # under torchrun every process runs this; one reports
        print(data.summary())
    values = {"backbone": args.backbone, "image_size": args.image_size, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "precision": args.precision,
              "init_weights": args.init_weights, "threads": args.threads, "weight_decay": args.weight_decay,
              "cutmix": args.cutmix, "ema_decay": args.ema_decay}
    if args.config:
        config = load_pretrain_config(args.config, values)
    else:
        config = PretrainConfig(**{k: v for k, v in values.items() if v is not None})
    summary = pretrain(config, data, args.out, progress=not args.quiet, device=args.device)
    if _main_process():
        print(json.dumps(summary, indent=2))
        print(f"use it with: --backbone-weights {Path(args.out) / 'backbone.safetensors'}")
    return 0


def cmd_salient(args: argparse.Namespace) -> int:
    """AMFMN's Fig. 10: images of a split with the MVSA salient mask of a trained run."""
    import numpy as np
    import torch

    from rsitr.data.images import read_image
    from rsitr.devices import module_device, to_device
    from rsitr_train.plots import plot_salient_masks
    from rsitr_train.runs import load_run
    from rsitr_train.trainer import split_image_features

    model, prepared = load_run(args.run_dir, progress=not args.quiet)
    if not hasattr(model, "salient_mask"):
        raise ConfigError(f"{args.run_dir}: model {prepared.spec.name!r} has no salient mask (an AMFMN run is needed)")
    image_ids = prepared.dataset.split_indices(args.split)[: args.count]
    features = split_image_features(prepared, torch.tensor(image_ids), "fp32", progress=not args.quiet)
    with torch.no_grad():
        masks = model.salient_mask(to_device(features, module_device(model))).cpu()
    images = [np.asarray(read_image(prepared.dataset.image_path(i), prepared.feature_spec.bands)) for i in image_ids]
    titles = [prepared.dataset.image_files[i] for i in image_ids]
    path = plot_salient_masks(images, masks, args.out, titles=titles)
    print(f"written {path}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """DOVE's analyses (Figs. 7–10, per-class recall, scene confusion) of a run or bundle on a split."""
    from rsitr_serve.analyses import analyze

    given = {"score_threshold": args.score_threshold, "max_points": args.max_points,  # None: the analysis's default
             "ignored_labels": None if args.ignore_labels is None
             else [part.strip() for part in args.ignore_labels.split(",") if part.strip()]}
    page = analyze(args.model, args.out, split=args.split, dataset=args.dataset, detections=args.detections,
                   significant_list=args.significant_list,
                   significant_classes=None if args.significant_classes is None
                   else [part.strip() for part in args.significant_classes.split(",") if part.strip()],
                   queries=args.queries, seed=args.seed, progress=not args.quiet, device=args.device or "auto",
                   **{key: value for key, value in given.items() if value is not None})
    print(f"analysis: {page} (numbers in {page.with_name('analysis.json')})")
    return 0


def _numbers(value: str | None, kind: type, flag: str) -> list | None:
    """A comma-separated list of numbers (``--scales 1,2``, ``--bands 4,3,2``); one-line error otherwise."""
    if value is None:
        return None
    try:
        return [kind(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {value!r}") from exc


def cmd_index_build(args: argparse.Namespace) -> int:
    from rsitr_serve.indexer import build_index

    options = {"tile": args.tile, "overlap": args.overlap, "scales": _numbers(args.scales, float, "--scales"),
               "shard_size": args.shard_size, "vector_kind": args.vector_index}
    summary = build_index(args.paths, args.model, args.out, first_stage_dir=args.first_stage,
                          bands=_numbers(args.bands, int, "--bands"), batch_size=args.batch_size, progress=not args.quiet,
                          device=args.device or "auto", **{key: value for key, value in options.items() if value is not None})
    print(summary.line())
    print(f"index: {args.out}  (search it with: rsitr search {args.out} \"a sentence\")")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from rsitr_serve.indexer import add_to_index

    summary = add_to_index(args.index_dir, args.paths, model_dir=args.model, batch_size=args.batch_size,
                           progress=not args.quiet, device=args.device)
    print(summary.line())
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    from rsitr_serve.indexer import remove_from_index

    files, tiles = remove_from_index(args.index_dir, args.paths, progress=not args.quiet)
    print(f"removed {files} files ({tiles} tiles) from {args.index_dir}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from rsitr_serve.indexer import index_info

    info = index_info(args.index_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    settings = info["settings"]
    tiling = settings["tiling"]
    vectors = info["vectors"] or {}
    spec = vectors.get("spec") or {}
    print(f"model: {settings['model']['name']} ({settings['model']['architecture']}) at {settings['model']['path']}")
    if settings["first_stage"]:
        print(f"first stage: {settings['first_stage']['name']} at {settings['first_stage']['path']}")
    print(f"tiling: tile {tiling['tile']} px, overlap {tiling['overlap']}, scales {tiling['scales']}; "
          f"bands {settings['bands'] or 'default'}")
    print(f"files: {info['files']} ({info['complete_files']} complete); tiles: {info['tiles']} "
          f"{ {float(k): v for k, v in info['tiles_per_scale'].items()} }; shards: {info['shards']} "
          f"({info['shard_bytes'] / 2**20:.1f} MiB, {info['dead_rows']} removed rows)")
    print(f"vectors: {spec.get('kind', 'none')} {spec}, {vectors.get('count', 0)} vectors, "
          f"{vectors.get('bytes', 0) / 2**20:.1f} MiB, {vectors.get('bytes_per_vector', 0):.0f} bytes per vector")
    print("ready to search" if info["ready"] else "NOT ready: an interrupted build/add; run it again")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from rsitr_serve.search import TileSearcher, read_captions
    from rsitr_serve.sheets import write_contact_sheet

    if args.captions and not args.image:
        raise ConfigError("--captions ranks sentences for an image: give --image PATH too")
    if (args.query is None) == (args.image is None):
        raise ConfigError("give a sentence or --image PATH (one of them)")
    with TileSearcher(args.index_dir, model_dir=args.model, device=args.device or "auto") as searcher:
        if args.captions:
            ranked = searcher.rank_captions(args.image, read_captions(args.captions))[: args.k]
            for caption, score in ranked:
                print(f"{score:8.4f}  {caption}")
            if args.json:
                from rsitr.io import write_json

                write_json(args.json, [{"caption": c, "score": s} for c, s in ranked])
            return 0
        started = time.perf_counter()
        if args.image:
            results = searcher.search_image(args.image, k=args.k)
        else:
            results = searcher.search_text(args.query, k=args.k, rerank=args.rerank)
        seconds = time.perf_counter() - started
    for result in results:
        print(result.line())
    print(f"{len(results)} tiles of {len(searcher)} in {seconds * 1000:.1f} ms")
    if args.json:
        from rsitr.io import write_json

        write_json(args.json, [r.to_dict() for r in results])
    if args.html:
        write_contact_sheet(results, args.html, args.query or f"like {args.image}", searcher.settings)
        print(f"contact sheet: {args.html}")
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    from rsitr.bundle import load_model
    from rsitr_serve.localize import DEFAULT_SIZES, localize, write_localization

    bundle = load_model(args.model_dir, device=args.device or "auto")
    sizes = _numbers(args.scales, int, "--scales") or list(DEFAULT_SIZES)
    bands = _numbers(args.bands, int, "--bands")
    started = time.perf_counter()
    result = localize(bundle, args.image, args.sentences, sizes=sizes, blur=args.blur, batch_size=args.batch_size,
                      bands=bands, progress=not args.quiet)
    written = write_localization(result, args.out, overlay=not args.no_overlay)
    for k, sentence in enumerate(result.sentences):
        x, y = result.hottest(k)
        print(f"{sentence!r}: hottest at x={x} y={y}")
    print(f"{len(result.windows)} windows of {result.width} × {result.height} px at sizes "
          f"{','.join(map(str, result.sizes))} in {time.perf_counter() - started:.1f} s; stages: {result.times.line()}")
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_localize_eval(args: argparse.Namespace) -> int:
    from rsitr.bundle import load_model
    from rsitr_serve.localize import DEFAULT_SIZES
    from rsitr_serve.localize_eval import evaluate_localization, metrics_table

    bundle = load_model(args.model_dir, device=args.device or "auto")
    sizes = _numbers(args.scales, int, "--scales") or list(DEFAULT_SIZES)
    report = evaluate_localization(bundle, args.anno_json, args.image_dir, sizes=sizes, blur=args.blur,
                                   batch_size=args.batch_size, maps_dir=args.maps, progress=not args.quiet)
    print(metrics_table(report))
    if args.json:
        from rsitr.io import write_json

        write_json(args.json, report)
        print(f"metrics: {args.json}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rsitr_serve.server import LOCAL_HOSTS, create_app

    if args.host not in LOCAL_HOSTS and not args.token:
        raise ConfigError(f"--host {args.host} makes the index reachable from other machines: give --token TOKEN too "
                          "(every request must then carry it)")
    app = create_app(args.index_dir, model_dir=args.model, token=args.token, device=args.device or "auto")
    print(f"serving {args.index_dir} on http://{args.host}:{args.port}/  (API documentation: /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsitr", description="Remote-sensing image-text retrieval")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    # --quiet is accepted after the sub-command too (rsitr demo --quiet); SUPPRESS keeps the
    # value given before it when it is not repeated.
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[quiet], help="synthetic data → features → train DOVE-S → evaluate, in minutes")
    demo.add_argument("--out", default="rsitr-demo", help="output folder: data, cache, run (default ./rsitr-demo, "
                                                          "which the repository's .gitignore ignores)")
    demo.add_argument("--num-images", type=int, default=1000, help="synthetic images to draw (default 1000)")
    demo.add_argument("--epochs", type=int, help="override the demo's epoch count")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", parents=[quiet], help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", parents=[quiet], help="write the synthetic dataset (Karpathy layout + detections)")
    synth.add_argument("--out", required=True, help="dataset folder to write")
    synth.add_argument("--num-images", type=int, default=600, help="images to draw (default 600)")
    synth.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the scenes and captions (default 0)")
    synth.set_defaults(func=cmd_synth)
    scenes = data_sub.add_parser("scenes", parents=[quiet], help="write large synthetic scenes with ground-truth regions "
                                                                 "(a localisation benchmark: images/, anno.json, scenes.json)")
    scenes.add_argument("--out", required=True, help="folder to write (images/, anno.json, scenes.json)")
    scenes.add_argument("--count", type=int, default=10, help="number of scenes")
    scenes.add_argument("--seed", type=int, default=0, help="seed of the scenes (default 0)")
    scenes.add_argument("--min-size", type=int, default=2000, help="smallest image side in pixels")
    scenes.add_argument("--max-size", type=int, default=4000, help="largest image side in pixels")
    scenes.add_argument("--min-block", type=int, default=400, help="smallest block side in pixels")
    scenes.add_argument("--max-block", type=int, default=900, help="largest block side in pixels")
    scenes.add_argument("--captions", type=int, default=2, help="captions (localisation samples) per block")
    scenes.set_defaults(func=cmd_scenes)
    mosaics = data_sub.add_parser("mosaics", parents=[quiet], help="grids of a dataset's images of distinct scene classes with "
                                                                   "ground-truth cells (images/, anno.json, mosaics.json)")
    mosaics.add_argument("path", metavar="DATASET", help="dataset file or folder with scene labels (e.g. UCM-Captions)")
    mosaics.add_argument("--out", required=True, help="folder to write (images/, anno.json, mosaics.json)")
    mosaics.add_argument("--split", default="val", help="split whose images fill the cells (default val)")
    mosaics.add_argument("--rows", type=int, default=4, help="cells per column (default 4)")
    mosaics.add_argument("--cols", type=int, default=5, help="cells per row (default 5)")
    mosaics.add_argument("--count", type=int, default=20, help="number of mosaics")
    mosaics.add_argument("--queries", type=int, default=3, help="query captions (distinct cells) per mosaic")
    mosaics.add_argument("--seed", type=int, default=0, help="seed of the images and queries drawn (default 0)")
    mosaics.add_argument("--cell-size", type=int, help="cell side in pixels (default: the split's first image's width)")
    mosaics.add_argument("--format", choices=["png", "jpg"], default="png", help="png (lossless) or jpg (quality 95)")
    mosaics.add_argument("--layout", default="auto", help=LAYOUT_HELP)
    mosaics.set_defaults(func=cmd_mosaics)
    info = data_sub.add_parser("info", parents=[quiet], help="read a dataset and print its splits")
    info.add_argument("path", help="dataset file or folder")
    info.add_argument("--layout", default="auto", help=LAYOUT_HELP)
    info.add_argument("--images", help=IMAGES_HELP)
    info.set_defaults(func=cmd_info)
    audit = data_sub.add_parser("audit", parents=[quiet], help="repeated captions, duplicate images and leaks across splits and datasets")
    audit.add_argument("paths", nargs="+", metavar="PATH", help="dataset files or folders (each with a distinct name)")
    audit.add_argument("--out", required=True, help="folder for audit.md and audit.json")
    audit.add_argument("--layout", default="auto", help="layout of every PATH (default: detected per path)")
    audit.add_argument("--threshold", type=int, help="largest pHash Hamming distance (of 64 bits) of a near-duplicate (default 6)")
    audit.add_argument("--no-images", action="store_true", help="audit captions only")
    audit.set_defaults(func=cmd_audit)

    feats = sub.add_parser("features", parents=[quiet], help="extract and cache backbone features of a dataset")
    feats.add_argument("path", help="dataset file or folder")
    feats.add_argument("--layout", default="auto", help=LAYOUT_HELP)
    feats.add_argument("--images", help=IMAGES_HELP)
    feats.add_argument("--backbone", default="resnet50", help="backbone name, e.g. resnet18, resnet50 (default resnet50)")
    feats.add_argument("--backbone-weights", help="torchvision-layout weights (.safetensors or .pth; default: seeded random)")
    feats.add_argument("--detections", help="detections json giving the region boxes")
    feats.add_argument("--boxes", default="grid",
                       help="grid | activation: region boxes of images without detections (fixed grid or activation proposals)")
    feats.add_argument("--image-size", type=int, default=256, help="side the images are resized to, in pixels (default 256)")
    feats.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="backbone precision (default bf16)")
    feats.add_argument("--dihedral", action="store_true",
                       help="average the features over the 8 rotations and flips of each image (8 backbone passes; "
                            "model.features.dihedral in a run)")
    feats.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    feats.add_argument("--cache-dir", help="feature cache folder (default $RSITR_CACHE_DIR, else ~/.cache/rsitr)")
    feats.add_argument("--bands", help=BANDS_HELP.replace("sets features.bands; ", ""))
    _add_device_argument(feats)
    feats.set_defaults(func=cmd_features)

    tr = sub.add_parser("train", parents=[quiet], help="train a model; the best epoch is chosen on the validation split")
    _add_train_arguments(tr)
    tr.add_argument("--out", required=True, help="run directory (an existing one is resumed)")
    tr.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE (for scripts)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", parents=[quiet], help="evaluate a run directory")
    ev.add_argument("run_dir", help="run directory of rsitr train")
    ev.add_argument("--split", help="split to score (default: the run's report split, as rsitr train names it: test, "
                                    "else a val split that did not choose the epoch)")
    ev.add_argument("--json", help="where to write the metrics (default RUN_DIR/eval_SPLIT.json)")
    ev.add_argument("--precision", choices=["fp32", "bf16"], help="model (and trained backbone) precision; default: the run's train.precision")
    ev.add_argument("--dataset", help="the dataset to evaluate on, when not where the run's config says")
    _add_device_argument(ev)
    ev.set_defaults(func=cmd_evaluate)

    ens = sub.add_parser("ensemble", parents=[quiet], help="evaluate several runs of one dataset and their ensemble "
                                                           "(z-scored score matrices, averaged)")
    ens.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of rsitr train (same dataset and splits)")
    ens.add_argument("--split", help="split to score (default: the first run's report split, as for rsitr evaluate); "
                                     "a split any run trained or chose its epoch on is refused")
    ens.add_argument("--weights", metavar="W1,W2,...", help="one non-negative weight per run, comma-separated (default: equal)")
    ens.add_argument("--json", help="also write every run's and the ensemble's metrics as JSON to this file")
    ens.add_argument("--precision", choices=["fp32", "bf16"], help="precision of every run; default: each run's train.precision")
    ens.add_argument("--dataset", help="the dataset to evaluate on, when not where the runs' configs say")
    _add_device_argument(ens)
    ens.set_defaults(func=cmd_ensemble)

    export = sub.add_parser("export", parents=[quiet], help="write a run's model as a self-contained bundle (rsitr.load_model reads it)")
    export.add_argument("run_dir", help="run directory of rsitr train (or a bundle to copy)")
    export.add_argument("--out", required=True, help="bundle folder to write")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("benchmark", parents=[quiet], help="train and evaluate several models on one dataset; one table, mean ± std over seeds")
    _add_train_arguments(bench, experiment=True)
    bench.add_argument("--models", help="comma-separated model names or YAML paths, e.g. dove,dove-s,vsepp (required)")
    bench.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per model (default 3)")
    _add_protocol_arguments(bench)
    bench.add_argument("--resplits", type=int, default=0,
                       help="DOVE Table I protocol: N random image-level reallocations of train+val, one run each, "
                            "mean ± std on test (replaces --seeds)")
    bench.add_argument("--out", required=True, help="folder for runs and the report (re-running resumes)")
    bench.set_defaults(func=cmd_benchmark)

    ablate = sub.add_parser("ablate", parents=[quiet], help="run an ablation study (DOVE Tables II-V, Fig. 6; ACF Tables 1-3)")
    _add_train_arguments(ablate, experiment=True)
    ablate.add_argument("study", nargs="?", help="study name (see --list) or a study YAML")
    ablate.add_argument("--list", action="store_true", help="list the shipped studies")
    ablate.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row (default 1)")
    _add_protocol_arguments(ablate)
    ablate.add_argument("--out", default="ablations", help="folder for runs and the report")
    ablate.set_defaults(func=cmd_ablate)

    pre = sub.add_parser("pretrain", parents=[quiet], help="scene-classification pretraining of a backbone (ImageFolder tree or a dataset's scene labels)")
    pre.add_argument("path", help="ImageFolder root (one folder per class, optional train/ val/) or a retrieval dataset with scene labels")
    pre.add_argument("--out", required=True, help="output folder (backbone.safetensors, metrics; re-running resumes)")
    pre.add_argument("--config", help="YAML file of pretraining fields, or a shipped recipe (e.g. pretrain_ucm_r18); flags override it")
    pre.add_argument("--backbone", help="resnet18 | resnet50 (default resnet50)")
    pre.add_argument("--image-size", type=int, help="side of the training inputs in pixels (default 224)")
    pre.add_argument("--epochs", type=int, help="passes over the training images (default 30)")
    pre.add_argument("--batch-size", type=int, help="training images per step (default 64)")
    pre.add_argument("--lr", type=float, help="peak SGD learning rate after warm-up (default 0.05)")
    pre.add_argument("--weight-decay", type=float, help="L2 penalty on convolution and linear weights (default 1e-4)")
    pre.add_argument("--cutmix", type=float, help="probability that a batch is CutMixed (0: off)")
    pre.add_argument("--ema-decay", type=float,
                     help="validate, select and save an exponential moving average of the weights with this per-step decay (0: off)")
    pre.add_argument("--precision", choices=["bf16", "fp32"], help="bf16 autocast or fp32 (default bf16)")
    pre.add_argument("--init-weights", help="start from these weights (e.g. ImageNet torchvision weights)")
    pre.add_argument("--threads", type=int, help="torch and decoding threads (default 0: torch's setting, one decoder per CPU)")
    _add_device_argument(pre)
    pre.add_argument("--seed", type=int, default=0, help="seed of the initialisation, shuffling, augmentation and hold-out (default 0)")
    pre.add_argument("--val-fraction", type=float, default=0.2, help="held-out share when there is no val split")
    pre.add_argument("--train-split", default="train", help="for a retrieval dataset: the split whose labels train")
    pre.add_argument("--val-split", default="val", help="for a retrieval dataset: the split that validates; none holds out --val-fraction of "
                     "the train split per class (seeded by --seed), as the carved selection split does")
    pre.add_argument("--hold-out", default="random",
                     help="random | block, with --val-split none: which images of each class are held out (block: the last ones, "
                          "as data.selection_mode: block carves them)")
    pre.set_defaults(func=cmd_pretrain)

    salient = sub.add_parser("salient", parents=[quiet], help="AMFMN salient masks (Fig. 10) of a trained run over images of a split")
    salient.add_argument("run_dir", help="run directory of an AMFMN rsitr train run")
    salient.add_argument("--split", default="val", help="split whose images are drawn (default val)")
    salient.add_argument("--count", type=int, default=6, help="number of images (the split's first ones)")
    salient.add_argument("--out", default="salient_masks.png", help="PNG to write (default ./salient_masks.png)")
    salient.set_defaults(func=cmd_salient)

    analyze = sub.add_parser("analyze", parents=[quiet], help="DOVE's analyses of a model on a split (Figs. 7-10, per-class "
                                                              "recall, scene confusion) as an HTML report")
    analyze.add_argument("model", metavar="RUN_OR_MODEL", help="run directory of rsitr train or model bundle (rsitr export)")
    analyze.add_argument("--split", help="split to analyse (default: test, else val)")
    analyze.add_argument("--dataset", help="dataset file or folder (required for a bundle; default for a run: its data.path)")
    analyze.add_argument("--out", help="report folder (default RUN_DIR/analysis_SPLIT, or ./analysis_SPLIT for a bundle)")
    division = analyze.add_mutually_exclusive_group()
    division.add_argument("--detections", help="detections json dividing significant images (default for a run: its own)")
    division.add_argument("--significant-list", help="text file of significant image names, one per line")
    division.add_argument("--significant-classes", help="comma-separated scene classes whose images are significant "
                                                        "(for datasets without detections, e.g. airplane,storagetanks)")
    analyze.add_argument("--score-threshold", type=float, help="a box above this score is a salient object (default 0.5)")
    analyze.add_argument("--ignore-labels",
                         help="comma-separated detection labels that are not salient objects (default road,tree; '' for none)")
    analyze.add_argument("--queries", type=int, default=2, help="qualitative queries per direction (default 2)")
    analyze.add_argument("--max-points", type=int, help="most t-SNE points, images and sentences (default 2000)")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the queries, the t-SNE sample and t-SNE")
    _add_device_argument(analyze)
    analyze.set_defaults(func=cmd_analyze)

    index = sub.add_parser("index", parents=[quiet], help="index your own imagery (GeoTIFF, TIFF, JPEG, PNG, WebP) for search")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", parents=[quiet], help="tile, encode and index files and folders (re-running resumes)")
    build.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    build.add_argument("--model", required=True, help="model bundle (rsitr export) or run directory")
    build.add_argument("--out", required=True, help="index folder (an existing one is brought up to date)")
    build.add_argument("--tile", type=int, help="tile side in source pixels at scale 1 (default: see docs/search.md)")
    build.add_argument("--overlap", type=float, help="overlap of neighbouring tiles, a fraction of the tile (default: docs/search.md)")
    build.add_argument("--scales", help="comma-separated tile size multipliers, e.g. 1,2 (default: docs/search.md)")
    build.add_argument("--bands", help="1-based source bands for R,G,B, e.g. 4,3,2 (default: the file's RGB, else bands 1-3)")
    build.add_argument("--first-stage", help="a separable model for the first stage, for a pairwise model without one")
    build.add_argument("--vector-index", help="auto | flat | ivf | hnsw (default auto: chosen by the tile count)")
    build.add_argument("--shard-size", type=int, help="tiles per shard and per commit (default 1024)")
    build.add_argument("--batch-size", type=int, default=32, help="tiles encoded at once (default 32)")
    _add_device_argument(build)
    build.set_defaults(func=cmd_index_build)
    add = index_sub.add_parser("add", parents=[quiet], help="index new or changed files into an existing index")
    add.add_argument("index_dir", help=INDEX_HELP)
    add.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    add.add_argument("--model", help="the index's model, when it has moved")
    add.add_argument("--batch-size", type=int, default=32, help="tiles encoded at once (default 32)")
    _add_device_argument(add)
    add.set_defaults(func=cmd_index_add)
    remove = index_sub.add_parser("remove", parents=[quiet], help="drop files (or whole folders) from an index")
    remove.add_argument("index_dir", help=INDEX_HELP)
    remove.add_argument("paths", nargs="+", metavar="PATH", help="indexed files or folders to drop")
    remove.set_defaults(func=cmd_index_remove)
    info_index = index_sub.add_parser("info", parents=[quiet], help="what an index holds")
    info_index.add_argument("index_dir", help=INDEX_HELP)
    info_index.add_argument("--json", action="store_true", help="print the full record as JSON")
    info_index.set_defaults(func=cmd_index_info)

    search = sub.add_parser("search", parents=[quiet], help="search an index by sentence or by image")
    search.add_argument("index_dir", help=INDEX_HELP)
    search.add_argument("query", nargs="?", help="a sentence")
    search.add_argument("-k", type=int, default=20, help="results to return (default 20)")
    search.add_argument("--rerank", type=int, default=100,
                        help="first-stage candidates re-scored by the full model (default 100; 0: first stage only)")
    search.add_argument("--image", help="query by example image (image -> image), or with --captions")
    search.add_argument("--captions", help="a text file of sentences (one per line) to rank for --image (image -> text)")
    search.add_argument("--model", help="the index's model, when it has moved (it must be the same model)")
    search.add_argument("--json", help="write the results as JSON")
    search.add_argument("--html", help="write a contact sheet (HTML with thumbnails)")
    _add_device_argument(search)
    search.set_defaults(func=cmd_search)

    localize = sub.add_parser("localize", parents=[quiet],
                              help="semantic localisation: a heat map of where sentences are true in a large image")
    localize.add_argument("model_dir", help="model bundle (rsitr export) or run directory")
    localize.add_argument("image", help="GeoTIFF, TIFF, JPEG, PNG or WebP")
    localize.add_argument("sentences", nargs="+", help="one or more sentences (one heat map each)")
    _add_window_arguments(localize)
    localize.add_argument("--bands", help="1-based source bands for R,G,B of a multi-band raster, e.g. 4,3,2 "
                                          "(default: the model's, else the file's RGB)")
    localize.add_argument("--no-overlay", action="store_true", help="skip the colour overlay JPEG")
    localize.add_argument("--out", default="localization", help="output folder (default ./localization)")
    localize.set_defaults(func=cmd_localize)

    loc_eval = sub.add_parser("localize-eval", parents=[quiet],
                              help="SeLo metrics (Rsu, Ras, Rda, Rmi) of a model on annotations in the anno.json format")
    loc_eval.add_argument("model_dir", help="model bundle (rsitr export) or run directory")
    loc_eval.add_argument("anno_json", help="annotations: a list of {caption, jpg_name, points}")
    loc_eval.add_argument("image_dir", help="folder holding the annotated images")
    _add_window_arguments(loc_eval)
    loc_eval.add_argument("--maps", help="also write each sample's heat map PNG into this folder")
    loc_eval.add_argument("--json", help="write per-sample and averaged metrics as JSON")
    loc_eval.set_defaults(func=cmd_localize_eval)

    serve = sub.add_parser("serve", parents=[quiet], help="a search service and web page over an index")
    serve.add_argument("index_dir", help=INDEX_HELP)
    serve.add_argument("--model", help="the index's model, when it has moved (it must be the same model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --token)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--token", help="bearer token every request must carry (required off localhost)")
    _add_device_argument(serve)
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", parents=[quiet], help="list registered models")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_console(logging.INFO if _main_process() else logging.WARNING)  # one log, rank 0's, under torchrun
    try:
        if getattr(args, "device", None) is not None:  # a device that is not there fails before any work
            from rsitr.distributed import process_device

            process_device(args.device)
        return int(args.func(args) or 0)
    except RsitrError as exc:
        print(f"rsitr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
