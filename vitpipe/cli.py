"""``vitpipe <verb>``: one command line for every stage. Verbs import their stage lazily."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _init(args) -> None:
    from vit import ModelInfo, create_model, save_checkpoint

    size = None
    if args.img_size:
        size = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    model = create_model(args.model, image_size=size, num_classes=args.num_classes, head=args.head)
    save_checkpoint(model, args.out, ModelInfo(labels=args.labels, provenance={"init": args.model, "seed": args.seed}))
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")


def _export(args) -> None:
    from vit import export_checkpoint, load_model

    model, info = load_model(args.ckpt)
    for note in export_checkpoint(model, info, args.out, args.format):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out} ({args.format} format)")


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
    s.set_defaults(run=_init)

    s = sub.add_parser("export", help="write a checkpoint in vitpipe, timm or transformers format")
    s.add_argument("ckpt", help="checkpoint folder (vitpipe, timm or transformers format)")
    s.add_argument("out", help="folder to write")
    s.add_argument("--format", choices=["vitpipe", "timm", "transformers"], default="vitpipe")
    s.set_defaults(run=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vit import CheckpointError

    try:
        args.run(args)
    except (UserError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"vitpipe {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0
