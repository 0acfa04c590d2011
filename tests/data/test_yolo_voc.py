"""YOLO and Pascal VOC datasets: read into COCO in memory, trained and evaluated like COCO.

One synthetic COCO dataset is written again as a YOLO copy (data.yaml, images/ and labels/)
and a VOC copy (Annotations/, JPEGImages/, ImageSets/Main/); each must convert back to the
same COCO dict and train and evaluate to the same numbers.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from pycocotools.coco import COCO

from dinodet.cli import main as cli_main
from dinodet.data import (
    CocoDetection,
    DatasetSource,
    convert_dataset,
    dataset_splits,
    detect_format,
    open_dataset,
    read_voc,
    read_yolo,
)
from dinodet.data.coco import AnnotationWarning
from dinodet.data.source import NoLabelsWarning
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.checkpoint import load_checkpoint
from dinodet.engine.config import load_train_config
from dinodet.engine.evaluate import evaluate_checkpoint, evaluate_results
from dinodet.engine.train import train
from dinodet.errors import DataError

SPLITS = ("train", "val")
# A tiny network and 96-px images: one epoch of two steps and the evaluation in seconds.
TINY = ["model.hidden_dim=64", "model.num_heads=4", "model.enc_layers=1", "model.dec_layers=2",
        "model.dim_feedforward=128", "model.num_queries=20", "model.dn_number=10",
        "model.num_select=20", "data.num_workers=0", "data.transform.scales=[96]",
        "data.transform.max_size=192", "data.transform.crop_resize_scales=[96]",
        "data.transform.crop_min=96", "data.transform.crop_max=96",
        "data.transform.eval_size=96", "deterministic=true", "log_every=1"]


# -- writing the copies ----------------------------------------------------------------------

def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_yolo(paths: dict, root: Path) -> Path:
    """The COCO splits as a YOLO dataset with a data.yaml; images without objects get no
    label file (YOLO's negatives). Coordinates with 6 decimals, as YOLO tools write them."""
    names = None
    for split in SPLITS:
        coco = _load(paths[f"{split}_ann"])
        cat_ids = sorted(c["id"] for c in coco["categories"])
        names = [next(c["name"] for c in coco["categories"] if c["id"] == i) for i in cat_ids]
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in coco["images"]:
            shutil.copy(Path(paths[f"{split}_images"]) / image["file_name"],
                        root / "images" / split / image["file_name"])
            w, h = image["width"], image["height"]
            lines = []
            for ann in coco["annotations"]:
                if ann["image_id"] == image["id"]:
                    x, y, bw, bh = ann["bbox"]
                    lines.append(f"{cat_ids.index(ann['category_id'])} {(x + bw / 2) / w:.6f} "
                                 f"{(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
            if lines:
                stem = Path(image["file_name"]).stem
                (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"path": ".", "train": "images/train", "val": "images/val", "names": names}))
    return root / "data.yaml"


def write_voc(paths: dict, root: Path) -> Path:
    """The COCO splits as a VOC dataset (ids ``<split>_<stem>``, 1-based inclusive pixel
    boxes, a classes.txt); images without objects get no annotation file."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    names = None
    for split in SPLITS:
        coco = _load(paths[f"{split}_ann"])
        cats = {c["id"]: c["name"] for c in coco["categories"]}
        names = [cats[i] for i in sorted(cats)]
        ids = []
        for image in coco["images"]:
            stem = f"{split}_{Path(image['file_name']).stem}"
            ids.append(stem)
            shutil.copy(Path(paths[f"{split}_images"]) / image["file_name"],
                        root / "JPEGImages" / f"{stem}.jpg")
            objects = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            if not objects:
                continue
            xml = [f"<annotation><filename>{stem}.jpg</filename><size><width>{image['width']}"
                   f"</width><height>{image['height']}</height><depth>3</depth></size>"]
            for ann in objects:
                x, y, bw, bh = (int(v) for v in ann["bbox"])
                xml.append(f"<object><name>{cats[ann['category_id']]}</name><difficult>0"
                           f"</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
                           f"<xmax>{x + bw}</xmax><ymax>{y + bh}</ymax></bndbox></object>")
            xml.append("</annotation>")
            (root / "Annotations" / f"{stem}.xml").write_text("\n".join(xml))
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict:
    """The same dataset as COCO, YOLO and VOC (4 training and 2 validation images)."""
    root = tmp_path_factory.mktemp("formats")
    paths = make_synthetic_coco(root / "coco", num_train=4, num_val=2,
                                image_size=((80, 96), (96, 120)), max_objects=3, seed=3)
    return {"coco": paths, "yolo": write_yolo(paths, root / "yolo"),
            "voc": write_voc(paths, root / "voc"), "root": root}


def _comparable(coco: dict, rename=lambda name: name) -> dict:
    """A COCO dict in a form independent of category ids and of the VOC copy's names."""
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    return {
        "categories": [cats[i] for i in sorted(cats)],
        "images": [(im["id"], rename(im["file_name"]), im["width"], im["height"])
                   for im in sorted(coco["images"], key=lambda im: im["id"])],
        "annotations": [(a["image_id"], cats[a["category_id"]], a["iscrowd"]) for a in
                        coco["annotations"]],
        "boxes": torch.tensor([a["bbox"] + [a["area"]] for a in coco["annotations"]],
                              dtype=torch.float64),
    }


def _assert_same(original: dict, converted: dict, rename=lambda name: name,
                 atol: float = 0.0) -> None:
    want, got = _comparable(original), _comparable(converted, rename)
    for key in ("categories", "images", "annotations"):
        assert got[key] == want[key], key
    torch.testing.assert_close(got["boxes"][:, :4], want["boxes"][:, :4], rtol=0, atol=atol)
    torch.testing.assert_close(got["boxes"][:, 4], want["boxes"][:, 4], rtol=1e-4, atol=atol)


# -- conversion ------------------------------------------------------------------------------

def test_yolo_copy_reads_back_as_the_original_coco(copies):
    assert dataset_splits(copies["yolo"]) == ["train", "val"]
    for split in SPLITS:
        source = read_yolo(copies["yolo"], split)
        assert source.format == "yolo" and source.split == split
        assert source.image_dir == copies["yolo"].parent / "images" / split
        _assert_same(_load(copies["coco"][f"{split}_ann"]), source.coco, atol=1e-3)
        # category id = YOLO class id; every box knows its label file and line
        assert [c["id"] for c in source.coco["categories"]] == [0, 1, 2, 3]
        first = source.coco["annotations"][0]
        stem = Path(source.coco["images"][first["image_id"] - 1]["file_name"]).stem
        assert source.origins[first["id"]].endswith(f"labels/{split}/{stem}.txt:1")


def test_voc_copy_reads_back_as_the_original_coco(copies):
    assert dataset_splits(copies["voc"]) == ["train", "val"]
    for split in SPLITS:
        source = read_voc(copies["voc"], split)
        assert source.image_dir == copies["voc"] / "JPEGImages"
        _assert_same(_load(copies["coco"][f"{split}_ann"]), source.coco,
                     rename=lambda name, split=split: name.removeprefix(f"{split}_"))
        assert [c["id"] for c in source.coco["categories"]] == [1, 2, 3, 4]


def test_difficult_voc_objects_are_crowd_boxes_unless_asked(copies, tmp_path):
    voc = tmp_path / "voc"
    shutil.copytree(copies["voc"], voc)
    xml = next(iter(sorted((voc / "Annotations").glob("train_*.xml"))))
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>",
                                           "<difficult>1</difficult>", 1))
    crowd = [a["iscrowd"] for a in read_voc(voc, "train").coco["annotations"]]
    assert crowd[0] == 1 and sum(crowd) == 1
    assert sum(a["iscrowd"] for a in read_voc(voc, "train", "object").coco["annotations"]) == 0
    # a crowd box is no training target but stays in the ground truth for evaluation
    dataset = open_dataset(voc, split="train")
    assert len(dataset.coco.getAnnIds(iscrowd=True)) == 1


def test_coco_detection_takes_a_dict_or_a_source_and_names_the_source_files(copies):
    coco = _load(copies["coco"]["train_ann"])
    from_dict = CocoDetection(coco, copies["coco"]["train_images"])
    from_file = CocoDetection(copies["coco"]["train_ann"], copies["coco"]["train_images"])
    assert from_dict.image_ids == from_file.image_ids and len(from_dict) == 4
    assert from_dict[0][1]["boxes"].tolist() == from_file[0][1]["boxes"].tolist()
    bad = {**coco, "annotations": [{**coco["annotations"][0], "bbox": [1, 1, 0, 5]}]}
    source = DatasetSource(bad, Path(copies["coco"]["train_images"]), Path("data.yaml"),
                           "yolo", "train", {coco["annotations"][0]["id"]: "labels/a.txt:3"})
    with pytest.warns(AnnotationWarning, match=r"labels/a\.txt:3: non-positive box size"):
        dataset = CocoDetection(source)
    assert dataset.format == "yolo" and dataset.ann_file == Path("data.yaml")
    with pytest.raises(DataError, match=r"<COCO dict>: missing key 'categories'"):
        CocoDetection({"images": [], "annotations": []}, ".")


# -- training and evaluation -----------------------------------------------------------------

def _train(out: Path, ann, images=None, split=None) -> dict:
    cfg = load_train_config(
        "cpu-small", None, TINY, epochs=1, batch_size=2, out_dir=str(out),
        train_ann=str(ann["train"]), train_images=images and str(images["train"]),
        val_ann=str(ann["val"]), val_images=images and str(images["val"]),
        train_split=split and "train", val_split=split and "val")
    return train(cfg, progress=False)


def _losses(run: Path) -> list[float]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "step"]


def test_one_epoch_on_each_copy_trains_and_evaluates_the_same(copies, tmp_path):
    torch.set_num_threads(1)
    coco = copies["coco"]
    runs = {
        "coco": _train(tmp_path / "coco", {s: coco[f"{s}_ann"] for s in SPLITS},
                       {s: coco[f"{s}_images"] for s in SPLITS}),
        "yolo": _train(tmp_path / "yolo", dict.fromkeys(SPLITS, copies["yolo"]), split=True),
        "voc": _train(tmp_path / "voc", dict.fromkeys(SPLITS, copies["voc"]), split=True),
    }
    want = runs["coco"]["metrics"]
    assert want is not None and set(want) >= {"AP", "AP50", "AR100"}
    weights = load_checkpoint(runs["coco"]["latest_checkpoint"])["model"]
    # VOC's integer pixel boxes are the COCO ones exactly; YOLO's 6 decimals move a box by
    # up to 1e-4 px, which moves a weight by about as little
    for name, tolerance in (("yolo", {"rtol": 1e-3, "atol": 1e-4}),
                            ("voc", {"rtol": 0.0, "atol": 0.0})):
        assert runs[name]["metrics"] == pytest.approx(want, abs=1e-9), name
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "coco"),
                                                         rel=1e-5), name
        theirs = load_checkpoint(runs[name]["latest_checkpoint"])["model"]
        for key in weights:
            torch.testing.assert_close(theirs[key], weights[key], **tolerance, msg=key)
        # the run records the format it read, for --resume
        recorded = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert recorded["data"]["format"] == name
    # evaluation of a checkpoint, by the Python API and the command line
    yolo_eval = evaluate_checkpoint(runs["yolo"]["latest_checkpoint"], copies["yolo"],
                                    split="val", num_workers=0, device="cpu")
    assert yolo_eval.metrics == pytest.approx(want, abs=1e-9)
    coco_eval = evaluate_checkpoint(runs["coco"]["latest_checkpoint"], coco["val_ann"],
                                    coco["val_images"], num_workers=0, device="cpu")
    assert coco_eval.metrics == pytest.approx(want, abs=1e-9)
    assert len(yolo_eval.detections or []) == len(coco_eval.detections or [])


def test_the_same_detections_score_the_same_on_each_copy(copies):
    """COCO evaluation of one set of detections (the ground truth moved by a few pixels,
    with misses and false alarms) against each copy's ground truth: equal, and far from 0
    and 1, so that a box convention off by a pixel would show."""
    coco = copies["coco"]
    datasets = {"coco": open_dataset(coco["train_ann"], coco["train_images"]),
                "yolo": open_dataset(copies["yolo"], split="train"),
                "voc": open_dataset(copies["voc"], split="train")}
    generator = torch.Generator().manual_seed(0)
    detections = []  # (image id, class index, box, score)
    for ann in _load(coco["train_ann"])["annotations"]:
        label = datasets["coco"].category_id_to_label[ann["category_id"]]
        shift = (torch.rand(4, generator=generator) * 2 - 1).tolist()
        box = [v + d for v, d in zip(ann["bbox"], shift)]
        detections.append((ann["image_id"], label, box, torch.rand(1, generator=generator).item()))
        detections.append((ann["image_id"], (label + 1) % 4, box, 0.05))  # a false alarm
    results = {}
    for name, dataset in datasets.items():
        results[name] = evaluate_results(dataset.coco, [
            {"image_id": i, "category_id": dataset.label_to_category_id[label], "bbox": box,
             "score": score} for i, label, box, score in detections[1:]])  # one missed
    want = results["coco"].metrics
    assert 0.3 < want["AP"] < 0.95 and 0.3 < want["AP75"] < 1
    for name in ("yolo", "voc"):
        assert results[name].metrics == pytest.approx(want, abs=1e-6), name


def test_eval_command_reads_a_voc_split(copies, tmp_path, capsys):
    torch.set_num_threads(1)
    coco = copies["coco"]
    summary = _train(tmp_path / "voc", dict.fromkeys(SPLITS, copies["voc"]), split=True)
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", summary["latest_checkpoint"], "--data",
                     str(copies["voc"]), "--workers", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    metrics = summary["metrics"]
    assert table[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    shown = [None if v == "-" else float(v) for v in table[1].split()]
    for value, name in zip(shown, ["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        assert value == (None if metrics[name] < 0 else pytest.approx(100 * metrics[name],
                                                                      abs=0.06))
    assert cli_main(["eval", "--checkpoint", summary["latest_checkpoint"], "--ann",
                     str(coco["val_ann"])]) == 2
    assert "needs --images" in capsys.readouterr().err


def test_train_command_takes_data_and_checks_its_options(copies, tmp_path, capsys):
    base = ["train", "--preset", "cpu-small", "--out", str(tmp_path / "run")]
    assert cli_main([*base, "--data", str(copies["yolo"]), "--train-ann", "x.json"]) == 2
    assert "drop --train-ann" in capsys.readouterr().err
    assert cli_main([*base, "--data", str(copies["coco"]["train_ann"])]) == 2
    assert "a COCO json is one split" in capsys.readouterr().err
    assert cli_main([*base, "--data", str(copies["yolo"]), "--val-split", "test"]) == 2
    assert "has no split 'test' (it has: train, val)" in capsys.readouterr().err


# -- format detection ------------------------------------------------------------------------

def test_the_format_is_told_from_the_layout(copies, tmp_path):
    assert detect_format(copies["coco"]["train_ann"]) == "coco"
    assert detect_format(copies["yolo"]) == "yolo"  # data.yaml
    assert detect_format(copies["yolo"].parent) == "yolo"  # its folder
    assert detect_format(copies["voc"]) == "voc"
    flat = tmp_path / "flat"
    (flat / "labels").mkdir(parents=True)
    assert detect_format(flat) == "yolo"
    with pytest.raises(DataError, match="cannot tell the dataset format of the folder"):
        detect_format(tmp_path / "flat" / "labels")
    with pytest.raises(DataError, match="no such file or folder"):
        detect_format(tmp_path / "missing")
    # an explicit format that the layout does not have is named
    with pytest.raises(DataError, match="not a Pascal VOC dataset folder"):
        open_dataset(copies["yolo"].parent, format="voc", split="train")
    with pytest.raises(DataError, match="names its own images"):
        open_dataset(copies["voc"], "JPEGImages", split="val")
    with pytest.raises(DataError, match="needs its image folder"):
        open_dataset(copies["coco"]["val_ann"])


def test_a_yolo_folder_without_splits_is_read_whole_with_its_classes_txt(tmp_path,
                                                                         image_writer):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image_writer(root / "images" / "a.png", 40, 80)
    image_writer(root / "images" / "b.png", 40, 80)  # no label file: no objects
    (root / "classes.txt").write_text("cat\ndog\n")
    with pytest.warns(NoLabelsWarning, match=r"none of its 2 images has a label file"):
        read_yolo(root)
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n\n")
    source = read_yolo(root)
    assert source.split is None and dataset_splits(root) == []
    assert source.coco["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    assert [im["file_name"] for im in source.coco["images"]] == ["a.png", "b.png"]
    assert [a["bbox"] for a in source.coco["annotations"]] == [[30.0, 10.0, 20.0, 20.0]]
    with pytest.raises(DataError, match="has no split 'train'"):
        read_yolo(root, "train")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="no class names"):
        read_yolo(root)
    (root / "data.yaml").write_text("train: images\nnames: {0: cat, 1: dog}\nnc: 2\n")
    assert read_yolo(root, "train").coco["categories"][1] == {"id": 1, "name": "dog"}


# -- malformed files are named ---------------------------------------------------------------

@pytest.fixture
def yolo_one(tmp_path, image_writer) -> Path:
    """A YOLO folder of one 40x80 image whose label file has a good first line."""
    root = tmp_path / "one"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image_writer(root / "images" / "img3.png", 40, 80)
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


@pytest.mark.parametrize(("line", "why"), [
    ("0 0.5 0.5 0.2", "expected 5 fields 'class cx cy w h', got 4"),
    ("0 0.5 0.5 0.2 0.2 0.1 0.1", "expected 5 fields 'class cx cy w h', got 7 (segmentation "
                                    "polygons are not read)"),
    ("a 0.5 0.5 0.2 0.2", "class id 'a' is not an integer"),
    ("1.5 0.5 0.5 0.2 0.2", "class id '1.5' is not an integer"),
    ("2 0.5 0.5 0.2 0.2", "class id 2 is not among the 2 classes of"),
    ("0 0.5 x 0.2 0.2", "cy 'x' is not a number"),
    ("0 0.5 nan 0.2 0.2", "cy 'nan' is not a finite number"),
    ("0 1.2 0.5 0.2 0.2", "cx 1.2 is outside [0, 1]"),
    ("0 -0.01 0.5 0.2 0.2", "cx -0.01 is outside [0, 1]"),
    ("0 0.95 0.5 0.2 0.2", "the box spans x 0.85..1.05, outside [0, 1]"),
    ("0 0.5 0.5 0 0.2", "empty box"),
])
def test_a_malformed_yolo_line_is_named_by_file_and_line(yolo_one, line, why):
    label = yolo_one / "labels" / "img3.txt"
    label.write_text(f"1 0.5 0.5 0.25 0.5\n{line}\n")
    with pytest.raises(DataError) as err:
        open_dataset(yolo_one)
    assert str(err.value).startswith(f"{label}:2: {why}")
    assert repr(line) in str(err.value)


def test_within_the_tolerance_a_yolo_box_is_clipped_not_refused(yolo_one):
    (yolo_one / "labels" / "img3.txt").write_text("0 0.9 0.5 0.2001 0.5\n")
    (bbox,) = [a["bbox"] for a in read_yolo(yolo_one).coco["annotations"]]
    assert bbox[0] + bbox[2] == pytest.approx(80.0)


def test_a_yolo_label_file_without_its_image_is_an_error(yolo_one):
    (yolo_one / "labels" / "img3.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (yolo_one / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"ghost\.txt: a label file without its image"):
        read_yolo(yolo_one)


def test_bad_data_yaml_is_named(yolo_one):
    data = yolo_one / "data.yaml"
    for text, why in (("train: images\n", "missing key 'names'"),
                      ("train: images\nnames: [a, b]\nnc: 3\n", "nc is 3 but names lists 2"),
                      ("train: nope\nnames: [a]\n", "train: nope: no such folder"),
                      ("names: [a]\n", "no split"),
                      ("train: [images\n", "not valid YAML")):
        data.write_text(text)
        with pytest.raises(DataError, match="data.yaml: " + why):
            read_yolo(data, "train")


@pytest.fixture
def voc_one(tmp_path, image_writer) -> Path:
    """A VOC folder of one 40x80 image, ``x``, with the VOC classes."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    image_writer(root / "JPEGImages" / "x.png", 40, 80)
    return root


def _xml(*objects: str) -> str:
    return ("<annotation><size><width>80</width><height>40</height></size>"
            + "".join(f"<object>{o}</object>" for o in objects) + "</annotation>")


_GOOD = "<name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>8</xmax><ymax>8</ymax></bndbox>"


@pytest.mark.parametrize(("xml", "why"), [
    ("<annotation><object>", "not valid XML"),
    ("<root/>", "expected an <annotation> element, got <root>"),
    (_xml(_GOOD, "<name>cat</name>"), "<object> 2: missing <bndbox>"),
    (_xml(_GOOD, "<bndbox><xmin>1</xmin></bndbox>"), "<object> 2: missing <name>"),
    (_xml(_GOOD, "<name>cat</name><bndbox><xmin>20</xmin><ymin>1</ymin><xmax>10</xmax>"
                 "<ymax>5</ymax></bndbox>"), "<object> 2 <bndbox>: xmax 10 < xmin 20"),
    (_xml(_GOOD, "<name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>"
                 "</bndbox>"), "<object> 2 <bndbox>: missing <ymax>"),
    (_xml(_GOOD, "<name>cat</name><bndbox><xmin>1</xmin><ymin>a</ymin><xmax>10</xmax>"
                 "<ymax>5</ymax></bndbox>"), "<object> 2 <bndbox>: <ymin> 'a' is not a number"),
    (_xml(_GOOD, "<name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>90</xmax>"
                 "<ymax>5</ymax></bndbox>"), "<object> 2 <bndbox>: (1, 1, 90, 5) is outside"),
    (_xml(_GOOD, _GOOD.replace("cat", "unicorn")), "<object> 2: unknown class name 'unicorn'"),
    (_xml(_GOOD, _GOOD + "<difficult>yes</difficult>"), "<object> 2: <difficult> must be 0"),
    (_xml(_GOOD).replace("<width>80", "<width>81"), "<size> is 81x40 but"),
])
def test_a_malformed_voc_file_is_named_by_file_and_element(voc_one, xml, why):
    path = voc_one / "Annotations" / "x.xml"
    path.write_text(xml)
    with pytest.raises(DataError) as err:
        read_voc(voc_one)
    assert str(err.value).startswith(f"{path}: {why}")


def test_voc_image_and_annotation_pairing(voc_one, image_writer):
    with pytest.warns(NoLabelsWarning, match="none of its 1 images has a label file"):
        assert read_voc(voc_one).coco["annotations"] == []  # no annotation: no objects
    (voc_one / "Annotations" / "x.xml").write_text(_xml(_GOOD, _GOOD.replace("1<", "2<")))
    source = read_voc(voc_one)
    assert [a["bbox"] for a in source.coco["annotations"]] == [[0, 0, 8, 8], [1, 1, 7, 7]]
    assert source.origins == {1: f"{voc_one}/Annotations/x.xml: <object> 1",
                              2: f"{voc_one}/Annotations/x.xml: <object> 2"}
    (voc_one / "Annotations" / "lost.xml").write_text(_xml())
    with pytest.raises(DataError, match=r"lost\.xml: an annotation without its image"):
        read_voc(voc_one)
    (voc_one / "Annotations" / "lost.xml").unlink()
    main = voc_one / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("x\nmissing\n")
    (main / "dog_train.txt").write_text("x  1\n")  # a per-class list: not a split
    assert dataset_splits(voc_one) == ["train"]
    with pytest.raises(DataError, match=r"train\.txt:2: image missing: neither"):
        read_voc(voc_one, "train")
    with pytest.raises(DataError, match="has the splits train"):
        read_voc(voc_one)


# -- convert-dataset -------------------------------------------------------------------------

def test_convert_dataset_writes_coco_json_that_pycocotools_loads(copies, tmp_path, capsys):
    out = tmp_path / "out"
    for src in (copies["yolo"], copies["voc"]):
        assert cli_main(["convert-dataset", str(src), str(out), "--to", "coco"]) == 0
        printed = capsys.readouterr().out
        for split in SPLITS:
            path = out / f"instances_{split}.json"
            assert f"wrote {path}" in printed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                coco = COCO(str(path))
            original = _load(copies["coco"][f"{split}_ann"])
            assert len(coco.getImgIds()) == len(original["images"])
            assert len(coco.getAnnIds()) == len(original["annotations"])
            written = _load(path)
            dataset = CocoDetection(path, written["info"]["image_dir"], strict=True)
            assert len(dataset) == len(original["images"]) and dataset[0][0].shape[0] == 3
        assert not list(out.glob(".*.tmp"))  # written atomically
    written = convert_dataset(copies["voc"], tmp_path / "one", splits=["val"])
    assert [p.name for p, _ in written] == ["instances_val.json"]
    assert cli_main(["convert-dataset", str(copies["voc"]), str(out), "--split", "test"]) == 2
    assert "has no split 'test'" in capsys.readouterr().err
