import math

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.loop import latest_checkpoint, lr_factor, param_groups
from pretrain.objectives import (
    MaskedPatchPrediction,
    Normalization,
    corrupt,
    corruption_plan,
    downsampled_target,
    masked_patch_loss,
    mean_color_target,
    patchify,
    quantize_colors,
)
from vit import create_model


def test_patchify_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    # patch 1 = rows 0-1, cols 2-3; pixel (0, 0) of it, channels r, g, b
    assert p[0, 1, :3].tolist() == [x[0, 0, 0, 2].item(), x[0, 1, 0, 2].item(), x[0, 2, 0, 2].item()]
    assert p[1, 5, -3:].tolist() == x[1, :, 3, 5].tolist()  # last pixel of the last patch


def test_three_bit_colour_on_known_images():
    img = torch.zeros(1, 3, 4, 8)
    img[:, 0, :, :4] = 1.0  # left patch pure red
    img[:, :, :, 4:] = 0.5  # right patch mid grey
    target = mean_color_target(img, 4)
    assert target.tolist() == [[7 * 64, 4 * 64 + 4 * 8 + 4]]
    assert quantize_colors(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.124, 0.126, 0.999]])).tolist() == \
        [0, 511, 0 * 64 + 1 * 8 + 7]
    half = torch.zeros(1, 3, 4, 4)
    half[:, 2, :2] = 1.0  # top half blue: the mean blue is 0.5
    assert mean_color_target(half, 4).item() == 4


def test_downsampled_target():
    img = torch.zeros(1, 3, 8, 8)
    img[:, 1, :4, :4] = 1.0  # the top-left quarter of the single 8x8 patch is green
    t = downsampled_target(img, 8)
    assert t.shape == (1, 1, 16)
    grid = t.view(4, 4)
    assert (grid[:2, :2] == 7 * 8).all() and (grid[2:, :] == 0).all() and (grid[:, 2:] == 0).all()


def test_corruption_proportions():
    g = torch.Generator().manual_seed(0)
    corrupted, to_mask, to_random = corruption_plan(400, 196, 0.5, 0.8, 0.1, g)
    assert (corrupted.sum(1) == 98).all()  # exactly half of every image
    assert not (to_mask & ~corrupted).any() and not (to_random & ~corrupted).any() and not (to_mask & to_random).any()
    n = corrupted.sum().item()
    for part, expected in ((to_mask, 0.8), (to_random, 0.1), (corrupted & ~to_mask & ~to_random, 0.1)):
        share = part.sum().item() / n
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_corrupt_replaces_with_mask_or_another_patch():
    emb = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1).expand(2, 5, 3).contiguous()
    to_mask = torch.tensor([[True, False, False, False, False]] * 2)
    to_random = torch.tensor([[False, True, True, True, True]] * 2)
    out = corrupt(emb, to_mask, to_random, torch.full((1, 1, 3), -1.0), torch.Generator().manual_seed(1))
    assert (out[:, 0] == -1).all()
    for b in range(2):
        for i in range(1, 5):
            v = out[b, i, 0].item()
            assert v != emb[b, i, 0].item() and v in emb[b, :, 0].tolist()  # another patch of the same image


def test_loss_only_on_corrupted_patches():
    preds = torch.randn(2, 6, 512, requires_grad=True)
    targets = torch.randint(0, 512, (2, 6))
    corrupted = torch.tensor([[True, False, True, False, False, False], [False] * 5 + [True]])
    loss, _ = masked_patch_loss(preds, targets, corrupted, "mean_color")
    loss.backward()
    assert (preds.grad[~corrupted] == 0).all() and (preds.grad[corrupted].abs().sum(-1) > 0).all()
    expected = torch.nn.functional.cross_entropy(preds[corrupted], targets[corrupted])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_mpp_objective_trains_end_to_end(target):
    torch.manual_seed(0)
    model = create_model("vit_ti8", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64, head="none")
    mpp = MaskedPatchPrediction(model, Normalization((0.5,) * 3, (0.5,) * 3), target)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16).clamp(-1, 1)}
    loss, metrics = mpp(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and mpp.mask_token.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_lr_schedule():
    assert lr_factor(0, 10, 100, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 0, 100, "constant") == 1.0


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = create_model("vit_ti16", image_size=32, depth=1, num_classes=3)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"pos_embed", "cls_token", "norm.weight", "head.bias"}
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}


def test_config_errors_name_the_key(tmp_path):
    base = ["data.train=x"]
    with pytest.raises(ConfigError, match="optim.lrr: unknown config key"):
        load_config(None, [*base, "optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.max_steps: expected int, got 'many'"):
        load_config(None, [*base, "train.max_steps=many"])
    with pytest.raises(ConfigError, match="objective.name: must be one of supervised, mpp"):
        load_config(None, [*base, "objective.name=mae"])
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(None, [])
    (tmp_path / "c.yaml").write_text("train:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="train.bogus: unknown config key"):
        load_config(tmp_path / "c.yaml", base)
    cfg = load_config(None, [*base, "optim.lr=1", "model.image_size=[32, 48]", "train.resume=none"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.model.image_size == [32, 48]


def test_interrupted_checkpoint_is_never_taken_as_complete(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "trainer.json").write_text("{}")
    (root / "step_00000020.tmp").mkdir()  # killed mid-write
    (root / "step_00000020.tmp" / "trainer.json").write_text("{}")
    (root / "step_00000030").mkdir()  # no trainer.json: incomplete
    assert latest_checkpoint(tmp_path) == root / "step_00000010"
