"""``vitpipe <verb>``: one command line for every stage. Verbs import their stage lazily."""

from __future__ import annotations

import argparse
import sys


def _init(args) -> None:
    from vit import ModelInfo, create_model, save_checkpoint

    size = None
    if args.img_size:
        size = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    model = create_model(args.model, image_size=size, num_classes=args.num_classes, head=args.head,
                         embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, mlp_dim=args.mlp_dim)
    save_checkpoint(model, args.out, ModelInfo(labels=args.labels, provenance={"init": args.model, "seed": args.seed}))
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")


def _export(args) -> None:
    from finetune.share import export_with_card

    for note in export_with_card(args.ckpt, args.out, args.format):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out} ({args.format} format, with a model card)")


def _eval(args) -> None:
    from finetune.evaluate import evaluate, summary
    from vit import load_model

    model, info = load_model(args.ckpt)
    report = evaluate(model, info, args.data, args.out or args.ckpt, fewshot_train=args.fewshot_train,
                      shots=tuple(args.shots), seeds=args.seeds, probe=args.linear_probe,
                      batch_size=args.batch_size, workers=args.workers)
    print(summary(report))
    print(f"report: {args.out or args.ckpt}/eval.json")


def _push(args) -> None:
    from finetune.share import push

    files = push(args.ckpt, args.repo_id, args.format, args.private, args.revision, args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    for name, size in files:
        print(f"{verb} {name} ({size} bytes)")
    print(f"{verb} {len(files)} files to {args.repo_id}" + (f" @ {args.revision}" if args.revision else ""))


def _shard(args) -> None:
    from data_tools.images import DEFAULT_MAX_PIXELS, EncodeOptions
    from data_tools.shard import ShardOptions, parse_part, parse_size, shard

    opts = ShardOptions(
        samples_per_shard=args.samples_per_shard,
        max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
        prefix=args.prefix,
        part=parse_part(args.part),
        encode=EncodeOptions(resize_shorter=args.resize_shorter, max_side=args.max_side, quality=args.quality,
                             validate=args.validate, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS),
        path_column=args.path_column, label_column=args.label_column, split=args.split,
        shuffle=not args.no_shuffle, shuffle_seed=args.shuffle_seed,
    )
    index = shard(args.src, args.out, opts, workers=args.workers, overwrite=args.overwrite)
    print(f"{args.out}: {index['total_samples']} samples in {len(index['shards'])} shards, "
          f"{len(index['skipped'])} inputs skipped (listed with reasons in the index)")


def _verify(args) -> int:
    from data_tools.shard import read_index
    from data_tools.verify import class_sorting, verify

    problems, notes = verify(args.out, decode=not args.no_decode)
    for line in notes:
        print(f"note: {line}")
    if warning := class_sorting(read_index(args.out)):
        print(f"warning: {args.out}: {warning}", file=sys.stderr)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{args.out}: every shard matches index.json")
    return 1 if problems else 0


def _inspect(args) -> None:
    from data_tools.verify import inspect

    print(inspect(args.out, show=args.samples, grid=args.grid, grid_size=args.grid_size, seed=args.seed))


def _plot(args) -> None:
    from pathlib import Path

    from finetune.plots import plot_all
    from vit import load_model

    model, info = load_model(args.ckpt)
    metrics = {}
    for spec in args.metrics or []:
        name, _, path = spec.rpartition("=")
        metrics[name or Path(path).parent.name] = Path(path)
    for path in plot_all(model, info, args.out, args.images, metrics):
        print(f"wrote {path}")


def _demo(args) -> None:
    from vitpipe.demo import run_demo

    run_demo(args.out, args.dataset, reduced=args.reduced, seed=args.seed)


def _stage(module: str):
    def run(args) -> int:
        import importlib

        return importlib.import_module(module).main(["--config", args.config, *args.overrides] if args.config
                                                    else args.overrides)
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitpipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("init", help="write a freshly initialized checkpoint folder")
    s.add_argument("model", help="architecture, e.g. vit_ti16, vit_s16, vit_b16")
    s.add_argument("out", help="checkpoint folder to write")
    s.add_argument("--img-size", type=int, nargs="+", metavar="N", help="N or H W (default 224)")
    s.add_argument("--num-classes", type=int, default=1000)
    s.add_argument("--head", choices=["linear", "pretrain", "none"], default="linear")
    s.add_argument("--labels", nargs="+", metavar="NAME", help="class names, one per class")
    s.add_argument("--seed", type=int)
    for dim in ("embed-dim", "depth", "num-heads", "mlp-dim"):
        s.add_argument(f"--{dim}", type=int, help=f"override the named size's {dim.replace('-', ' ')}")
    s.set_defaults(run=_init)

    s = sub.add_parser("export", help="write a checkpoint in vitpipe, timm or transformers format")
    s.add_argument("ckpt", help="checkpoint folder (vitpipe, timm or transformers format)")
    s.add_argument("out", help="folder to write")
    s.add_argument("--format", choices=["vitpipe", "timm", "transformers"], default="vitpipe")
    s.set_defaults(run=_export)

    s = sub.add_parser("shard", help="write an image corpus as webdataset tars with index.json")
    s.add_argument("src", help="folder of class subfolders, manifest (.csv/.jsonl/.parquet), save_to_disk folder, "
                               "or hf:SPEC (hf:imagefolder:DIR, hf:NAME)")
    s.add_argument("out", help="output folder")
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--max-shard-size", metavar="BYTES", help="e.g. 500M, 1G")
    s.add_argument("--prefix", default="shard")
    s.add_argument("--resize-shorter", type=int, metavar="N")
    s.add_argument("--max-side", type=int, metavar="N")
    s.add_argument("--quality", type=int, default=95)
    s.add_argument("--validate", choices=["full", "header"], default="full")
    s.add_argument("--max-pixels", type=int, help="larger images are skipped as decompression bombs")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--shuffle-seed", type=int, default=0, metavar="N",
                   help="seed of the input order's shuffle (every shard mixes the classes)")
    s.add_argument("--no-shuffle", action="store_true",
                   help="keep the source's order (a class-folder corpus then gives one class per shard)")
    s.add_argument("--part", default="0/1", metavar="K/N", help="shard only part K of N (N machines, no coordination)")
    s.add_argument("--path-column")
    s.add_argument("--label-column")
    s.add_argument("--split", help="split of a Hugging Face dataset")
    s.add_argument("--overwrite", action="store_true", help="start over, deleting shards in OUT")
    s.set_defaults(run=_shard)

    for verb, module, what in (("pretrain", "pretrain.run", "pretrain a ViT (single process; use accelerate "
                                                                     "launch -m pretrain for several)"),
                               ("finetune", "finetune.run", "fine-tune a checkpoint (single process; use accelerate "
                                                             "launch -m finetune for several)")):
        s = sub.add_parser(verb, help=what)
        s.add_argument("--config", help="YAML recipe")
        s.add_argument("overrides", nargs="*", metavar="key=value")
        s.set_defaults(run=_stage(module))

    s = sub.add_parser("eval", help="top-1/top-5, per-class accuracy, confusion matrix; few-shot linear")
    s.add_argument("ckpt")
    s.add_argument("--data", required=True, help="eval shards (folder with index.json, list or pattern)")
    s.add_argument("--out", help="where eval.json and confusion.png go (default: the checkpoint folder)")
    s.add_argument("--fewshot-train", metavar="SHARDS", help="few-shot linear evaluation with examples from here")
    s.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--linear-probe", action="store_true", help="also a logistic-regression probe on all examples")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=0)
    s.set_defaults(run=_eval)

    s = sub.add_parser("push", help="export and upload a checkpoint to the Hugging Face hub")
    s.add_argument("ckpt")
    s.add_argument("--repo-id", required=True)
    s.add_argument("--format", choices=["vitpipe", "timm", "transformers"], default="vitpipe")
    s.add_argument("--private", action="store_true")
    s.add_argument("--revision")
    s.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded")
    s.set_defaults(run=_push)

    s = sub.add_parser("plot", help="position-embedding similarity, attention distance, rollout, training curves")
    s.add_argument("ckpt")
    s.add_argument("--out", required=True, help="folder for the PNGs")
    s.add_argument("--images", metavar="SHARDS", help="shards to draw sample images from (attention plots)")
    s.add_argument("--metrics", nargs="+", metavar="[NAME=]metrics.jsonl", help="training curves of these runs")
    s.set_defaults(run=_plot)

    s = sub.add_parser("demo", help="the whole pipeline on real images that ship in a package, in minutes")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--dataset", choices=["auto", "fashion-mnist", "digits"], default="auto")
    s.add_argument("--reduced", action="store_true", help="a seconds-long version (the test suite runs it)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_demo)

    s = sub.add_parser("verify", help="re-check every shard against index.json")
    s.add_argument("out")
    s.add_argument("--no-decode", action="store_true", help="check sha256 and counts only")
    s.set_defaults(run=_verify)

    s = sub.add_parser("inspect", help="samples, classes with counts, image-size distribution")
    s.add_argument("out")
    s.add_argument("--samples", type=int, default=5)
    s.add_argument("--grid", metavar="FILE.png", help="write a contact sheet of random samples")
    s.add_argument("--grid-size", type=int, default=25)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input (CheckpointError too): one line
        print(f"vitpipe {args.verb}: error: {e}", file=sys.stderr)
        return 2
