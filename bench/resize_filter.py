"""Does bilinear (antialiased) cost accuracy against bicubic? The demo's pipeline, once per filter and seed.

For each seed: the demo's corpus and labelled subset; a validation split cut from the training images (those not
labelled; the test set is never read); then, for each resize filter (used in pretraining, fine-tuning and
validation alike), the demo's pretraining recipe and its fine-tuning recipe on the labelled images, and the
fine-tuned model's top-1 on the validation split. Prints one line per run and a table.

    python -m bench.resize_filter --out runs/resize-filter --dataset digits --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vitpipe.demo import Demo, write_manifest

FILTERS = ("bicubic", "bilinear")


def validation_split(demo: Demo) -> None:
    """The training images not in the labelled subset, sharded: the split a recipe is tuned on."""
    from data_tools.shard import ShardOptions, shard

    rest = np.setdiff1d(np.arange(len(demo.xtr)), demo.labelled)
    files = sorted((demo.data / "train").glob("*/*.png"), key=lambda p: p.name)  # named by their training index
    manifest = write_manifest(demo.data / "val.csv", [files[i] for i in rest], demo.ytr[rest], demo.classes)
    shard(str(manifest), demo.shards / "val", ShardOptions(samples_per_shard=2000), workers=2, overwrite=True)


def one_run(demo: Demo, resize_filter: str) -> dict:
    """Pretrain and fine-tune with ``resize_filter``; the fine-tuned model's validation top-1."""
    b, t0 = demo.budget, time.perf_counter()
    demo.runs = demo.out / f"runs-{resize_filter}"
    demo.common = [f"train.seed={demo.seed}", "data.workers=1", f"data.resize_filter={resize_filter}"]
    out = demo.runs / "pretrained_finetune"
    if not (out / "final").is_dir():  # a run an interrupted comparison finished is not trained again
        demo.pretrain()
        demo.finetune(b.finetune_config, (*b.finetune_args, f"data.val={demo.shards / 'val'}"),
                      demo.runs / "pretrain" / "final", out)
    last = json.loads((out / "val_metrics.jsonl").read_text().splitlines()[-1])
    knn = json.loads((demo.runs / "pretrain" / "val_metrics.jsonl").read_text().splitlines()[-1])
    return {"seed": demo.seed, "filter": resize_filter, "val_top1": last["val_accuracy"],
            "val_samples": last["val_samples"], "knn_top1": knn.get("knn_top1"),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/resize-filter")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        demo = Demo(Path(args.out).resolve() / f"seed{seed}", args.dataset, reduced=False, seed=seed)
        demo.write_corpus()
        demo.shard()
        validation_split(demo)
        for f in FILTERS:
            rows.append(one_run(demo, f))
            print("RESULT " + json.dumps(rows[-1]), flush=True)
    print(f"\n{'filter':10s}" + "".join(f"{'seed ' + str(s):>12s}" for s in args.seeds) + f"{'mean':>10s}")
    for f in FILTERS:
        accs = [r["val_top1"] for r in rows if r["filter"] == f]
        print(f"{f:10s}" + "".join(f"{a:>12.2%}" for a in accs) + f"{np.mean(accs):>10.2%}")


if __name__ == "__main__":
    main()
