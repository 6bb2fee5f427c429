"""The loop's steps in-process, without a launch: where the data stream resumes, what a log window averages."""

from functools import partial
from itertools import islice
from types import SimpleNamespace

import torch

from data_tools.loader import resolve_shards, train_loader
from data_tools.transforms import EvalTransform
from pretrain.checkpoints import Position
from pretrain.loop import micro_batches
from pretrain.metrics import Window


def test_the_stream_resumed_at_a_saved_position_goes_on_with_the_same_batches(shards):
    # 64 samples, 8 a batch: 8 batches an epoch; 11 of them cross into epoch 1
    batches = partial(train_loader, resolve_shards(shards), EvalTransform(16), 8, seed=3, shuffle_buffer=16)
    whole = list(islice(micro_batches(SimpleNamespace(pos=Position(), batches=batches), {}), 11))
    assert [after for _, after in whole] == [(0, i) for i in range(1, 8)] + [(1, 0), (1, 1), (1, 2), (1, 3)]
    for done in (5, 8, 9):  # mid-epoch, at the epoch's end, just past it
        epoch, batch = whole[done - 1][1]
        run = SimpleNamespace(pos=Position(done, epoch, batch), batches=batches)
        resumed = islice(micro_batches(run, None), 11 - done)  # None: replay (a checkpoint without loader state)
        for (ours, after), (theirs, expected) in zip(resumed, whole[done:], strict=True):
            assert after == expected and torch.equal(ours["images"], theirs["images"])
            assert torch.equal(ours["labels"], theirs["labels"])


def test_a_window_averages_its_steps_and_starts_afresh():
    window = Window(("loss", "accuracy"))
    window.add([2.0, 0.5])
    window.add([4.0, 1.0])
    window.skipped += 3
    assert window.steps == 2 and window.sums == {"loss": 6.0, "accuracy": 1.5} and window.skipped == 3
    window.reset()
    assert window.steps == 0 and window.sums == {"loss": 0.0, "accuracy": 0.0} and window.skipped == 0
