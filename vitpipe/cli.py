"""``vitpipe <verb>``: one command line for every stage. Verbs import their stage lazily."""

from __future__ import annotations

import argparse
import sys

from common.args import Once, int_in
from common.errors import VitpipeError, exit_status


def _init(args) -> None:
    from vit import ModelInfo, create_model, save_checkpoint

    size = None
    if args.img_size:
        size = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    try:
        model = create_model(args.model, image_size=size, num_classes=args.num_classes, head=args.head,
                             embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                             mlp_dim=args.mlp_dim)
    except ValueError as e:  # the architecture the user asked for
        raise VitpipeError(str(e)) from None
    save_checkpoint(model, args.out, ModelInfo(labels=args.labels, provenance={"stage": "init", "init": args.model, "seed": args.seed}))
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")


def _export(args) -> None:
    from finetune.share import export_with_card

    for note in export_with_card(args.ckpt, args.out, args.format, force=args.force):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out} ({args.format} format, with a model card)")


def _eval(args) -> None:
    from finetune.evaluate import evaluate, summary
    from vit import load_model

    model, info = load_model(args.ckpt)
    report = evaluate(model, info, args.data, args.out or args.ckpt, fewshot_train=args.fewshot_train,
                      shots=tuple(args.shots), seeds=args.seeds, probe=args.linear_probe,
                      batch_size=args.batch_size, workers=args.workers, where=args.ckpt)
    print(summary(report))
    print(f"report: {args.out or args.ckpt}/eval.json")


def _push(args) -> None:
    from finetune.share import push

    files = push(args.ckpt, args.repo_id, args.format, args.private, args.revision, args.dry_run, force=args.force)
    verb = "would upload" if args.dry_run else "uploaded"
    for name, size in files:
        print(f"{verb} {name} ({size} bytes)")
    print(f"{verb} {len(files)} files to {args.repo_id}" + (f" @ {args.revision}" if args.revision else ""))


def _shard(args) -> None:
    from data_tools.engines import engine_options, run_engine
    from data_tools.images import DEFAULT_MAX_PIXELS, EncodeOptions
    from data_tools.shard import ShardOptions, parse_part, parse_size

    opts = ShardOptions(
        samples_per_shard=args.samples_per_shard,
        max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
        prefix=args.prefix,
        part=parse_part(args.part),
        encode=EncodeOptions(resize_shorter=args.resize_shorter, max_side=args.max_side, quality=args.quality,
                             validate=args.validate, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS),
        path_column=args.path_column, label_column=args.label_column, split=args.split,
        shuffle=not args.no_shuffle, shuffle_seed=args.shuffle_seed, allow_local_paths=args.allow_local_paths,
    )
    index = run_engine(args.engine, args.src, args.out, opts, workers=args.workers, overwrite=args.overwrite,
                       **engine_options(args))
    for line in _shard_summary(args.out, index):
        print(line)


SKIPS_SHOWN = 5  # skipped inputs named on the console; index.json lists them all


def _shard_summary(out: str, index: dict) -> list[str]:
    """What a shard run wrote (a part's share, and what its set still waits for), and the first skipped inputs."""
    from common.text import plural
    from data_tools.shard import parts_progress
    from data_tools.store import shard_folder

    skipped = index["skipped"]
    part = f"part {index['part']}: " if "part" in index else ""
    lines = [f"{out}: {part}{plural(index['total_samples'], 'sample')} in {plural(len(index['shards']), 'shard')}, "
             f"{plural(len(skipped), 'input')} skipped" + (", the first:" if len(skipped) > SKIPS_SHOWN else
                                                           ":" if skipped else "")]
    lines += [f"  {s['source']}: {s['reason']}" for s in skipped[:SKIPS_SHOWN]]
    if len(skipped) > SKIPS_SHOWN:
        lines.append(f"  ... and {len(skipped) - SKIPS_SHOWN} more")
    if skipped:
        lines.append(f"every skipped input is listed with its reason in {'its part record' if part else 'index.json'} "
                     "('skipped')")
    if part and (progress := parts_progress(shard_folder(out))):
        words, every_part = progress
        lines.append(f"{out}: {words}; " + ("index.json lists the whole set" if every_part else
                                            "the last part to complete writes index.json"))
    return lines


def _verify(args) -> int:
    from data_tools.shard import read_index
    from data_tools.verify import class_sorting, verify

    problems, notes = verify(args.shards, decode=not args.no_decode, progress=True)
    for line in notes:
        print(f"note: {line}")
    if warning := class_sorting(read_index(args.shards)):
        print(f"warning: {args.shards}: {warning}", file=sys.stderr)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{args.shards}: every shard matches index.json")
    return 1 if problems else 0


def _inspect(args) -> int:
    from data_tools.verify import inspect

    text, problems = inspect(args.shards, show=args.samples, grid=args.grid, grid_size=args.grid_size,
                             seed=args.seed)
    print(text)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{args.shards}: {len(problems)} problem(s) above; vitpipe verify {args.shards} checks every shard",
              file=sys.stderr)
    return 1 if problems else 0


def _plot(args) -> None:
    from pathlib import Path

    from finetune.plots import plot_all
    from vit import load_model

    model, info = load_model(args.ckpt)
    metrics = {}
    for spec in args.metrics or []:
        name, _, path = spec.rpartition("=")
        metrics[name or Path(path).parent.name] = Path(path)
    name = "/".join(Path(args.ckpt).resolve().parts[-2:])  # e.g. pretrained_finetune/final: in every title
    for path in plot_all(model, info, args.out, args.images, metrics, name):
        print(f"wrote {path}")


def _demo(args) -> None:
    from vitpipe.demo import run_demo

    run_demo(args.out, main, args.dataset, reduced=args.reduced, seed=args.seed)


def _stage(module: str):
    def run(args) -> int:
        import importlib

        from common.devices import cpu_for_deepspeed_without_a_gpu

        cpu_for_deepspeed_without_a_gpu()
        argv = (["--config", args.config] if args.config else []) + (["--print-config"] if args.print_config else [])
        return importlib.import_module(module).main([*argv, *args.overrides])
    return run


class _Help(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; each option's default appended unless its help already gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        return f"{text} (default: {default})"


class _StageHelp(argparse.Action):
    """``--help`` for pretrain / finetune: the stage's own parser, which lists every config key, imported
    only when asked (it needs torch)."""

    def __init__(self, option_strings, dest, module: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the examples and every config key with its default, and exit", **kwargs)
        self.module = module

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib

        importlib.import_module(self.module).parser(parser.prog).print_help()
        parser.exit()


def _verb(sub, name: str, summary: str, examples: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog="examples:\n" + examples.strip("\n"), formatter_class=_Help, **kwargs)


class _LazyChoices:
    """A registry's names as argparse ``choices``, read only when argparse needs them (checking a value, showing
    the verb's help): the registries import torch, which the other verbs should not pay for."""

    def __init__(self, module: str, registry: str):
        self.module, self.registry = module, registry

    def _names(self) -> list[str]:
        import importlib

        return list(getattr(importlib.import_module(self.module), self.registry))

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


EXPORT_FORMATS = _LazyChoices("vit.formats", "FORMATS")


def _shard_verb(sub) -> None:
    from data_tools.engines import add_engine_arguments

    s = _verb(sub, "shard", "write an image corpus as webdataset tars with an index.json", """
  vitpipe shard photos/ shards/train                        # a folder of class subfolders
  vitpipe shard manifest.csv shards/train --max-shard-size 1G
  vitpipe shard hf:imagefolder:/data/pets shards/pets --resize-shorter 256 --workers 8
  vitpipe shard /data/corpus shards/corpus --part 3/16     # machine 3 of 16, no coordination
  vitpipe shard /shared/corpus /shared/shards --engine ray --ray-address auto --parts 64   # on a Ray cluster
  vitpipe shard s3://bucket/photos s3://bucket/shards --engine ray --ray-address auto    # ... writing to a bucket
  vitpipe shard s3://bucket/photos s3://bucket/shards/train # any fsspec URL, in or out (s3fs: make install includes it)
""")
    s.add_argument("src", help="folder of class subfolders, manifest (.csv/.jsonl/.parquet), save_to_disk folder, "
                               "hf:SPEC (hf:imagefolder:DIR, hf:NAME), or a URL (s3://...) of class folders or a "
                               "manifest")
    s.add_argument("out", help="output folder, or a URL (s3://bucket/prefix)")
    s.add_argument("--samples-per-shard", type=int_in(1), default=1000, metavar="N",
                   help="inputs per shard: shard k holds inputs k*N to (k+1)*N-1 of the shuffled order, less those "
                        "skipped")
    s.add_argument("--max-shard-size", metavar="BYTES",
                   help="cut a shard into pieces past this size (PREFIX-k.tar, PREFIX-k-001.tar, ...), e.g. 500M, 1G "
                        "(default: no limit)")
    s.add_argument("--prefix", default="shard", help="tar file names: PREFIX-000000.tar, ...")
    s.add_argument("--resize-shorter", type=int_in(1), metavar="N",
                   help="resize so the shorter side is N pixels (default: keep the original size)")
    s.add_argument("--max-side", type=int_in(1), metavar="N", help="cap the longer side at N pixels (default: no cap)")
    s.add_argument("--quality", type=int_in(1, 100), default=95, metavar="Q",
                   help="JPEG quality for images that are re-encoded (resized or converted)")
    s.add_argument("--validate", choices=["full", "header"], default="full",
                   help="full: decode every image; header: read headers only (faster)")
    s.add_argument("--max-pixels", type=int_in(1), metavar="N",
                   help="larger images are skipped as decompression bombs (default: PIL's limit, 89,478,485)")
    s.add_argument("--workers", type=int_in(1), metavar="N",
                   help="local: encoding processes, the output is the same for any number (default: 1); "
                        "ray: parts running at once (default: as many as the cluster's CPUs allow)")
    s.add_argument("--shuffle-seed", type=int_in(0, 2**32 - 1), default=0, metavar="N",
                   help="seed of the input order's shuffle (every shard mixes the classes)")
    s.add_argument("--no-shuffle", action="store_true",
                   help="keep the source's order (a class-folder corpus then gives one class per shard)")
    s.add_argument("--part", default="0/1", metavar="K/N",
                   help="write only part K of N of the shards (N machines, no coordination; the last part to complete "
                        "writes index.json)")
    s.add_argument("--path-column", metavar="NAME",
                   help="a manifest's image column (default: the first of path, file, filename, file_name, "
                        "image_path, image)")
    s.add_argument("--label-column", metavar="NAME",
                   help="a manifest's or HF dataset's label column (default: the first of label, labels, class, "
                        "cls, target; none: unlabelled)")
    s.add_argument("--split", help="split of a Hugging Face dataset (default: train, else the first)")
    s.add_argument("--allow-local-paths", action="store_true",
                   help="let a manifest on an object store name local files or file:// URLs (default: only objects "
                        "of its own store)")
    s.add_argument("--overwrite", action="store_true", help="start over, deleting shards in OUT")
    add_engine_arguments(s)
    s.set_defaults(run=_shard)


def _verify_verb(sub) -> None:
    s = _verb(sub, "verify", "re-check every shard against index.json (sha256, counts, every image decodes)", """
  vitpipe verify shards/train
  vitpipe verify shards/train --no-decode      # sha256 and counts only: fast
  vitpipe verify s3://bucket/shards/train      # streamed, one shard at a time
""")
    s.add_argument("shards", help="shard folder or URL (with index.json)")
    s.add_argument("--no-decode", action="store_true", help="check sha256 and counts only")
    s.set_defaults(run=_verify)


def _inspect_verb(sub) -> None:
    s = _verb(sub, "inspect", "classes with counts, image sizes, first samples and a contact sheet", """
  vitpipe inspect shards/train
  vitpipe inspect shards/train --grid grid.png --grid-size 49
  vitpipe inspect s3://bucket/shards/train
""")
    s.add_argument("shards", help="shard folder or URL (with index.json)")
    s.add_argument("--samples", type=int_in(0), default=5, metavar="N", help="samples to list")
    s.add_argument("--grid", metavar="FILE.png", help="write a contact sheet of random samples (default: none)")
    s.add_argument("--grid-size", type=int_in(1), default=25, metavar="N", help="images on the contact sheet")
    s.add_argument("--seed", type=int_in(0), default=0, help="seed of the contact sheet's random pick")
    s.set_defaults(run=_inspect)


def _stage_verbs(sub) -> None:
    """pretrain and finetune hand their arguments to the stage's own parser (config file + key=value)."""
    for verb, module, what in (
            ("pretrain", "pretrain.run", "pretrain a ViT (one process; accelerate launch -m pretrain for several)"),
            ("finetune", "finetune.run", "fine-tune a checkpoint (one process; accelerate launch -m finetune for "
                                         "several)")):
        s = sub.add_parser(verb, help=what, add_help=False, description=what[0].upper() + what[1:] + ".")
        s.add_argument("-h", "--help", action=_StageHelp, module=module)
        s.add_argument("--config", action=Once)
        s.add_argument("--print-config", action="store_true")
        s.add_argument("overrides", nargs="*", metavar="key=value")
        s.set_defaults(run=_stage(module))


def _init_verb(sub) -> None:
    s = _verb(sub, "init", "write a randomly initialised checkpoint (to train from scratch)", """
  vitpipe init vit_s16 runs/s16_init --num-classes 100 --seed 0
  vitpipe init vit_ti4 runs/scratch_init --img-size 32 --embed-dim 128 --depth 6 --num-heads 4 --mlp-dim 512 \\
      --num-classes 10 --seed 0
""")
    s.add_argument("model", help="architecture vit_<ti|s|b|l|h><patch>, e.g. vit_ti16, vit_s16, vit_b16")
    s.add_argument("out", help="checkpoint folder to write")
    s.add_argument("--img-size", type=int_in(1), nargs="+", metavar="N", help="N or H W (default: 224)")
    s.add_argument("--num-classes", type=int_in(0), default=1000, metavar="N", help="classifier outputs")
    s.add_argument("--head", choices=["linear", "pretrain", "none"], default="linear",
                   help="linear classifier, the paper's pretraining head (tanh layer + linear), or none")
    s.add_argument("--labels", nargs="+", metavar="NAME", help="class names, one per class (default: none)")
    s.add_argument("--seed", type=int_in(0, 2**64 - 1), help="seed of the initialisation (default: torch's unseeded state)")
    for dim in ("embed-dim", "depth", "num-heads", "mlp-dim"):
        s.add_argument(f"--{dim}", type=int_in(1), metavar="N",
                       help=f"override the named size's {dim.replace('-', ' ')} (default: the named size's)")
    s.set_defaults(run=_init)


def _eval_verb(sub) -> None:
    s = _verb(sub, "eval", "top-1/top-5, per-class accuracy, confusion matrix; few-shot linear on frozen features", """
  vitpipe eval runs/tiny-finetune/final --data shards/test
  vitpipe eval runs/tiny-pretrain/final --data shards/test --fewshot-train shards/train --shots 1 5 10 25 --linear-probe
""")
    s.add_argument("ckpt", help="checkpoint folder (in any format export writes)")
    s.add_argument("--data", required=True, help="eval shards (folder with index.json, list or pattern)")
    s.add_argument("--out", help="where eval.json and confusion.png go (default: the checkpoint folder)")
    s.add_argument("--fewshot-train", metavar="SHARDS",
                   help="few-shot linear evaluation with examples drawn from these shards (default: none)")
    s.add_argument("--shots", type=int_in(1), nargs="+", default=[1, 5, 10, 25], metavar="K",
                   help="examples per class of each few-shot evaluation")
    s.add_argument("--seeds", type=int_in(1), default=3, metavar="N", help="few-shot draws per K (mean and spread)")
    s.add_argument("--linear-probe", action="store_true", help="also a logistic-regression probe on all examples")
    s.add_argument("--batch-size", type=int_in(1), default=64, metavar="N", help="images per forward pass")
    s.add_argument("--workers", type=int_in(0), default=0, metavar="N", help="data-loading processes (0: in this one)")
    s.set_defaults(run=_eval)


def _plot_verb(sub) -> None:
    s = _verb(sub, "plot", "position-embedding similarity, attention distance, rollout, training curves", """
  vitpipe plot runs/tiny-finetune/final --out plots --images shards/test \\
      --metrics pretrain=runs/tiny-pretrain/metrics.jsonl finetune=runs/tiny-finetune/metrics.jsonl
""")
    s.add_argument("ckpt", help="checkpoint folder")
    s.add_argument("--out", required=True, help="folder for the PNGs")
    s.add_argument("--images", metavar="SHARDS",
                   help="shards to draw sample images from, for the attention plots (default: no attention plots)")
    s.add_argument("--metrics", nargs="+", metavar="[NAME=]metrics.jsonl",
                   help="training curves of these runs (default: none; NAME defaults to the run folder's name)")
    s.set_defaults(run=_plot)


def _export_verb(sub) -> None:
    s = _verb(sub, "export", "write a checkpoint in another library's format (or ours), with a model card", """
  vitpipe export runs/tiny-finetune/final out/timm --format timm
      # then: timm.create_model("local-dir:out/timm", pretrained=True)
  vitpipe export runs/tiny-finetune/final out/hf --format transformers
      # then: ViTForImageClassification.from_pretrained("out/hf"), ViTImageProcessor.from_pretrained("out/hf")
""")
    s.add_argument("ckpt", help="checkpoint folder (in any format export writes)")
    s.add_argument("out", help="folder to write")
    s.add_argument("--format", choices=EXPORT_FORMATS, default="vitpipe", metavar="FORMAT",
                   help="layout to write: %(choices)s")
    s.add_argument("--force", action="store_true", help="export even a model whose weights hold NaN or inf")
    s.set_defaults(run=_export)


def _push_verb(sub) -> None:
    s = _verb(sub, "push", "export a checkpoint and upload it to the Hugging Face hub", """
  vitpipe push runs/tiny-finetune/final --repo-id team/vit-tiny --format transformers --dry-run
  vitpipe push runs/tiny-finetune/final --repo-id team/vit-tiny --format timm --private --revision v1
""")
    s.add_argument("ckpt", help="checkpoint folder")
    s.add_argument("--repo-id", required=True, help="ORG/NAME on the hub (created if missing)")
    s.add_argument("--format", choices=EXPORT_FORMATS, default="vitpipe", metavar="FORMAT",
                   help="layout to upload: %(choices)s")
    s.add_argument("--private", action="store_true", help="create the repository private")
    s.add_argument("--revision", help="branch to upload to (created if missing; default: main)")
    s.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded")
    s.add_argument("--force", action="store_true", help="upload even a model whose weights hold NaN or inf")
    s.set_defaults(run=_push)


def _demo_verb(sub) -> None:
    s = _verb(sub, "demo", "the whole pipeline on real images that ship in a package, in minutes", """
  vitpipe demo                                   # Fashion-MNIST if apt can install it, else scikit-learn's digits
  vitpipe demo --reduced --dataset digits --out runs/demo-small   # seconds
""")
    s.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    s.add_argument("--dataset", choices=["auto", "fashion-mnist", "digits"], default="auto",
                   help="auto: Fashion-MNIST when apt can install it, else digits")
    s.add_argument("--reduced", action="store_true", help="a seconds-long version (the test suite runs it)")
    s.add_argument("--seed", type=int_in(0), default=0, help="seed of every step")
    s.set_defaults(run=_demo)


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint when a stage's config key is written as an option (``--max_steps 20``)."""

    argv: list[str] = []

    def error(self, message: str):
        stage = next((a for a in self.argv[:1] if a in ("pretrain", "finetune")), None)
        if stage and "unrecognized arguments" in message:
            message += "\nconfig keys are given as key=value, e.g. train.max_steps=20 (vitpipe " \
                       f"{stage} --help lists them)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from vitpipe import __version__

    p = _Parser(
        prog="vitpipe", formatter_class=_Help,
        description="Shard image corpora, pretrain and fine-tune Vision Transformers, evaluate them and share them.",
        epilog="The verbs in pipeline order: shard the images, verify / inspect the shards, pretrain (or init a\n"
               "random model), finetune, eval, plot, export or push. vitpipe demo runs all of it on real images.\n"
               "vitpipe VERB --help shows a verb's options, defaults and examples.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    for add_verb in (_shard_verb, _verify_verb, _inspect_verb, _stage_verbs, _init_verb, _eval_verb, _plot_verb,
                     _export_verb, _push_verb, _demo_verb):  # pipeline order: the order --help lists them
        add_verb(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and not any(a.startswith("-") for a in extra):
        args.overrides += extra  # key=value after an option: vitpipe pretrain ... --print-config train.seed=1
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return exit_status(f"vitpipe {args.verb}", lambda: args.run(args))
