import pytest
import torch

from vit import VisionTransformer, ViTConfig, config_for, create_model
from vit.model import drop_path

from .helpers import randomize


@pytest.mark.parametrize("name,params", [("vit_ti16", 5.7e6), ("vit_s16", 22.0e6), ("vit_b16", 86.6e6), ("vit_b32", 88.2e6)])
def test_named_sizes_match_the_paper_and_timm(name, params):
    timm = pytest.importorskip("timm")
    ours = create_model(name, num_classes=1000)
    n = sum(p.numel() for p in ours.parameters())
    assert abs(n - params) / params < 0.01
    size = {"ti": "tiny", "s": "small", "b": "base"}[name[4:-2]]
    theirs = timm.create_model(f"vit_{size}_patch{name[-2:]}_224", pretrained=False)
    assert n == sum(p.numel() for p in theirs.parameters())


def test_large_and_huge_configs():
    assert (config_for("vit_l16").embed_dim, config_for("vit_l16").depth, config_for("vit_l16").num_heads) == (1024, 24, 16)
    h = config_for("vit_h14")
    assert (h.embed_dim, h.depth, h.num_heads, h.mlp_dim, h.patch_size) == (1280, 32, 16, 5120, 14)
    assert config_for("vit_b8").grid_size == (28, 28)


@pytest.mark.parametrize("name,size", [("vit_ti8", 64), ("vit_ti14", (56, 84)), ("vit_ti32", (64, 128))])
def test_any_patch_and_non_square_sizes(name, size):
    m = create_model(name, image_size=size, num_classes=7, depth=2).eval()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, h, w)
    assert m(x).shape == (2, 7)
    assert m.forward_features(x).shape == (2, 1 + m.cfg.num_patches, 192)


def test_bad_sizes_fail_clearly():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        create_model("vit_ti16", image_size=100)
    with pytest.raises(ValueError, match="unknown architecture 'vit_x16'"):
        create_model("vit_x16")
    m = create_model("vit_ti16", image_size=32, depth=1)
    with pytest.raises(ValueError, match="input is 48x48 but the model expects 32x32"):
        m(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("old,new,mode", [((32, 32), (48, 64), "bicubic"), ((48, 32), (24, 40), "bicubic"),
                                          ((32, 32), (64, 40), "bilinear")])
def test_set_image_size_resamples_like_timm(old, new, mode):
    timm = pytest.importorskip("timm")
    ours = randomize(create_model("vit_ti8", image_size=old, depth=2, num_classes=5))
    before = ours.pos_embed.detach().clone()
    ours.set_image_size(list(new), mode)
    assert ours.cfg.image_size == new and ours.cfg.grid_size == (new[0] // 8, new[1] // 8)
    theirs = timm.layers.resample_abs_pos_embed(before, list(ours.cfg.grid_size), [old[0] // 8, old[1] // 8],
                                                num_prefix_tokens=1, interpolation=mode, antialias=True)
    torch.testing.assert_close(ours.pos_embed.detach(), theirs, rtol=0, atol=1e-5)
    assert ours.pos_embed.requires_grad and dict(ours.named_parameters())["pos_embed"] is ours.pos_embed
    assert ours(torch.randn(2, 3, *new)).shape == (2, 5)


def test_set_image_size_equals_timms_model_at_the_new_size():
    timm = pytest.importorskip("timm")
    ours = randomize(create_model("vit_ti8", image_size=32, depth=2, num_classes=5))
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, img_size=32, depth=2,
                               num_classes=5).eval()
    theirs.load_state_dict(ours.state_dict())
    ours.set_image_size((40, 56))
    theirs.set_input_size(img_size=(40, 56))
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="image size 40x50 is not divisible by the patch size 8"):
        ours.set_image_size((40, 50))
    assert ours.cfg.image_size == (40, 56)


def test_init_follows_the_paper():
    m = create_model("vit_s16", num_classes=10)
    assert torch.count_nonzero(m.cls_token) == 0
    assert 0.018 < m.pos_embed.std().item() < 0.022
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    p = create_model("vit_ti16", num_classes=10, head="pretrain")
    assert isinstance(p.pre_logits.act, torch.nn.Tanh)
    assert torch.count_nonzero(p.head.weight) == 0 and torch.count_nonzero(p.head.bias) == 0
    assert torch.count_nonzero(p.pre_logits.fc.weight) > 0  # a zero hidden layer could never learn


def test_pretrain_head_learns_from_zero_output_layer():
    torch.manual_seed(0)
    m = create_model("vit_ti16", image_size=32, depth=1, num_classes=3, head="pretrain")
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    assert torch.count_nonzero(m.head.weight) > 0


def test_reset_head_swaps_to_zero_linear():
    m = randomize(create_model("vit_ti16", image_size=32, depth=1, num_classes=3, head="pretrain"))
    m.reset_head(num_classes=5, head="linear")
    assert isinstance(m.pre_logits, torch.nn.Identity)
    assert m.head.weight.shape == (5, 192) and torch.count_nonzero(m.head.weight) == 0
    assert torch.count_nonzero(m(torch.randn(2, 3, 32, 32))) == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = randomize(create_model("vit_ti16", image_size=32, depth=3, num_classes=4)).train()
    x = torch.randn(4, 3, 32, 32)
    m(x).square().sum().backward()
    plain = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).square().sum().backward()
    for a, p in zip(plain, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_stochastic_depth_only_in_training():
    x = torch.ones(1000, 4, 8)
    out = drop_path(x, 0.25, training=True)
    kept = (out[:, 0, 0] != 0).float().mean().item()
    assert 0.68 < kept < 0.82
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.75))
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    cfg = ViTConfig(image_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2, mlp_dim=128, drop_path_rate=0.3)
    rates = [b.drop_path_rate for b in VisionTransformer(cfg).blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)


def test_global_average_pooling():
    m = randomize(create_model("vit_ti16", image_size=32, depth=1, num_classes=3, global_pool="avg"))
    tokens = m.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), m.fc_norm(tokens[:, 1:].mean(1)))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown model config key.*colour"):
        ViTConfig.from_dict({"colour": 1})


def test_sincos_position_embeddings_are_a_saved_fixed_table_recomputed_at_a_new_grid(tmp_path):
    from vit import ModelInfo, load_model, save_checkpoint
    from vit.pos_embed import sincos_position_table

    model = create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64, num_classes=3,
                         pos_embed="sincos")
    assert "pos_embed" not in dict(model.named_parameters())  # never trained: no optimizer sees it
    assert torch.equal(model.state_dict()["pos_embed"], sincos_position_table(32, (4, 4)))
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))  # the class token's position, as MAE
    save_checkpoint(model, tmp_path / "ckpt", ModelInfo())
    back, _ = load_model(tmp_path / "ckpt")
    assert back.cfg.pos_embed == "sincos" and "pos_embed" not in dict(back.named_parameters())
    back.set_image_size(24, interpolation="bilinear")  # recomputed, not interpolated
    assert torch.equal(back.pos_embed, sincos_position_table(32, (6, 6)))
    back.set_pos_embed("learned")  # what MAE's fine-tuning does: the table, trained from here on
    assert isinstance(back.pos_embed, torch.nn.Parameter) and torch.equal(back.pos_embed.detach(),
                                                                          sincos_position_table(32, (6, 6)))
    with pytest.raises(ValueError, match="divisible by 4"):
        create_model("vit_ti4", image_size=16, depth=1, embed_dim=30, num_heads=2, mlp_dim=64, pos_embed="sincos")
