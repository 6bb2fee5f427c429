"""The learning-rate schedule and the optimizer's parameter groups."""

import pytest

from pretrain.optim import lr_factor, param_groups
from vit import create_model


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
