"""The dataset readers on real file names and label maps (Cityscapes, Cityscapes-C, ACDC), the official
Cityscapes id -> train id table, per-dataset defaults, the class-embedding cache of another dataset, and the
builder of Cityscapes-C; in-process and quick."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.acdc import ACDC
from data.cityscapes import CITYSCAPES_CLASSES, LABEL_ID_TABLE, TRAIN_ID_OF_LABEL_ID, CityscapesC
from data.classes import ADE20K_CLASSES, load_class_names
from data.datasets import DATASETS
from data.demo import make_demo_street
from models.class_embeddings import check_cache_metadata, class_list_hash
from pipeline.run.config import DataConfig, RunConfig

# cityscapesScripts, cityscapesscripts/helpers/labels.py (`labels`): name, id, trainId of every label of the
# gtFine annotations (ids 0..33; the license plate has id -1 and is not drawn into *_labelIds.png).
OFFICIAL = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
]


def test_the_label_id_table_is_the_official_one():
    drawn = [(name, i, t) for name, i, t in OFFICIAL if i >= 0]
    assert [i for _, i, _ in drawn] == list(range(34))
    assert [int(LABEL_ID_TABLE[i]) for _, i, _ in drawn] == [t for _, _, t in drawn]
    assert TRAIN_ID_OF_LABEL_ID == {i: t for _, i, t in drawn if t != 255}
    # The class list is the train ids' names in order (SegFormer's cityscapes id2label).
    assert list(CITYSCAPES_CLASSES) == [name for name, _, t in sorted(drawn, key=lambda x: x[2]) if t != 255]
    assert load_class_names("cityscapes") == CITYSCAPES_CLASSES and (LABEL_ID_TABLE[34:] == -1).all()


def write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def cityscapes(tmp_path) -> Path:
    """Two cities of Cityscapes val and Cityscapes-C fog 3, real names; every label id in the first label map."""
    rgb = np.zeros((4, 34, 3), dtype=np.uint8)
    for city, frames in (("frankfurt", ["000000_000294", "000001_005898"]), ("lindau", ["000000_000019"])):
        for frame in frames:
            ids = np.tile(np.arange(34, dtype=np.uint8), (4, 1))
            write(tmp_path / "gtFine/val" / city / f"{city}_{frame}_gtFine_labelIds.png", ids)
            for folder in ("leftImg8bit/val", "Cityscapes-C/fog/3/val"):
                write(tmp_path / folder / city / f"{city}_{frame}_leftImg8bit.png", rgb)
    return tmp_path


def test_the_cityscapes_reader_pairs_files_across_cities_and_maps_label_ids(cityscapes):
    for task, severity in (("fog", 3), ("clean", 5)):
        data = CityscapesC(cityscapes, task, severity)
        assert data.names == ["frankfurt_000000_000294_leftImg8bit", "frankfurt_000001_005898_leftImg8bit",
                              "lindau_000000_000019_leftImg8bit"]
        item = data[2]
        assert item["name"] == "lindau_000000_000019_leftImg8bit" and item["image"].shape == (3, 4, 34)
        assert item["label"][0].tolist() == [t for _, i, t in OFFICIAL if i >= 0]
    assert len(CityscapesC(cityscapes, "fog", 3, limit=2)) == 2


def test_cityscapes_bad_input_is_one_clear_line(cityscapes):
    with pytest.raises(FileNotFoundError, match="corruptions under .*Cityscapes-C: fog/3"):
        CityscapesC(cityscapes, "snow", 3)
    shutil.rmtree(cityscapes / "gtFine/val/lindau")  # a city without its annotation folder
    with pytest.raises(FileNotFoundError) as err:
        CityscapesC(cityscapes, "fog", 3)
    assert str(err.value).startswith("city lindau: no annotation folder") and str(err.value).endswith(
        "Cityscapes-C/fog/3/val/lindau")
    ids = np.full((4, 34), 7, dtype=np.uint8)
    ids[0, 0] = 40  # not a Cityscapes label id
    write(cityscapes / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png", ids)
    shutil.rmtree(cityscapes / "leftImg8bit/val/lindau")
    with pytest.raises(ValueError) as err:
        CityscapesC(cityscapes, "clean")[0]
    assert "frankfurt_000000_000294_gtFine_labelIds.png: label ids [40] are not Cityscapes label ids" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="use --data.classes cityscapes"):
        CityscapesC(cityscapes, "clean", num_classes=150)


def test_the_acdc_reader_keeps_train_ids_and_refuses_others(tmp_path):
    train = np.array([[0, 18, 255, 7]], dtype=np.uint8)
    for condition in ("fog", "night"):
        for seq, frame in (("GOPR0475", "000041"), ("GP010476", "000001")):
            stem = f"{seq}_frame_{frame}"
            write(tmp_path / "rgb_anon" / condition / "val" / seq / f"{stem}_rgb_anon.png", np.zeros((1, 4, 3), np.uint8))
            write(tmp_path / "gt" / condition / "val" / seq / f"{stem}_gt_labelTrainIds.png", train)
    data = ACDC(tmp_path, "night")
    assert data.names == ["GOPR0475_frame_000041_rgb_anon", "GP010476_frame_000001_rgb_anon"]
    assert data[0]["label"].tolist() == [[0, 18, 255, 7]] and data.severity is None
    with pytest.raises(FileNotFoundError, match="conditions under .*rgb_anon: fog, night"):
        ACDC(tmp_path, "rain")
    write(tmp_path / "gt/fog/val/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png",
          np.array([[0, 19, 255, 7]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train ids \[19\] are outside 0..18 and 255"):
        ACDC(tmp_path, "fog")[0]
    shutil.rmtree(tmp_path / "gt/fog/val/GP010476")
    with pytest.raises(FileNotFoundError, match="sequence GP010476: no annotation folder"):
        ACDC(tmp_path, "fog")


def test_each_dataset_brings_its_defaults_and_explicit_options_win():
    ade = RunConfig()
    assert (ade.data.root, ade.data.classes, ade.data.window_stride, ade.data.short_edge, ade.data.max_windows) == \
        ("data/ade20k_c", "ade20k", 256, None, 32)
    assert ade.data.image_short_edge == 512 and ade.model.segmenter == "nvidia/segformer-b5-finetuned-ade-640-640"
    acdc = RunConfig(data=DataConfig(dataset="acdc"))
    assert (acdc.data.corruptions, acdc.data.classes, acdc.data.short_edge, acdc.data.window_stride) == \
        (["fog", "night", "rain", "snow"], "cityscapes", 1080, 171)
    assert acdc.model.segmenter == "nvidia/segformer-b5-finetuned-cityscapes-1024-1024"
    assert acdc.model.class_embeddings == "class_embeddings/sd3-medium-cityscapes.safetensors"
    mine = DataConfig(dataset="cityscapes", window_stride=256, short_edge=512, root="elsewhere")
    assert (mine.window_stride, mine.short_edge, mine.root, mine.max_windows) == (256, 512, "elsewhere", 64)
    assert set(DATASETS) == {"ade20k", "cityscapes", "acdc"}


def test_a_class_embedding_cache_of_another_dataset_is_refused_in_one_line():
    meta = {"classes": json.dumps(list(ADE20K_CLASSES)), "classes_hash": class_list_hash(ADE20K_CLASSES),
            "model": "sd3"}
    with pytest.raises(ValueError) as err:
        check_cache_metadata(meta, "ade.safetensors", CITYSCAPES_CLASSES, "sd3")
    assert str(err.value) == ("class-embedding cache ade.safetensors was made for the ade20k classes (150), not the "
                              "run's cityscapes classes (19): use the cache of this dataset, or build it with "
                              "launch/embed_classes.py --dataset cityscapes")


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_builder_makes_cityscapes_c_that_the_reader_reads_deterministically_and_resumes(tmp_path):
    from data.make_corrupted import build, main
    source = make_demo_street(tmp_path / "cityscapes", "cityscapes", [], num_images=2, size=(48, 96), create=True)
    assert build(source, tmp_path / "a", ["fog", "contrast"], [1, 3], progress=False, dataset="cityscapes") == (8, 0)
    data = CityscapesC(tmp_path / "a", "contrast", 3)
    assert len(data) == 2 and data[1]["image"].shape == (3, 48, 96)
    assert data[1]["label"].tolist() == CityscapesC(source, "clean")[1]["label"].tolist()
    assert data._images[0].suffix == ".png"  # the authors' Cityscapes-C format
    assert build(source, tmp_path / "a", ["fog", "contrast"], [1, 3], progress=False, dataset="cityscapes") == (0, 8)
    # The command line: the same files in another folder.
    main(["--dataset", "cityscapes", "--root", str(source), "--out", str(tmp_path / "b"), "--corruptions", "fog",
          "contrast", "--severities", "1", "3", "--workers", "0"])
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_a_bad_label_map_read_by_a_loader_worker_is_still_one_clear_line(cityscapes, launcher_main):
    """The shipped configs read images in loader workers: torch re-raises a worker's error under a line of its
    own; the launcher's error line is the reader's message."""
    from torch.utils.data import DataLoader
    ids = np.full((4, 34), 7, dtype=np.uint8)
    ids[1, 1] = 99
    write(cityscapes / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", ids)
    with pytest.raises(ValueError) as err:
        list(DataLoader(CityscapesC(cityscapes, "fog", 3), batch_size=None, num_workers=1))
    assert str(err.value).startswith("Caught ValueError in DataLoader worker process 0.")
    line = launcher_main.error_line(err.value)
    assert line.startswith("annotation ") and line.endswith(
        "lindau_000000_000019_gtFine_labelIds.png: label ids [99] are not Cityscapes label ids (0..33): not a "
        "*_gtFine_labelIds.png; replace it from Cityscapes' gtFine download")
    assert launcher_main.error_line(ValueError("one\ntwo")) == "one"
