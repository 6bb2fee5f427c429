"""Plots that read: a title naming the model, labelled axes and colour bars, one metric family per axes,
lines that stay visible when they coincide; a contact sheet that scales small images up."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.shard import ShardOptions, shard
from data_tools.tars import image_bytes, read_tar
from data_tools.verify import inspect
from finetune import plots
from finetune.plots import attention_rollout, mean_attention_distance, position_similarity
from vit import ModelInfo, create_model

from .corpus import write_patterns
from .helpers import randomize


def _run(folder, stage, objective, rows, evaluations=()):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"stage": stage, "objective": {"name": objective}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evaluations:
        (folder / "val_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluations))
    return folder / "metrics.jsonl"


@pytest.fixture
def runs(tmp_path):
    steps = range(5, 55, 5)
    return {
        "pretrain": _run(tmp_path / "mpp", "pretrain", "mpp",
                         [{"step": s, "loss": 6.2 - s / 20, "accuracy": s / 100, "lr": 1e-3} for s in steps]),
        "mae": _run(tmp_path / "mae", "pretrain", "mae", [{"step": s, "loss": 1 / s, "lr": 1e-3} for s in steps],
                    evaluations=[{"step": s, "knn_top1": 0.3 + s / 100, "knn_queries": 30} for s in steps]),
        "pretrained+finetune": _run(tmp_path / "ft", "finetune", "supervised",
                                    [{"step": s, "loss": 2.3 - s / 40, "accuracy": s / 60, "lr": 0.01} for s in steps]),
        "scratch": _run(tmp_path / "scratch", "finetune", "supervised",
                        [{"step": s, "loss": 2.3 - s / 50, "accuracy": s / 70, "lr": 0.01} for s in steps]),
    }


def test_curve_panels_keep_stages_objectives_and_metric_families_apart(runs):
    panels = plots.curve_panels(runs)
    layout = {(p.row, p.col): (p.title, sorted(p.lines)) for p in panels}
    assert layout == {
        (0, 0): ("pretraining (mae): training loss", ["mae"]),
        (0, 1): ("pretraining (mae): kNN monitor top-1 (frozen features)", ["mae"]),  # from val_metrics.jsonl
        (0, 2): ("pretraining (mae): learning rate", ["mae"]),  # MAE logs no accuracy: no empty panel for it
        (1, 0): ("pretraining (mpp): training loss", ["pretrain"]),
        (1, 1): ("pretraining (mpp): training accuracy (batches)", ["pretrain"]),
        (1, 2): ("pretraining (mpp): learning rate", ["pretrain"]),
        (2, 0): ("fine-tuning (supervised): training loss", ["pretrained+finetune", "scratch"]),
        (2, 1): ("fine-tuning (supervised): training accuracy (batches)", ["pretrained+finetune", "scratch"]),
        (2, 2): ("fine-tuning (supervised): learning rate", ["pretrained+finetune", "scratch"]),
    }
    for p in panels:  # every curve starts at the first logged step and holds every logged point
        assert all(points[0][0] == 5 and len(points) == 10 for points in p.lines.values())


class _Recorder:
    """Stands in for saving: keeps what a reader of each figure would see."""

    def __init__(self):
        self.figures = {}

    def __call__(self, fig, path):
        axes = [ax for ax in fig.axes if ax.get_visible()]
        bars = [ax for ax in axes if ax.get_label() == "<colorbar>"]
        self.figures[path.name] = {
            "title": fig._suptitle.get_text() if fig._suptitle else "",
            "sup": (fig._supxlabel.get_text() if fig._supxlabel else "", fig._supylabel.get_text() if fig._supylabel else ""),
            "titles": [ax.get_title() for ax in axes if ax not in bars],
            "labels": [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes if ax not in bars],
            "bars": [ax.get_ylabel() for ax in bars],
            "styles": [[(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()] for ax in axes],
        }
        plots._plt().close(fig)


def test_every_plot_names_the_model_and_labels_its_axes(runs, tmp_path, monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(plots, "_save", recorder)
    model = randomize(create_model("vit_ti4", image_size=16, depth=2, embed_dim=32, num_heads=2, mlp_dim=64,
                                   num_classes=3))
    src = write_patterns(tmp_path / "src", per_class=4, size=16)
    shard(str(src), tmp_path / "shards", ShardOptions(samples_per_shard=12), progress=False)
    written = plots.plot_all(model, ModelInfo(), tmp_path / "plots", tmp_path / "shards", runs, name="ft/final")
    assert {p.name for p in written} == set(recorder.figures) and len(written) == 4
    figs = recorder.figures
    for name in ("position_similarity.png", "attention_distance.png", "attention_rollout.png"):
        assert "ft/final" in figs[name]["title"] + " ".join(figs[name]["titles"]), name
    assert figs["position_similarity.png"]["sup"] == ("input patch column", "input patch row")
    assert figs["position_similarity.png"]["bars"] == ["cosine similarity with the other positions"]
    assert figs["attention_distance.png"]["labels"] == [("network depth (layer)", "mean attention distance (pixels)")]
    assert figs["attention_rollout.png"]["bars"] == ["attention, scaled to [0, 1] per image"]
    assert "(class token to patches, all layers)" in figs["attention_rollout.png"]["title"]
    curves = figs["training_curves.png"]
    assert curves["title"] == "Training curves: pretrain, mae, pretrained+finetune, scratch"
    assert curves["titles"] == [p.title for p in plots.curve_panels(runs)]  # every axes a panel: none empty
    assert all(curves["styles"])
    assert all(x == "step" and y for x, y in curves["labels"])
    finetune_lr = curves["styles"][-1]  # two runs, the same schedule: the lines coincide, so they must differ
    assert len(finetune_lr) == 2 and finetune_lr[0] != finetune_lr[1]


def test_rollout_of_an_average_pooling_model_follows_its_pooling(tmp_path, monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(plots, "_save", recorder)
    model = randomize(create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64,
                                   global_pool="avg"))
    x = torch.randn(2, 3, 16, 16)
    plots.plot_rollout(model, x, [np.zeros((16, 16, 3), np.uint8)] * 2, tmp_path / "r.png", "avg/final")
    assert "average of the patch tokens" in recorder.figures["r.png"]["title"]
    maps = plots.attention_maps(model, x)
    rows = plots.attention_rollout(maps, "token"), plots.attention_rollout(maps, "avg")
    assert rows[0].shape == rows[1].shape == (2, 16) and not torch.allclose(*rows)


def test_plot_pngs_are_written(runs, tmp_path):
    model = randomize(create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64))
    written = plots.plot_all(model, ModelInfo(), tmp_path, metrics=runs, name="run/final")
    assert [p.name for p in written] == ["position_similarity.png", "training_curves.png"]
    for p in written:
        assert Image.open(p).format == "PNG" and not p.with_name(p.name + ".tmp").exists()


def test_contact_sheet_scales_small_images_up_by_whole_pixels(tmp_path):
    src = write_patterns(tmp_path / "src", per_class=2, size=16)
    shard(str(src), tmp_path / "shards", ShardOptions(samples_per_shard=10), progress=False)
    inspect(tmp_path / "shards", grid=tmp_path / "grid.png", grid_size=9)
    sheet = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    first = next(read_tar(tmp_path / "shards" / json.loads((tmp_path / "shards" / "index.json").read_text())
                          ["shards"][0]["name"]))
    small = np.asarray(Image.open(io.BytesIO(image_bytes(first))).convert("RGB"))
    assert small.shape == (16, 16, 3)
    # a 128-pixel cell holds the 16-pixel image 8x larger, each pixel an 8x8 block (nearest, not blurred)
    np.testing.assert_array_equal(sheet[:128, :128], np.kron(small, np.ones((8, 8, 1), dtype=np.uint8)))


def test_position_similarity():
    pe = torch.randn(1, 1 + 12, 8)
    sim = position_similarity(pe, (3, 4))
    assert sim.shape == (3, 4, 3, 4)
    assert torch.allclose(sim[1, 2, 1, 2], torch.tensor(1.0)) and torch.allclose(sim[0, 1, 2, 3], sim[2, 3, 0, 1])


def test_mean_attention_distance():
    n = 1 + 4  # a 2x2 grid of 16-pixel patches
    to_self = torch.eye(n).expand(1, 2, n, n)
    assert torch.allclose(mean_attention_distance(to_self, (2, 2), 16), torch.zeros(2))
    uniform = torch.full((1, 1, n, n), 1 / n)
    # from any patch: itself 0, two neighbours 16, the diagonal 16*sqrt(2); averaged uniformly
    expected = (0 + 16 + 16 + 16 * 2**0.5) / 4
    assert mean_attention_distance(uniform, (2, 2), 16).item() == pytest.approx(expected)


def test_attention_rollout():
    n = 5
    uniform = [torch.full((2, 3, n, n), 1 / n)] * 3
    r = attention_rollout(uniform)
    assert r.shape == (2, 4) and torch.allclose(r, r[:, :1].expand_as(r))
    cls_only = torch.zeros(1, 1, n, n)
    cls_only[..., 0] = 1.0  # every token attends to the class token only
    assert torch.allclose(attention_rollout([cls_only]), torch.zeros(1, 4))
