"""The bottom layer: seeds, image conventions, folder writes, one line + exit 2 for user errors."""

import os
import subprocess
import sys

import pytest
import torch

from common.errors import VitpipeError, exit_status
from common.images import INCEPTION_MEAN, INCEPTION_STD, image_pair, unnormalize
from common.io import fresh_tmp_dir, replace_dir
from common.seeding import seed_for

from .helpers import ROOT


def test_seed_for_is_the_same_in_every_process():
    code = "from common.seeding import seed_for; print(seed_for('shuffle', 0, 3, 1))"
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=str(h))).stdout.strip()
             for h in (1, 2)}
    assert seeds == {str(seed_for("shuffle", 0, 3, 1))}
    assert 0 <= seed_for("a") < 2**64 and seed_for("a") != seed_for("b") and seed_for(1, 2) != seed_for(2, 1)
    torch.Generator().manual_seed(max(seed_for(n) for n in range(64)))  # torch takes any 64-bit seed


def test_image_pair_and_unnormalize():
    assert image_pair(32) == (32, 32) and image_pair([32, 48]) == (32, 48) and image_pair((32.0, 48)) == (32, 48)
    x = torch.rand(2, 3, 4, 5)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(unnormalize(normalized, mean, std), x)
    assert unnormalize(normalized.double(), mean, std).dtype == torch.float64
    torch.testing.assert_close(unnormalize(torch.zeros(1, 3, 1, 1), INCEPTION_MEAN, INCEPTION_STD),
                               torch.full((1, 3, 1, 1), 0.5))


def test_a_folder_is_replaced_only_when_complete(tmp_path):
    final = tmp_path / "final"
    (final / "old").mkdir(parents=True)
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "final.tmp" / "left by a killed writer").write_text("")
    tmp = fresh_tmp_dir(final)
    assert tmp == tmp_path / "final.tmp" and not any(tmp.iterdir())
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights").write_text("new")
    assert (final / "old").is_dir()  # until the rename, readers see the old folder
    replace_dir(tmp, final)
    assert not tmp.exists() and (final / "sub" / "weights").read_text() == "new" and not (final / "old").exists()


def test_exit_status_is_one_line_for_user_errors_and_a_traceback_for_bugs(tmp_path, capsys):
    def bad_input():
        raise VitpipeError("data.train: x does not exist")

    assert exit_status("pretrain", bad_input) == 2
    assert capsys.readouterr().err == "pretrain: error: data.train: x does not exist\n"
    assert exit_status("vitpipe shard", lambda: open(tmp_path / "missing")) == 2
    assert capsys.readouterr().err == f"vitpipe shard: error: {tmp_path / 'missing'}: No such file or directory\n"
    assert exit_status("vitpipe verify", lambda: 1) == 1 and exit_status("pretrain", lambda: None) == 0

    def bug():
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        exit_status("pretrain", bug)


def test_registry_orders_by_priority_then_registration_and_names_the_known_on_a_miss():
    from common.registry import Registry

    reg = Registry("format", KeyError)
    reg.add("first", 1)
    reg.register("urgent", priority=5)(2)
    reg.add("second", 3)
    assert reg.names() == ["urgent", "first", "second"]
    assert reg.first(lambda v: v % 2 == 1) == ("first", 1)
    assert reg.first(lambda v: v > 9) is None
    assert "second" in reg and len(reg) == 3 and list(reg) == reg.names()
    with pytest.raises(KeyError, match="unknown format 'nope' \\(known: urgent, first, second\\)"):
        reg.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("first", 9)
