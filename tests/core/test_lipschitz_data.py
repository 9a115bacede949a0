"""The tinyimagenet data set, read from a small folder in Tiny ImageNet 200's layout that the test
writes itself, and the models of issue 5 on its shape."""
import numpy as np
import pytest
import torch
from PIL import Image

from workers.core.data import DataFormatError, DataNotFound, dataset_info, load_split
from workers.core.models import check_model_fits

WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted: labels follow the sorted order


def write_tiny(root, grayscale_one=True):
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            array = np.full((64, 64, 3), 40 * k + i, dtype=np.uint8)
            Image.fromarray(array).save(images / f"{wnid}_{i}.JPEG", quality=100)
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        array = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        mode = "L" if grayscale_one and i == 0 else None
        image = Image.fromarray(array if mode else np.stack([array] * 3, axis=-1))
        image.save(folder / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tinyimagenet_reads_the_standard_layout(tmp_path):
    write_tiny(tmp_path)
    x, y = load_split("tinyimagenet", "train", tmp_path)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1, 2, 2]  # classes in sorted order: n01, n02, n03
    assert abs(float(x[2].mean()) - 0 / 255) < 2 / 255 and abs(float(x[0].mean()) - 40 / 255) < 2 / 255
    xt, yt = load_split("tinyimagenet", "test", tmp_path)
    assert xt.shape == (4, 3, 64, 64) and yt.tolist() == [2, 0, 1, 0]
    assert torch.equal(xt[0, 0], xt[0, 1])  # the grayscale image became three equal channels
    info = dataset_info("tinyimagenet")
    assert info.input_shape == (3, 64, 64) and info.num_classes == 200


def test_tinyimagenet_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(DataNotFound, match="tiny-imagenet-200"):
        load_split("tinyimagenet", "train", tmp_path / "nothing")
    folder = write_tiny(tmp_path / "bad")
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataFormatError, match="n99"):
        load_split("tinyimagenet", "test", tmp_path / "bad")


@pytest.mark.parametrize("name", ["8C2F", "8C2F-theta", "8C2F-maxmin"])
def test_tiny_imagenet_models_fit(name):
    check_model_fits(name, dataset_info("tinyimagenet"))
    with torch.device("meta"):
        from workers.core.models import build_model
        model = build_model(name, dataset_info("tinyimagenet"))
        assert model(torch.empty(2, 3, 64, 64)).shape == (2, 200)
