"""Visual Decathlon: the synthetic domains, the official folder loader, training and scoring through the command
line, bad input. (The WRN-28-4 parameter count, 10,237,656, is asserted in tests/test_mtan.py.)"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import mtan
import train


def test_synthetic_domains_are_deterministic_with_their_own_class_counts():
    for domain, (classes, _, _) in data.SYNTHETIC_DECATHLON.items():
        a = data.SyntheticDecathlon(domain, "val", num_samples=6)
        b = data.SyntheticDecathlon(domain, "val", num_samples=6)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.num_classes == classes and 0 <= int(a.labels.min()) and int(a.labels.max()) < classes
        assert a[0]["image"].shape == (3, 64, 64)
    counts = {spec[0] for spec in data.SYNTHETIC_DECATHLON.values()}
    assert len(data.SYNTHETIC_DECATHLON) >= 4 and len(counts) >= 3  # different numbers of classes


def test_wrn_forward_per_domain_gives_that_domains_classes():
    model = mtan.WideResNetMTAN([3, 5, 2], domains=["a", "b", "c"], depth=10, widen_factor=1)
    x = torch.rand(2, 3, 72, 72)
    assert [tuple(model(x, d).shape) for d in range(3)] == [(2, 3), (2, 5), (2, 2)]
    assert model(x, "b").shape == (2, 5)


def write_decathlon(root, domains=("gtsrb", "svhn"), classes=("0", "1"), per_class=4):
    """A fake decathlon-1.0-data tree: ROOT/<domain>/{train,val}/<class>/<i>.png, class 1 bright, class 0 dark."""
    rng = np.random.default_rng(0)
    for domain in domains:
        for split in ("train", "val"):
            for label, name in enumerate(classes):
                folder = os.path.join(root, domain, split, name)
                os.makedirs(folder, exist_ok=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 80, (40, 50, 3)) + 150 * label
                    Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return root


def test_official_loader_reads_class_folders(tmp_path):
    root = write_decathlon(str(tmp_path))
    dataset = data.Decathlon(root, "svhn", "val")
    assert dataset.classes == ["0", "1"] and len(dataset) == 8
    sample = dataset[7]
    assert sample["image"].shape == (3, 72, 72) and int(sample["label"]) == 1
    # normalised with the domain's official mean and std: bright class-1 images end well above 0
    assert sample["image"].mean() > 0.5


def test_train_and_score_on_a_fake_official_tree(tmp_path):
    root = write_decathlon(str(tmp_path / "decathlon-1.0-data"))
    out = str(tmp_path / "run")
    result = train.main(["--model", "wrn-mtan", "--data", "decathlon", "--data-root", root, "--width", "0.25",
                         "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "4", "--out", out])
    assert set(result["final"]) == {"gtsrb", "svhn"}
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["lr"] for r in records] == [0.1, 0.01]  # phase 2: a fresh SGD at the fine-tuning rate
    baseline = {"gtsrb": 60.0, "svhn": 50.0}
    json.dump({"accuracy": baseline}, open(tmp_path / "baseline.json", "w"))
    report = evaluation.main(["--checkpoint", out, "--baseline", str(tmp_path / "baseline.json")])
    assert report["decathlon_score"] == pytest.approx(evaluation.decathlon_score(report["accuracy"], baseline))


def test_bad_decathlon_input_names_the_path(tmp_path):
    root = write_decathlon(str(tmp_path))
    with pytest.raises(data.DatasetError, match="dtd"):
        data.Decathlon(root, "dtd", "train")
    os.makedirs(os.path.join(root, "gtsrb", "train", "2"))  # an empty class folder
    with pytest.raises(data.DatasetError, match=os.path.join("gtsrb", "train", "2")):
        data.Decathlon(root, "gtsrb", "train")
    bad = os.path.join(root, "svhn", "val", "0", "0.png")
    open(bad, "wb").write(b"not an image")
    with pytest.raises(data.DatasetError, match="0.png"):
        data.Decathlon(root, "svhn", "val")[0]
