"""Visual Decathlon: the synthetic stand-in, wrn-mtan trained and evaluated through train.py and
eval.py, a fake official decathlon-1.0-data tree, the challenge's results format, and bad input.

Pinned elsewhere and not repeated here: the WRN-28-4 MTAN's 10,237,656 parameters for the ten official domains
(tests/test_mtan.py::test_parameter_count, "wrn-28-4 mtan decathlon") and its forward for each official domain
(tests/test_mtan.py::test_wide_resnet_mtan_every_domain)."""
import copy
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

SYNTHETIC_CLASSES = {"floor": 3, "walls": 2, "count": 4, "colour": 6}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---- the first tests of this file --------------------------------------------------------------------------


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


# ---- the renderer's object map -----------------------------------------------------------------------------


def object_classes(scene):
    """Semantic class of every object id of a scene: the room's ids, then one per primitive."""
    kinds = [data.SPHERE] * len(scene["spheres"]) + [data.BOX] * len(scene["boxes"]) \
        + [data.CYLINDER] * len(scene["cylinders"])
    return torch.tensor(list(data.ROOM_CLASSES) + kinds)


def test_object_map_is_an_extra_output_that_agrees_with_semantics():
    scenes = [data.sample_scene(seed) for seed in (1, 2, 3, 4)]
    plain = data.render_scenes(scenes, (64, 64))
    extra = data.render_scenes(scenes, (64, 64), objects=True)
    assert set(extra) == set(plain) | {"object"}
    for key in plain:  # the existing outputs are untouched, bit for bit
        assert torch.equal(plain[key], extra[key])
    for b, scene in enumerate(scenes):
        objects = extra["object"][b]
        # ids count the scene's own primitives, whatever the batch padded its tables to
        assert torch.equal(data.render_scenes([scene], (64, 64), objects=True)["object"][0], objects)
        semantic = plain["semantic"][b]
        seen = semantic >= 0  # outside the sensor holes
        assert torch.equal(object_classes(scene)[objects][seen], semantic[seen])


def visible_primitives(scene, objects):
    share = torch.bincount(objects.flatten(), minlength=data.FIRST_PRIMITIVE + 5).double() / objects.numel()
    return [i for i, a in enumerate(share[data.FIRST_PRIMITIVE:].tolist()) if a >= data.VISIBLE]


def test_count_counts_the_visible_primitives():
    """Moving a visible primitive out of sight (behind the camera) lowers the label by one; the scene still
    holds the same number of primitives."""
    checked = 0
    for seed in range(60):
        scene = data.sample_scene(seed)
        objects = data.render_scenes([scene], (64, 64), objects=True)["object"][0]
        label = data.synthetic_decathlon_label("count", scene, objects)
        if label not in (1, 2):  # 2 or 3 visible primitives
            continue
        rows = [(kind, r) for kind in ("spheres", "boxes", "cylinders") for r in range(len(scene[kind]))]
        kind, row = rows[visible_primitives(scene, objects)[0]]
        moved = copy.deepcopy(scene)
        moved[kind][row, 2] = -5.0  # z: behind the camera, which looks towards +z
        objects = data.render_scenes([moved], (64, 64), objects=True)["object"][0]
        new = data.synthetic_decathlon_label("count", moved, objects)
        if new is None:  # the primitive hid another one that now shows a borderline sliver
            continue
        assert new == label - 1
        checked += 1
    assert checked >= 3


# ---- the synthetic domains ---------------------------------------------------------------------------------

# Labels of the first 8 val samples of each domain: the renderer is bit-exact, so these hold on every machine.
FIRST_VAL_LABELS = {
    "floor": [0, 1, 2, 0, 2, 1, 0, 2],
    "walls": [0, 1, 1, 0, 1, 0, 0, 1],
    "count": [1, 0, 3, 2, 0, 2, 1, 3],
    "colour": [2, 5, 1, 3, 4, 0, 2, 3],
}


@pytest.mark.parametrize("domain", list(SYNTHETIC_CLASSES))
def test_synthetic_domain_is_deterministic_and_balanced(domain):
    assert data.SYNTHETIC_DECATHLON[domain][0] == SYNTHETIC_CLASSES[domain]
    classes = SYNTHETIC_CLASSES[domain]
    val = data.SyntheticDecathlon(domain, "val", num_samples=12)
    assert val.images.shape == (12, 3, 64, 64) and val.labels.dtype == torch.long
    assert val.labels[:8].tolist() == FIRST_VAL_LABELS[domain]
    images, labels = val._render(12, "val")  # rendered again, bypassing the per-process cache
    assert torch.equal(labels, val.labels) and torch.equal(data.normalise(images, val.mean, val.std), val.images)
    fewer = data.SyntheticDecathlon(domain, "val", num_samples=6)
    assert torch.equal(fewer.images, val.images[:6])  # the first N do not depend on how many are asked for
    counts = torch.bincount(val.labels, minlength=classes)
    assert len(counts) == classes and counts.max() - counts.min() <= 1  # balanced: chance = 1 / classes
    train_sample = data.SyntheticDecathlon(domain, "train", num_samples=1, train=False)[0]["image"]
    assert not torch.equal(train_sample, val[0]["image"])  # train and val are different scenes
    # every split is normalised with the statistics of the first 64 training images
    first = data.SyntheticDecathlon(domain, "train", num_samples=64).images
    assert first.mean((0, 2, 3)).abs().max() < 1e-4 and (first.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_synthetic_tasks_and_model_outputs():
    args = train.build_parser().parse_args(["--model", "wrn-mtan", "--data", "synthetic-decathlon"])
    tasks, _ = train.dataset_tasks({"data": args.data, "data_root": None})
    assert tasks == SYNTHETIC_CLASSES
    cfg = dict(train.SYNTHETIC_DECATHLON_PRESET, model="wrn-mtan", tasks=tasks, aux_tasks={})
    model = train.build_model(cfg).eval()
    assert model.groups[0][0].conv1.out_channels == 16  # width 0.25: widen factor 1
    with torch.no_grad():
        for k, (domain, classes) in enumerate(tasks.items()):
            assert model(torch.rand(2, 3, 64, 64), domain).shape == (2, classes)
            assert model(torch.rand(2, 3, 64, 64), k).shape == (2, classes)
    # the same builder at width 1.0 and depth 28 is the paper's WRN-28-4 (count pinned in test_mtan.py)
    with torch.device("meta"):
        full = train.build_model(dict(train.RECIPES["wrn"], model="wrn-mtan", width=1.0, tasks=mtan.DECATHLON,
                                      aux_tasks={}))
    assert sum(p.numel() for p in full.parameters()) == 10_237_656


# ---- batch-norm statistics per domain ----------------------------------------------------------------------


def test_batchnorm_calibration_is_temporary_and_deterministic():
    torch.manual_seed(0)
    model = mtan.WideResNetMTAN([3, 2], domains=["a", "b"], depth=10, widen_factor=1)
    model.train()
    model(torch.rand(4, 3, 64, 64), 0)  # some shared statistics
    before = copy.deepcopy(model.state_dict())
    dataset = [{"image": torch.rand(3, 64, 64) * 3 + 1, "label": torch.tensor(0)} for _ in range(12)]
    cfg = dict(seed=0, batch_size=4, drop_last=False, workers=0, device="cpu", amp="off")
    saved = evaluation.calibrate_batchnorm(model, dataset, 1, cfg, torch.device("cpu"))
    assert not model.training
    assert int(model.bn.num_batches_tracked) == 3  # 12 images, batch 4: a cumulative average of 3 batches
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])
    calibrated = copy.deepcopy(model.state_dict())
    evaluation.restore_batchnorm(saved)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    evaluation.calibrate_batchnorm(model, dataset, 1, cfg, torch.device("cpu"))  # the same again: same batches
    for key, value in calibrated.items():
        assert torch.equal(model.state_dict()[key], value), key


# ---- a short synthetic run through train.py and eval.py ----------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """3 epochs on 320 training images per domain (the default is 8 + 2 epochs on 800): about 40 s."""
    out = str(tmp_path_factory.mktemp("synthetic") / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data.SyntheticDecathlon, "DEFAULT_SIZES", {"train": 320, "val": 80})
        result = train.main(["--model", "wrn-mtan", "--data", "synthetic-decathlon", "--epochs", "3",
                             "--finetune-epochs", "0", "--eval-every", "3", "--out", out])
        torch.set_num_threads(threads)
        yield out, result


def test_short_synthetic_training_beats_chance_on_every_domain(synthetic_run):
    out, result = synthetic_run
    assert result["tasks"] == SYNTHETIC_CLASSES
    for domain, classes in SYNTHETIC_CLASSES.items():
        # the val split is balanced, so 1 / classes is also the best a constant answer can do
        assert result["final"][domain]["accuracy"] > 1 / classes + 0.05, (domain, result["final"][domain])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2, 3] and ["val" in r for r in log] == [False, False, True]
    assert set(log[0]["train_loss"]) == set(log[0]["train_accuracy"]) == set(SYNTHETIC_CLASSES)
    assert log[2]["lr"] == pytest.approx(0.02)  # the synthetic preset's lr; halved after 4 epochs


def hand_score(accuracy, baseline):
    """The Decathlon score written out: 1000 / E_max^2 * max(0, E_max - E)^2 per domain, E_max = 2 E_base."""
    total = 0.0
    for domain, base in baseline.items():
        e_max, error = 2 * (100 - base), 100 - accuracy[domain]
        total += 1000 / e_max ** 2 * max(0.0, e_max - error) ** 2
    return total


def test_eval_reproduces_the_run_and_scores_it_against_baselines(synthetic_run, tmp_path, capsys):
    out, result = synthetic_run
    # two eval.json files of single-domain runs (as `python eval.py` writes them), covering all four domains
    files = []
    for name, accuracy in (("a", {"floor": 60.0, "walls": 80.0}), ("b", {"count": 40.0, "colour": 30.0})):
        files.append(str(tmp_path / f"{name}.json"))
        with open(files[-1], "w") as f:
            json.dump({"accuracy": accuracy}, f)
    report = evaluation.main(["--checkpoint", os.path.join(out, "last.pt"), "--baseline", ",".join(files)])
    # the same calibrated BN statistics and the same val split: exactly the training's last evaluation
    assert report["accuracy"] == {d: 100 * r["accuracy"] for d, r in result["final"].items()}
    baseline = {"floor": 60.0, "walls": 80.0, "count": 40.0, "colour": 30.0}
    assert report["decathlon_score"] == pytest.approx(hand_score(report["accuracy"], baseline))
    assert report["decathlon_score"] == pytest.approx(evaluation.decathlon_score(report["accuracy"], baseline))
    header = next(line for line in capsys.readouterr().out.splitlines() if "method" in line)
    assert header.split("|")[-2].strip() == "score"  # the table's last column
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["decathlon_score"] == pytest.approx(report["decathlon_score"])


def test_baselines_must_cover_every_domain(synthetic_run, tmp_path):
    out, _ = synthetic_run
    path = tmp_path / "floor.json"
    path.write_text(json.dumps({"accuracy": {"floor": 60.0}}))
    with pytest.raises(SystemExit, match="no accuracy for walls, count, colour"):
        evaluation.main(["--checkpoint", os.path.join(out, "last.pt"), "--baseline", str(path)])


def test_hand_score_matches_the_published_check():
    # Finetune's own accuracies score 250 per domain (E = E_max / 2): the formula's anchor, 2500 for ten
    assert hand_score(evaluation.FINETUNE, evaluation.FINETUNE) == pytest.approx(2500.0)
    assert evaluation.decathlon_score({"x": 100.0, "y": 20.0}, {"x": 50.0, "y": 60.0}) == pytest.approx(1000.0)


# ---- a fake official tree ----------------------------------------------------------------------------------


def write_image(path, colour, size, grey=False):
    array = np.zeros((size[0], size[1], 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    array[::4] //= 2  # some structure
    picture = Image.fromarray(array)
    (picture.convert("L") if grey else picture).save(path)


def make_tree(root, domains=(("aircraft", 3), ("svhn", 2)), per_split=(("train", 4), ("val", 2))):
    """ROOT/<domain>/<split>/<class>/<image>: a few tiny PNG and JPEG images of different sizes per class."""
    for d, (domain, classes) in enumerate(domains):
        for split, count in per_split:
            for c in range(classes):
                folder = root / domain / split / f"{c + 1:04d}"
                folder.mkdir(parents=True)
                for i in range(count):
                    name = f"{split}{i}.{'png' if i % 2 else 'jpg'}"
                    write_image(folder / name, (60 * c, 100 + 40 * d, 30 * i), (72 + 8 * i, 80 - 4 * c), grey=c == 1)
    return root


TINY_WRN = ["--model", "wrn-mtan", "--data", "decathlon", "--width", "0.25", "--wrn-depth", "10", "--epochs", "1",
            "--finetune-epochs", "1", "--batch-size", "4"]


def test_official_tree_trains_and_evaluates(tmp_path, capsys):
    root = make_tree(tmp_path / "decathlon-1.0-data")
    sets, classes = data.build_decathlon("decathlon", str(root), "train")
    assert classes == {"aircraft": 3, "svhn": 2}  # the domains found under ROOT, in the official order
    sample = sets["aircraft"][0]
    assert sample["image"].shape == (3, 72, 72) and sample["label"].item() == 0
    assert sets["aircraft"].files[-1][0].endswith(os.path.join("0003", "train3.png"))
    out = str(tmp_path / "run")
    result = train.main(TINY_WRN + ["--data-root", str(root), "--out", out])
    assert "no folder for imagenet12" in capsys.readouterr().out
    assert list(result["final"]) == ["aircraft", "svhn"]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["lr"] for r in log] == [0.1, 0.01]  # the recipe's lr, then the fine-tuning phase's
    report = evaluation.main(["--checkpoint", out])
    assert report["accuracy"] == {d: 100 * r["accuracy"] for d, r in result["final"].items()}
    partial = {d: evaluation.FINETUNE[d] for d in ("aircraft", "svhn")}  # scored against Finetune, 2 domains
    assert report["decathlon_score"] == pytest.approx(hand_score(report["accuracy"], partial))


def test_test_split_predictions_in_the_challenge_format(tmp_path):
    root = make_tree(tmp_path / "decathlon-1.0-data")
    (root / "aircraft" / "test").mkdir()
    images = []
    for i in range(5):
        write_image(root / "aircraft" / "test" / f"{i:07d}.jpg", (20 * i, 50, 90), (72, 90))
        images.append({"id": 7000 + i, "file_name": f"data/aircraft/test/{i:07d}.jpg"})
    (root / "annotations").mkdir()
    with open(root / "annotations" / "aircraft_test_stripped.json", "w") as f:  # categories out of order
        json.dump({"images": images, "categories": [{"id": 3}, {"id": 1}, {"id": 2}]}, f)
    out = str(tmp_path / "run")
    train.main(TINY_WRN + ["--data-root", str(root), "--out", out, "--finetune-epochs", "0"])
    # make the aircraft classifier answer class 2 (the third class folder) for every image
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    ckpt["model"]["classifiers.0.weight"].zero_()
    ckpt["model"]["classifiers.0.bias"].copy_(torch.tensor([0.0, 0.0, 5.0]))
    torch.save(ckpt, os.path.join(out, "forced.pt"))
    evaluation.main(["--checkpoint", os.path.join(out, "forced.pt"), "--split", "test"])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    # class 2 -> the third category in sorted id order: 3
    assert results == [{"image_id": 7000 + i, "category_id": 3} for i in range(5)]


# ---- bad input ---------------------------------------------------------------------------------------------


def first_line(error):
    return str(error).splitlines()[0]


def test_missing_domain_folder(tmp_path):
    root = make_tree(tmp_path / "decathlon-1.0-data")
    with pytest.raises(data.DatasetError, match="domain folder missing") as excinfo:
        data.Decathlon(str(root), "dtd", "train")
    assert str(root / "dtd") in first_line(excinfo.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as excinfo:
        train.main(TINY_WRN + ["--data-root", str(empty), "--out", str(tmp_path / "run")])
    assert first_line(excinfo.value).startswith("error: ") and str(empty) in first_line(excinfo.value)
    assert "no domain folder" in first_line(excinfo.value)


def test_empty_class_folder(tmp_path):
    root = make_tree(tmp_path / "decathlon-1.0-data")
    (root / "svhn" / "train" / "0003").mkdir()
    with pytest.raises(data.DatasetError, match="empty class folder"):
        data.Decathlon(str(root), "svhn", "train")
    with pytest.raises(SystemExit) as excinfo:
        train.main(TINY_WRN + ["--data-root", str(root), "--out", str(tmp_path / "run")])
    assert first_line(excinfo.value).startswith("error: ")
    assert str(root / "svhn" / "train" / "0003") in first_line(excinfo.value)


def test_unreadable_image_met_during_training(tmp_path):
    root = make_tree(tmp_path / "decathlon-1.0-data")
    broken = root / "aircraft" / "train" / "0002" / "broken.png"
    broken.write_bytes(b"not a png")
    dataset = data.Decathlon(str(root), "aircraft", "train")  # listing the files does not open them
    index = [path for path, _ in dataset.files].index(str(broken))
    with pytest.raises(data.DatasetError, match="cannot read this image") as excinfo:
        dataset[index]
    assert str(broken) in first_line(excinfo.value)
    with pytest.raises(SystemExit) as excinfo:  # met mid-epoch by the training loop: one clear line
        train.main(TINY_WRN + ["--data-root", str(root), "--out", str(tmp_path / "run")])
    assert first_line(excinfo.value).startswith("error: ") and str(broken) in first_line(excinfo.value)


def test_test_split_without_labels_or_with_bad_annotations(tmp_path):
    root = make_tree(tmp_path / "decathlon-1.0-data", per_split=(("train", 2), ("val", 1)))
    for domain in ("aircraft", "svhn"):  # a flat test folder, as in the official data
        (root / domain / "test").mkdir()
        write_image(root / domain / "test" / "0000001.png", (10, 20, 30), (72, 72))
    out = str(tmp_path / "run")
    train.main(TINY_WRN + ["--data-root", str(root), "--out", out, "--finetune-epochs", "0"])
    with pytest.raises(SystemExit, match="no labels"):
        evaluation.main(["--checkpoint", out, "--split", "test"])
    (root / "annotations").mkdir()
    with open(root / "annotations" / "aircraft_test_stripped.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "data/aircraft/test/gone.png"}],
                   "categories": [{"id": 1}, {"id": 2}, {"id": 3}]}, f)
    with pytest.raises(SystemExit, match="gone.png"):
        evaluation.main(["--checkpoint", out, "--split", "test"])
    (root / "annotations" / "aircraft_test_stripped.json").write_text("{")
    with pytest.raises(SystemExit, match="cannot read test annotations"):
        evaluation.main(["--checkpoint", out, "--split", "test"])


def test_a_perfect_baseline_counts_one_error():
    # 100 % on 200 images: the error is taken as one image, 0.5 %, so E_max = 1 %; other domains untouched
    adjusted = evaluation.measurable_baseline({"walls": 100.0, "floor": 90.0}, {"walls": 200, "floor": 200})
    assert adjusted == {"walls": 99.5, "floor": 90.0}
    # a perfect model earns the full 1000 on that domain; one wrong image (0.5 % error) earns (0.5/1)^2 * 1000
    assert evaluation.decathlon_score({"walls": 100.0}, {"walls": adjusted["walls"]}) == pytest.approx(1000.0)
    assert evaluation.decathlon_score({"walls": 99.5}, {"walls": adjusted["walls"]}) == pytest.approx(250.0)
    with pytest.raises(ValueError, match="walls"):  # the library function itself refuses a perfect baseline
        evaluation.decathlon_score({"walls": 100.0}, {"walls": 100.0})


def test_a_run_killed_in_the_fine_tuning_phase_resumes_exactly(tmp_path, monkeypatch):
    """1 epoch + 2 fine-tuning epochs straight, against the same run killed after its second epoch (the first
    of the fine-tuning phase, with its fresh optimiser) and resumed: the same weights at the end."""
    monkeypatch.setattr(data.SyntheticDecathlon, "DEFAULT_SIZES", {"train": 16, "val": 8})
    flags = ["--model", "wrn-mtan", "--data", "synthetic-decathlon", "--epochs", "1", "--finetune-epochs", "2",
             "--batch-size", "8", "--deterministic"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    train.main(flags + ["--out", straight])
    drawn = []

    def killed_after_two_epochs(history, path):
        drawn.append(len(history))
        if len(history) == 2:  # last.pt of epoch 2 is already written
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train, "draw_curves", killed_after_two_epochs)
        with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line and exit status 130
            train.main(flags + ["--out", killed])
        assert stopped.value.code == 130
    assert drawn == [1, 2] and torch.load(os.path.join(killed, "last.pt"), weights_only=True)["epoch"] == 2
    train.main(["--resume", killed])
    a = torch.load(os.path.join(straight, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(killed, "last.pt"), weights_only=True)
    assert b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log = [json.loads(line) for line in open(os.path.join(killed, "log.jsonl"))]
    assert [r["lr"] for r in log] == [0.02, 0.01, 0.01]  # the preset's lr, then the fine-tuning lr
