from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from dinodet.data import (
    Batch,
    CocoDetection,
    EpochSampler,
    SkippedImage,
    TransformConfig,
    build_loader,
    build_transforms,
    collate_fn,
    make_synthetic_coco,
)


def _sample(h: int, w: int, n: int, image_id: int):
    target = {
        "labels": torch.arange(n),
        "boxes": torch.full((n, 4), 0.5),
        "image_id": image_id,
        "orig_size": torch.tensor([h, w]),
        "size": torch.tensor([h, w]),
    }
    return torch.rand(3, h, w), target


def test_collate_pads_and_masks():
    samples = [_sample(20, 30, 2, 1), SkippedImage("x.jpg", "broken"), _sample(25, 10, 0, 2)]
    batch = collate_fn(samples)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.skipped == ["x.jpg"]
    assert batch.images.tensors.shape == (2, 3, 25, 30)
    assert batch.images.mask.shape == (2, 25, 30)
    assert batch.images.image_sizes == [(20, 30), (25, 10)]
    torch.testing.assert_close(batch.images.tensors[0, :, :20, :30], samples[0][0])
    assert (batch.images.tensors[0, :, 20:] == 0).all() and batch.images.mask[0, 20:].all()
    assert not batch.images.mask[1, :, :10].any() and batch.images.mask[1, :, 10:].all()
    assert [t["image_id"] for t in batch.targets] == [1, 2]

    moved = batch.to("cpu")
    assert moved.targets[0]["boxes"].device.type == "cpu" and moved.skipped == ["x.jpg"]


def test_collate_all_skipped_gives_an_empty_batch():
    batch = collate_fn([SkippedImage("a.jpg", "r"), None, SkippedImage("b.jpg", "r")])
    assert len(batch) == 0 and batch.targets == []
    assert batch.skipped == ["a.jpg", "b.jpg"]
    assert batch.images.tensors.shape[0] == 0 and batch.images.mask.shape[0] == 0
    assert len(batch.to("cpu")) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pin_memory():
    batch = collate_fn([_sample(8, 8, 1, 1)]).pin_memory()
    assert batch.images.tensors.is_pinned() and batch.targets[0]["boxes"].is_pinned()


SMALL = TransformConfig(
    scales=(40, 48, 56), max_size=96, crop_resize_scales=(48,), crop_min=24, crop_max=48,
    eval_size=48,
)


@pytest.fixture(scope="module")
def loader_data(tmp_path_factory):
    """7 synthetic 48x64 images plus one corrupt file (image id 0, the first)."""
    root = tmp_path_factory.mktemp("loader")
    paths = make_synthetic_coco(root, num_train=7, num_val=0, image_size=(48, 64), seed=3)
    data = json.loads(paths["train_ann"].read_text())
    data["images"].append({"id": 0, "file_name": "corrupt.jpg"})
    (paths["train_images"] / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    paths["train_ann"].write_text(json.dumps(data))
    return paths


def _dataset(paths, train: bool) -> CocoDetection:
    return CocoDetection(
        paths["train_ann"], paths["train_images"], transforms=build_transforms(train, SMALL)
    )


def _flatten(loader: DataLoader):
    out = []
    for batch in loader:
        out.append(([t["image_id"] for t in batch.targets], batch.images.tensors,
                    [t["boxes"] for t in batch.targets], batch.skipped))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ids_a, im_a, box_a, sk_a), (ids_b, im_b, box_b, sk_b) in zip(a, b):
        assert ids_a == ids_b and sk_a == sk_b
        torch.testing.assert_close(im_a, im_b)
        for x, y in zip(box_a, box_b):
            torch.testing.assert_close(x, y)


@pytest.mark.filterwarnings("ignore::dinodet.data.SkippedImageWarning")
def test_workers_match_main_process_and_count_skipped(loader_data):
    ds = _dataset(loader_data, train=False)
    single = _flatten(build_loader(ds, batch_size=3, train=False, num_workers=0))
    multi = _flatten(build_loader(ds, batch_size=3, train=False, num_workers=2))
    _assert_same(single, multi)
    assert [len(ids) + len(sk) for ids, _, _, sk in multi] == [3, 3, 2]
    assert sum(len(sk) for *_, sk in multi) == 1
    assert multi[0][3][0].endswith("corrupt.jpg")


@pytest.mark.filterwarnings("ignore::dinodet.data.SkippedImageWarning")
def test_training_loader_is_reproducible_for_a_seed(loader_data):
    ds = _dataset(loader_data, train=True)
    first = _flatten(build_loader(ds, batch_size=2, train=True, num_workers=2, seed=0))
    again = _flatten(build_loader(ds, batch_size=2, train=True, num_workers=2, seed=0))
    _assert_same(first, again)
    assert len(first) == 4  # 8 samples, drop_last
    other = _flatten(build_loader(ds, batch_size=2, train=True, num_workers=2, seed=1))
    assert [ids for ids, *_ in other] != [ids for ids, *_ in first]


def test_a_resumed_epoch_skips_the_same_samples_on_any_number_of_ranks():
    """The skip counts samples of the epoch's order, all ranks together: 6 done by 2 ranks
    then 3 ranks (or 1) share out exactly the 14 that are left, none twice."""
    full = list(EpochSampler(20, True, seed=3, world=1))
    ranks = [EpochSampler(20, True, seed=3, rank=r, world=2, drop_last=True) for r in range(2)]
    first = [i for s in ranks for i in list(s)[:3]]
    assert sorted(first) == sorted(full[:6])
    for world in (1, 2, 3):
        rest = []
        for r in range(world):
            s = EpochSampler(20, True, seed=3, rank=r, world=world, drop_last=True)
            s.set_epoch(0, skip=6)
            rest += list(s)
        expected = full[6:]
        assert sorted(rest) == sorted(expected[: len(expected) - len(expected) % world])
        assert not set(rest) & set(first)
