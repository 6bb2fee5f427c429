"""Stage configs: typed keys, overrides and files, errors that name the key."""

import math
import subprocess
import sys

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.config_help import config_text
from pretrain.objective_options import OBJECTIVE_OPTIONS

KNOWN = ", ".join(sorted(OBJECTIVE_OPTIONS))


def test_config_errors_name_the_key(tmp_path):
    base = ["data.train=x"]
    with pytest.raises(ConfigError, match="optim.lrr: unknown config key"):
        load_config(None, [*base, "optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.max_steps: expected int or null, got 'many'"):
        load_config(None, [*base, "train.max_steps=many"])
    with pytest.raises(ConfigError, match=rf"objective.name: unknown objective 'simclr' \(known: {KNOWN}\)"):
        load_config(None, [*base, "objective.name=simclr"])
    with pytest.raises(ConfigError, match="objective.mask_ratio: unknown config key for objective mpp"):
        load_config(None, [*base, "objective.name=mpp", "objective.mask_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"objective.mask_ratio: must be in \[0, 1\)"):
        load_config(None, [*base, "objective.name=mae", "objective.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match="objective.color_bits: must be in"):
        load_config(None, [*base, "objective.name=mpp", "objective.color_bits=0"])
    mae = load_config(None, [*base, "objective.name=mae", "objective.decoder_depth=2"])
    assert mae.objective.decoder_depth == 2 and mae.objective.mask_ratio == 0.75
    # a file's objective section belongs to its objective: switching on the command line replaces it
    (tmp_path / "mpp.yaml").write_text("objective:\n  name: mpp\n  color_bits: 2\n")
    switched = load_config(tmp_path / "mpp.yaml", [*base, "objective.decoder_dim=64", "objective.name=mae"])
    assert switched.objective.name == "mae" and switched.objective.decoder_dim == 64
    assert load_config(tmp_path / "mpp.yaml", base).objective.color_bits == 2
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(None, [])
    (tmp_path / "c.yaml").write_text("train:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="train.bogus: unknown config key"):
        load_config(tmp_path / "c.yaml", base)
    cfg = load_config(None, [*base, "optim.lr=1", "model.image_size=[32, 48]", "train.resume=none"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.model.image_size == [32, 48]


def test_unknown_objective_is_one_line_and_exit_2(capsys):
    from pretrain.run import main

    assert main(["data.train=x", "objective.name=simclr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pretrain: error: objective.name: unknown objective 'simclr' (known: {KNOWN})"]


def test_a_bare_yaml_no_is_the_word_where_the_key_takes_words(tmp_path):
    """YAML 1.1 reads a bare `no` as false: the README's train.mixed_precision=no must still mean "no"."""
    base = ["data.train=x"]
    assert load_config(None, [*base, "train.mixed_precision=no"]).train.mixed_precision == "no"
    (tmp_path / "p.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "p.yaml", base).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision: must be one of no, bf16, fp16; got True"):
        load_config(None, [*base, "train.mixed_precision=yes"])


def test_loading_a_config_imports_no_torch():
    code = "import sys, pretrain.config, pretrain.config_help; print(sorted(m for m in ('torch', 'vit') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("name", OBJECTIVE_OPTIONS.names())
def test_every_registered_objective_round_trips_through_the_loader(name, tmp_path):
    """Its options are the section objective.name picks, under the name it is registered as, and the
    resolved config (--print-config) loads back to the same config."""
    options = OBJECTIVE_OPTIONS.get(name)
    assert options().name == name
    cfg = load_config(None, ["data.train=x", f"objective.name={name}"])
    assert type(cfg.objective) is options and cfg.objective == options()
    (tmp_path / "resolved.yaml").write_text(config_text(cfg, "pretrain"))
    assert load_config(tmp_path / "resolved.yaml", stage="pretrain").to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match=f"objective.bogus: unknown config key for objective {name}"):
        load_config(None, ["data.train=x", f"objective.name={name}", "objective.bogus=1"])


@pytest.mark.parametrize("name", OBJECTIVE_OPTIONS.names())
def test_every_registered_objective_builds_on_a_tiny_model_and_gives_a_finite_loss(name):
    import torch

    from pretrain.objectives import OBJECTIVES, Normalization, Task
    from vit import create_model

    torch.manual_seed(0)
    model = create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64, num_classes=3)
    objective = OBJECTIVES[name](model, OBJECTIVE_OPTIONS.get(name)(), Normalization((0.5,) * 3, (0.5,) * 3))
    assert objective.Options is OBJECTIVE_OPTIONS.get(name)
    batch = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])}
    loss, metrics = Task(model, objective)(batch, torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and set(metrics) == set(objective.metrics)
    loss.backward()
