"""uint8 batches normalised on the device, the GPU-decode path (run on the CPU where no GPU is), bf16 on the CPU."""

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from data_tools.loader import resolve_shards, train_loader
from data_tools.shard import ShardOptions, shard
from data_tools.transforms import (
    BatchBuilder,
    EvalTransform,
    GpuTrainTransform,
    JpegCrop,
    TrainTransform,
    draw_train_crop,
    normalize,
)
from pretrain import loop
from pretrain.config import ConfigError, load_config
from pretrain.loop import train_transform
from pretrain.resume_checks import config_changes

from .corpus import photo_crops, write_folder
from .helpers import pretrain_cmd


def jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    """``img`` as the loader opens a sample: JPEG bytes, opened, not decoded."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_normalising_on_the_device_gives_what_the_workers_used_to_hand_over():
    """The float path the workers ran per sample before, bit for bit: resumed runs and published results hold."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = EvalTransform(24, mean, std)
    images = [transform(jpeg(img)) for img in photo_crops(3, min_side=40, max_side=90)]

    def worker_side_before(pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        return x.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))

    builder = BatchBuilder(4)
    for i, pixels in enumerate(images):
        builder.add(pixels, i)
    batch = builder.take(skipped=0)
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (3, 24, 24, 3)
    assert torch.equal(normalize(batch["images"], mean, std), torch.stack([worker_side_before(p) for p in images]))
    on_device = transform.to_device(batch, "cpu")
    assert set(on_device) == {"pixel_values", "labels"} and on_device["pixel_values"].is_contiguous()


def test_a_flip_is_the_mirror_of_the_same_crop():
    img = photo_crops(1, min_side=200, max_side=201)[0]
    flips, plain = TrainTransform(32, scale=(0.3, 1.0)), TrainTransform(32, scale=(0.3, 1.0), flip=False)
    pairs = [(flips(jpeg(img), random.Random(s)), plain(jpeg(img), random.Random(s))) for s in range(20)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in pairs]
    assert any(mirrored) and not all(mirrored)
    assert all(m or np.array_equal(a, b) for m, (a, b) in zip(mirrored, pairs))


def test_gpu_decode_without_cuda_is_one_line_naming_the_key(shards, run_here, tmp_path):
    cfg = load_config(None, [f"data.train={shards}", "data.decode=gpu"])
    with pytest.raises(ConfigError, match=r"^data.decode=gpu: needs a CUDA device \(this process trains on cpu\)"):
        train_transform(cfg, 16, torch.device("cpu"))
    res = run_here(pretrain_cmd(f"data.train={shards}", "data.decode=gpu", f"train.output_dir={tmp_path / 'run'}"))
    assert res.returncode != 0
    assert [line for line in res.stderr.splitlines() if line.strip()] == \
        ["pretrain: error: data.decode=gpu: needs a CUDA device (this process trains on cpu); use data.decode=cpu"]


def test_cpu_and_gpu_decode_draw_the_same_crops_and_agree_on_the_pixels():
    """The GPU path's worker side draws what the CPU path draws, from the same generator; its device side
    (run here on the CPU) crops those boxes of the full-size image, as the CPU path crops them of the
    draft-decoded one: the images agree up to the two resamplers' differences."""
    photos = photo_crops(12, seed=4, min_side=120, max_side=400)
    cpu, gpu = TrainTransform(48), GpuTrainTransform(48)
    cpu_batch, gpu_batch = BatchBuilder(len(photos)), BatchBuilder(len(photos))
    for i, img in enumerate(photos):
        crop = gpu(jpeg(img), random.Random(i))
        assert isinstance(crop, JpegCrop)
        drawn = draw_train_crop(img.width, img.height, (48, 48), random.Random(i), cpu.scale, cpu.flip)
        assert (crop.box, crop.flip) == drawn
        cpu_batch.add(cpu(jpeg(img), random.Random(i)), i)
        gpu_batch.add(crop, i)
    on_gpu_path = gpu.to_device(gpu_batch.take(0), "cpu")
    on_cpu_path = cpu.to_device(cpu_batch.take(0), "cpu")
    assert torch.equal(on_gpu_path["labels"], on_cpu_path["labels"])
    a, b = on_gpu_path["pixel_values"], on_cpu_path["pixel_values"]
    assert a.shape == b.shape == (12, 3, 48, 48)
    same = (a - b).abs().mean(dim=(1, 2, 3))
    mirrored = (a - b.flip(-1)).abs().mean(dim=(1, 2, 3))
    # pixels in [-1, 1]: under 5% of the range per image (PIL's bicubic is a=-0.5, torch's a=-0.75; the CPU
    # path decodes large crops at a reduced DCT scale), and each the right way round
    assert same.max() < 0.1, same
    assert (same < mirrored / 3).all(), (same, mirrored)


def test_gpu_decode_batches_carry_jpeg_bytes_and_decode_other_images_in_the_worker(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for i, img in enumerate(photo_crops(8, min_side=40, max_side=80)):
        img.save(src / (f"{i}.png" if i % 4 == 0 else f"{i}.jpg"), **({} if i % 4 == 0 else {"quality": 90}))
    shard(str(tmp_path / "src"), tmp_path / "shards", ShardOptions(samples_per_shard=8), progress=False)
    shards = resolve_shards(tmp_path / "shards")
    (batch,) = train_loader(shards, GpuTrainTransform(16), 8, shuffle_buffer=1, workers=1)
    assert len(batch["jpeg_rows"]) == 6 and batch["images"].shape == (8, 16, 16, 3)
    (same,) = train_loader(shards, TrainTransform(16), 8, shuffle_buffer=1, workers=1)
    png_rows = sorted(set(range(8)) - set(batch["jpeg_rows"].tolist()))
    assert torch.equal(batch["images"][png_rows], same["images"][png_rows])  # decoded here, as on the CPU path
    x = GpuTrainTransform(16).to_device(batch, "cpu")["pixel_values"]
    assert x.shape == (8, 3, 16, 16) and (x - TrainTransform(16).to_device(same, "cpu")["pixel_values"]).abs().mean() < 0.1


def test_bf16_autocast_on_the_cpu_trains_close_to_fp32(shards, run_here, tmp_path):
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        res = run_here(pretrain_cmd(f"data.train={shards}", f"train.mixed_precision={precision}", "train.max_steps=4",
                                    "train.log_every=1", "train.checkpoint_every=4", "data.workers=0",
                                    f"train.output_dir={out}"))
        assert res.returncode == 0, res.stderr[-2000:]
        losses[precision] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["bf16"]) == 4 and all(np.isfinite(losses["bf16"]))
    assert losses["bf16"] != losses["no"]  # it did run in bf16
    np.testing.assert_allclose(losses["bf16"], losses["no"], rtol=0.05)


def test_a_checkpoint_from_before_the_filter_and_decode_keys_means_bicubic_and_cpu_decode(shards):
    cfg = load_config(None, [f"data.train={shards}"])
    assert (cfg.data.resize_filter, cfg.data.decode) == ("bilinear", "cpu")  # the defaults since 2026-12-05
    recorded = cfg.to_dict()
    del recorded["data"]["resize_filter"], recorded["data"]["decode"]
    assert config_changes(recorded, cfg.to_dict()) == ['data.resize_filter ("bicubic", now "bilinear")']
    cfg.data.resize_filter = "bicubic"  # what those runs used: they resume with it
    assert config_changes(recorded, cfg.to_dict()) == []
    cfg.data.decode = "gpu"
    assert config_changes(recorded, cfg.to_dict()) == ['data.decode ("cpu", now "gpu")']


def broken_jpeg(img: Image.Image) -> bytes:
    """A JPEG whose header reads (a worker draws its crop) but whose first component names a quantization table
    the file does not define: every decoder refuses it."""
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return broken(b.getvalue())


def broken(data: bytes) -> bytes:
    """``broken_jpeg`` of a baseline JPEG's bytes, at their length."""
    at = data.index(b"\xff\xc0") + 11  # SOF0: marker, length, precision, height, width, count, id, sampling
    return data[:at] + b"\x03" + data[at + 1:]


def test_gpu_decode_skips_and_lists_a_broken_jpeg_and_keeps_the_rest_of_its_batch(caplog):
    """One JPEG of the batch does not decode: the batched decode fails, each is decoded alone, the broken one
    leaves the batch (logged and listed, as the CPU path skips one), the others are those of a batch without it.
    torchvision's CPU decode_jpeg stands in for nvJPEG: the same call, on a list, on another device."""
    photos = photo_crops(3, seed=5, min_side=60, max_side=120)
    gpu = GpuTrainTransform(24)
    crops = [gpu(jpeg(img), random.Random(i)) for i, img in enumerate(photos)]
    bad = JpegCrop(broken_jpeg(photos[1]), crops[1].box, crops[1].flip)
    assert Image.open(io.BytesIO(bad.data)).size == photos[1].size
    with pytest.raises(RuntimeError):
        decode_jpeg([torch.frombuffer(bytearray(c.data), dtype=torch.uint8) for c in (crops[0], bad)])

    def batch_of(items):
        builder = BatchBuilder(len(items))
        for label, crop in items:
            builder.add(crop, label)
        batch = builder.take(0)
        batch["keys"] = [f"shard-000000/{label}" for label, _ in items]
        return batch

    out = gpu.to_device(batch_of([(0, crops[0]), (1, bad), (2, crops[2])]), "cpu")
    clean = gpu.to_device(batch_of([(0, crops[0]), (2, crops[2])]), "cpu")
    assert out["undecodable"] == ["shard-000000/1"] and clean["undecodable"] == []
    assert out["labels"].tolist() == [0, 2] and out["keys"] == ["shard-000000/0", "shard-000000/2"]
    assert torch.equal(out["pixel_values"], clean["pixel_values"]) and out["pixel_values"].shape == (2, 3, 24, 24)
    assert "skipping a sample that does not decode: shard-000000/1" in caplog.text


def shards_with_a_broken_jpeg(tmp_path) -> tuple[Path, str]:
    """16 JPEGs in one shard, the 6th broken in place (``broken``), its index's sha256 updated; and its sample key
    as training names it (``shard name/key``)."""
    write_folder(tmp_path / "src", {"a": 8, "b": 8}, size=(40, 56))
    folder = tmp_path / "shards"
    shard(str(tmp_path / "src"), folder, ShardOptions(samples_per_shard=16), progress=False)
    index = json.loads((folder / "index.json").read_text())
    tar_path = folder / index["shards"][0]["name"]
    with tarfile.open(tar_path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][5]
    data = tar_path.read_bytes()
    start, end = member.offset_data, member.offset_data + member.size
    tar_path.write_bytes(data[:start] + broken(data[start:end]) + data[end:])
    index["shards"][0]["sha256"] = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    (folder / "index.json").write_text(json.dumps(index))
    return folder, f"{tar_path.name}/{member.name.removesuffix('.jpg')}"


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_broken_jpeg_counts_in_skipped_samples_on_either_decode_path(decode, tmp_path, run_here, monkeypatch,
                                                                       caplog):
    """The CPU path skips a JPEG that does not decode in the worker; the GPU path only on the device, after the
    worker handed its bytes over. Either way the metrics line counts it. torchvision's CPU decode_jpeg stands in
    for nvJPEG: ``train_transform`` is told the device is CUDA, the batches still go to the CPU."""
    shards, broken_key = shards_with_a_broken_jpeg(tmp_path)
    real = train_transform
    monkeypatch.setattr(loop, "train_transform", lambda cfg, size, device: real(cfg, size, torch.device("cuda")))
    out = tmp_path / "run"
    res = run_here(pretrain_cmd(f"data.train={shards}", f"data.decode={decode}", "data.batch_size=8",
                                "train.max_steps=2", "train.log_every=2", "train.checkpoint_every=2",
                                "data.workers=0", "data.record_keys=true", f"train.output_dir={out}"))
    assert res.returncode == 0, res.stderr[-2000:]
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # one epoch, one line
    assert line["skipped_samples"] == 1
    (warning,) = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    trained = [k for r in map(json.loads, (out / "samples" / "rank0.jsonl").read_text().splitlines())
               for k in r["keys"]]
    assert len(set(trained)) == 15 and broken_key not in trained  # the others trained on, once each
    shard_name, key = broken_key.split("/")
    assert key in warning and shard_name in warning  # the sample is named, not its row in the batch
