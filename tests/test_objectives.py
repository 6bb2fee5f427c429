import copy
import math

import numpy as np
import pytest
import torch

from pretrain.monitor import knn_predict, knn_top1
from pretrain.objectives import (
    OBJECTIVES,
    Normalization,
    Task,
    corrupt,
    corruption_plan,
    downsampled_target,
    mae_loss,
    masked_patch_loss,
    mean_color_target,
    options_for,
    patchify,
    quantize_colors,
    random_masking,
)
from vit import create_model
from vit.pos_embed import sincos_pos_embed_2d

from .corpus import pattern_images
from .helpers import randomize


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


def _options(name: str, **values):
    options = options_for(name)
    for k, v in values.items():
        setattr(options, k, v)
    return options


@pytest.mark.parametrize("name, values", [("mpp", {}), ("mpp", {"mpp_target": "downsampled", "color_bits": 1}),
                                          ("mpp", {"mpp_target": "pixels"}),
                                          ("mae", {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2})])
def test_self_supervised_objectives_learn_a_learnable_set(name, values):
    """60 AdamW steps on stripes / checkerboards: the loss of the last 10 steps is below 70% of the first 10."""
    torch.manual_seed(0)
    images, _ = pattern_images(32, size=16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    model = create_model("vit_ti4", image_size=16, depth=2, embed_dim=32, num_heads=2, mlp_dim=64, head="none")
    objective = OBJECTIVES[name](model, _options(name, **values), Normalization((0.5,) * 3, (0.5,) * 3))
    task = Task(model, objective)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        batch = x[torch.randperm(len(x), generator=g)[:32]]
        loss, metrics = task({"pixel_values": batch}, g)
        assert set(metrics) == set(objective.metrics)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_random_masking_keeps_exactly_a_quarter_and_restores_order():
    g = torch.Generator().manual_seed(0)
    keep, mask, restore = random_masking(5, 16, 0.75, g)
    assert keep.shape == (5, 4) and (mask.sum(1) == 12).all()
    for b in range(5):
        assert set(keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
        # [visible, masked] gathered with restore gives the patches back in their places
        order = torch.cat([keep[b], torch.nonzero(mask[b]).flatten()])
        assert set(order.tolist()) == set(range(16))
    visible_first = torch.cat([keep, torch.stack([torch.nonzero(m).flatten() for m in mask])], 1)
    assert (torch.gather(visible_first, 1, restore).sort(1).values == torch.arange(16)).all()
    assert random_masking(2, 9, 0.99)[0].shape == (2, 1)  # never an empty encoder input


def test_restore_puts_visible_tokens_back_in_place():
    g = torch.Generator().manual_seed(1)
    n = 9
    keep, mask, restore = random_masking(3, n, 0.5, g)
    ids = torch.arange(n).expand(3, n)
    visible = torch.gather(ids, 1, keep)
    filled = torch.cat([visible, torch.full((3, n - keep.shape[1]), -1)], 1)
    back = torch.gather(filled, 1, restore)
    assert ((back == ids) | (back == -1)).all() and ((back == -1) == (mask == 1)).all()


def test_mae_loss_on_masked_patches_only():
    pred = torch.randn(2, 4, 6, requires_grad=True)
    target = torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 1]])
    loss = mae_loss(pred, target, mask, norm_pix=False)
    loss.backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1].abs().sum(-1) > 0).all()
    torch.testing.assert_close(loss, (pred[mask == 1] - target[mask == 1]).pow(2).mean())
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(mae_loss(pred, target, mask), (pred[mask == 1] - normed[mask == 1]).pow(2).mean())


def _mae_reference_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py (get_2d_sincos_pos_embed), transcribed in numpy."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_pos_embed_matches_mae():
    ours = sincos_pos_embed_2d(32, (6, 6))
    np.testing.assert_allclose(ours.numpy(), _mae_reference_sincos(32, 6), atol=1e-6)
    assert sincos_pos_embed_2d(16, (2, 5)).shape == (10, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, (2, 2))


def test_encoding_a_subset_equals_encoding_those_patches_alone():
    torch.manual_seed(0)
    model = randomize(create_model("vit_ti4", image_size=16, depth=2, embed_dim=32, num_heads=2, mlp_dim=64,
                                   head="none"))
    x = torch.randn(2, 3, 16, 16)
    patches = model.embed(x)
    keep = torch.tensor([[3, 0, 9], [15, 7, 1]])
    subset = model.forward_tokens(patches, keep)
    for b in range(2):
        alone = copy.deepcopy(model)
        alone.pos_embed = torch.nn.Parameter(torch.cat([model.pos_embed[:, :1], model.pos_embed[:, 1 + keep[b]]], 1))
        torch.testing.assert_close(subset[b:b + 1], alone.forward_tokens(patches[b:b + 1, keep[b]]))
    torch.testing.assert_close(model.forward_tokens(patches, torch.arange(16).expand(2, 16)),
                               model.forward_tokens(patches))


def test_mae_checkpoint_holds_the_encoder_only():
    model = create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64, head="none")
    task = Task(model, OBJECTIVES["mae"](model, _options("mae", decoder_dim=16, decoder_depth=1, decoder_heads=2)))
    names = task.state_dict().keys()
    assert {k for k in names if k.startswith("model.")} == {f"model.{k}" for k in model.state_dict()}
    assert "objective.decoder_pos_embed" not in names  # fixed sin-cos: rebuilt, never saved


def test_knn_predict_matches_a_hand_computed_vote():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.2]])
    assert knn_predict(bank, labels, queries, 3, k=2).tolist() == [0, 1, 2]

    g = torch.Generator().manual_seed(0)
    bx, by, qx = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g), torch.randn(7, 4, generator=g)
    b, q = torch.nn.functional.normalize(bx, dim=1), torch.nn.functional.normalize(qx, dim=1)
    expected = []
    for row in q @ b.T:
        top = row.topk(5)
        votes = [sum(math.exp(s / 0.07) for s, i in zip(top.values.tolist(), top.indices.tolist()) if by[i] == c)
                 for c in range(3)]
        expected.append(max(range(3), key=votes.__getitem__))
    assert knn_predict(bx, by, qx, 3, k=5).tolist() == expected
    # leave-one-out never lets a sample vote for itself
    lonely = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    assert knn_top1((lonely, torch.tensor([0, 1, 1])), None, 2, k=1) == pytest.approx(2 / 3)


@pytest.mark.parametrize("name, values", [("mpp", {}), ("mae", {"decoder_dim": 16, "decoder_depth": 1,
                                                                 "decoder_heads": 2})])
def test_average_pooling_objectives_see_normalised_tokens_and_train_every_parameter(name, values):
    """Under global_pool=avg the final LayerNorm sits in fc_norm: MAE / MPP apply it per token (MAE's encoder
    normalises every token), so every parameter gets a gradient (DDP refuses unused ones)."""
    torch.manual_seed(0)
    model = randomize(create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64,
                                   head="none", global_pool="avg"))
    objective = OBJECTIVES[name](model, _options(name, **values), Normalization((0.5,) * 3, (0.5,) * 3))
    seen = []
    target = objective.decoder_embed if name == "mae" else objective.head
    target.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    loss, _ = Task(model, objective)({"pixel_values": torch.randn(2, 3, 16, 16)}, torch.Generator().manual_seed(0))
    loss.backward()
    assert [n for n, p in Task(model, objective).named_parameters() if p.grad is None] == []
    standardised = (seen[0] - model.fc_norm.bias) / model.fc_norm.weight  # undo the affine part
    torch.testing.assert_close(standardised.mean(-1), torch.zeros(standardised.shape[:-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardised.var(-1, unbiased=False), torch.ones(standardised.shape[:-1]),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("name, key, ratio", [("mae", "mask_ratio", 0.01), ("mae", "mask_ratio", 0.0),
                                              ("mpp", "corrupt_ratio", 0.01)])
def test_a_ratio_that_selects_no_patch_is_refused_naming_key_and_patch_count(name, key, ratio):
    from common.errors import VitpipeError

    model = create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64, head="none")
    options = _options(name, **{key: ratio}, **({"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}
                                                 if name == "mae" else {}))
    with pytest.raises(VitpipeError, match=rf"^objective\.{key}: {ratio} \w+ 0 of the 16 patches \(4x4 grid\)"):
        OBJECTIVES[name](model, options, Normalization((0.5,) * 3, (0.5,) * 3))
    setattr(options, key, 0.04)  # round(0.64) = 1 patch: a finite loss
    loss, _ = Task(model, OBJECTIVES[name](model, options, Normalization((0.5,) * 3, (0.5,) * 3)))(
        {"pixel_values": torch.randn(2, 3, 16, 16)}, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_multilabel_bce_sums_over_classes_and_averages_over_the_batch_as_big_vision():
    """big_vision's sigmoid_xent: -mean_b sum_c [y log p + (1 - y) log(1 - p)]; here by hand for 2 x 3 logits."""
    from pretrain.objectives.supervised import Supervised, SupervisedOptions

    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 3.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    p = torch.sigmoid(logits)
    by_hand = -(target * p.log() + (1 - target) * (1 - p).log()).sum() / 2
    model = create_model("vit_ti4", image_size=8, depth=1, embed_dim=16, num_heads=2, mlp_dim=32, num_classes=3,
                         head="linear")
    model.forward = lambda x: logits  # the objective's arithmetic alone
    loss, _ = Supervised(model, SupervisedOptions(multilabel=True))(model, {"pixel_values": torch.zeros(2, 3, 8, 8),
                                                                            "labels": target})
    torch.testing.assert_close(loss, by_hand)
    assert loss.item() > 2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
