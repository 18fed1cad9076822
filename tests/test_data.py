"""Data pipeline: real COCO files (coco-mini), and a clear error for every kind of bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import COCO_MINI, run_train
from fastcap.data.coco import DataError, load_coco_captions
from fastcap.data.splits import DataConfig, load_splits
from fastcap.data.vocab import Vocab, tokenize

needs_coco_mini = pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/fixtures/coco-mini not present")


def coco_overrides(root) -> list[str]:
    return ["data=coco", f"data.train_annotations={root}/captions_train2017.json",
            f"data.val_annotations={root}/captions_val2017.json", f"data.image_dir={root}/images",
            "data.min_word_count=1", "data.num_workers=0", "data.pin_memory=false", "training.num_epochs=1"]


def write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_tokenize_matches_ptb_conventions():
    assert tokenize("A man's dog, running!") == ["a", "man", "'s", "dog", "running"]
    assert tokenize("It doesn't fit.") == ["it", "does", "n't", "fit"]


def test_vocab_extend_keeps_old_ids():
    v = Vocab.build(["a red ball", "a blue box"])
    w = v.extended(["a green star"])
    assert w.itos[: len(v)] == v.itos and "green" in w.stoi and len(w) == len(v) + 2


@needs_coco_mini
def test_real_coco_json_and_jpegs_train_and_decode(tmp_path):
    """51 real COCO images of varied sizes with the official JSON (all its extra fields)."""
    recs = load_coco_captions(COCO_MINI / "captions_train2017.json", COCO_MINI / "images")
    assert len(recs) == 26 and all(len(r.captions) >= 5 for r in recs)
    metrics = run_train(coco_overrides(COCO_MINI) + ["model.encoder.image_size=32"], tmp_path)
    assert "CIDEr" in metrics
    results = json.loads((tmp_path / "captions_val.json").read_text())
    assert len(results) == 25


def good_coco(tmp_path, n=2):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    src = sorted(COCO_MINI.glob("images/*.jpg"))[:n]
    images = []
    for i, s in enumerate(src):
        shutil.copy(s, img_dir / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 1, "height": 1})
    anns = [{"id": 10 * i + k, "image_id": i, "caption": f"a photo number {i} {k}"} for i in range(n) for k in range(5)]
    return {"images": images, "annotations": anns}, img_dir


@needs_coco_mini
@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d.pop("annotations"), "not COCO captions format"),
    (lambda d: d["annotations"][0].update(caption=5), "caption is not a string"),
    (lambda d: d["annotations"][0].update(caption="  "), "empty caption"),
    (lambda d: d["annotations"][0].update(image_id=999), "image id 999"),
    (lambda d: d["images"][0].pop("file_name"), "needs 'id' and 'file_name'"),
])
def test_malformed_annotations_name_the_file_and_fault(tmp_path, mutate, expected):
    data, img_dir = good_coco(tmp_path)
    mutate(data)
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=expected) as info:
        load_coco_captions(path, img_dir)
    assert "bad.json" in str(info.value)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.json"):
        load_coco_captions(tmp_path / "nope.json", tmp_path)
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco_captions(write(tmp_path / "broken.json", "{\"images\": ["), tmp_path)
    with pytest.raises(DataError, match="no images with captions"):
        load_coco_captions(write(tmp_path / "empty.json", {"images": [], "annotations": []}), tmp_path)


@needs_coco_mini
def test_missing_image_fails_or_is_skipped(tmp_path):
    data, img_dir = good_coco(tmp_path, 3)
    (img_dir / "1.jpg").unlink()
    ann = write(tmp_path / "a.json", data)
    cfg = DataConfig.from_dict({"format": "coco", "train_annotations": ann, "val_annotations": ann,
                                "image_dir": str(img_dir)})
    with pytest.raises(DataError, match=r"1 image file\(s\) missing.*1\.jpg.*skip_bad_images"):
        load_splits(cfg, ("train",))
    cfg.skip_bad_images = True
    logs = []
    assert len(load_splits(cfg, ("train",), log=logs.append)["train"]) == 2
    assert any("skipping 1 image" in m for m in logs)


@needs_coco_mini
def test_corrupt_image_fails_with_its_path_or_is_skipped_and_counted(tmp_path):
    data, img_dir = good_coco(tmp_path, 3)
    (img_dir / "2.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    ann = write(tmp_path / "a.json", data)
    base = ["data=coco", f"data.train_annotations={ann}", f"data.val_annotations={ann}", f"data.image_dir={img_dir}",
            "data.num_workers=0", "data.pin_memory=false", "training.num_epochs=1", "data.batch_size=2"]
    with pytest.raises(DataError, match=r"cannot read image .*2\.jpg"):
        run_train(base, tmp_path / "run1")
    metrics = run_train(base + ["data.skip_bad_images=true"], tmp_path / "run2")
    assert metrics["num_images"] == 2


def test_unknown_data_key_and_format():
    with pytest.raises(DataError, match="unknown data config key"):
        DataConfig.from_dict({"trian_annotations": "x"})
    with pytest.raises(DataError, match="data.format='parquet'"):
        DataConfig.from_dict({"format": "parquet"})


def test_coco_without_paths_says_which_keys(tmp_path):
    with pytest.raises(DataError, match="data.train_annotations"):
        load_splits(DataConfig.from_dict({"format": "coco"}))


def test_karpathy_split_file(tmp_path):
    data, img_dir = (None, None)
    img = tmp_path / "imgs" / "val2014"
    img.mkdir(parents=True)
    src = next(iter(sorted(COCO_MINI.glob("images/*.jpg"))), None)
    if src is None:
        pytest.skip("coco-mini not present")
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        shutil.copy(src, img / f"{i}.jpg")
        images.append({"filepath": "val2014", "filename": f"{i}.jpg", "split": split, "cocoid": i,
                       "sentences": [{"raw": f"caption {i} {k}"} for k in range(5)]})
    path = write(tmp_path / "dataset_coco.json", {"images": images})
    cfg = DataConfig.from_dict({"format": "coco", "karpathy_split": path, "image_dir": str(tmp_path / "imgs")})
    splits = load_splits(cfg, ("train", "val", "test"))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 1]  # restval folds into train


@needs_coco_mini
@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_web_corpus_trains_with_a_coco_val_split(tmp_path, kind):
    recs = load_coco_captions(COCO_MINI / "captions_train2017.json", COCO_MINI / "images")
    if kind == "tsv":
        lines = ["image\tcaption"] + [f"{r.path.rsplit('/', 1)[1]}\t{r.captions[0]}" for r in recs]
    else:
        lines = [json.dumps({"image": r.path.rsplit("/", 1)[1], "caption": r.captions[0]}) for r in recs]
    corpus = write(tmp_path / f"train.{kind}", "\n".join(lines) + "\n")
    from fastcap.data.corpus import CorpusRecords

    lazy = CorpusRecords(corpus, COCO_MINI / "images")
    assert len(lazy) == 26 and lazy[3].captions == (recs[3].captions[0],)
    metrics = run_train(["data=corpus", f"data.train_annotations={corpus}", "data.num_workers=0",
                         f"data.val_annotations={COCO_MINI}/captions_val2017.json", f"data.image_dir={COCO_MINI}/images",
                         "data.min_word_count=1", "training.num_epochs=1", "data.pin_memory=false"], tmp_path / "run")
    assert metrics["num_images"] == 25


def test_malformed_corpus_line_names_the_pair(tmp_path):
    from fastcap.data.corpus import CorpusRecords

    path = write(tmp_path / "c.tsv", "a.jpg\ta caption\nb.jpg\n")
    recs = CorpusRecords(path, tmp_path)
    with pytest.raises(DataError, match=r"c.tsv, pair 2: expected an image path and a non-empty caption"):
        recs[1]
    with pytest.raises(DataError, match="not valid JSON"):
        CorpusRecords(write(tmp_path / "c.jsonl", "{oops\n"), tmp_path)


def write_shards(folder, recs, per_shard: int = 10, json_every: int = 3) -> str:
    """webdataset's own writer: the format img2dataset and `webdataset.ShardWriter` produce."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(recs), per_shard):
        with wds.TarWriter(str(folder / f"part-{s // per_shard:03d}.tar")) as sink:
            for r in recs[s: s + per_shard]:
                sample = {"__key__": f"{r.image_id:09d}", "jpg": open(r.path, "rb").read()}
                if r.image_id % json_every:
                    sample["txt"] = r.captions[0]
                else:
                    sample["json"] = {"caption": r.captions[0], "url": "http://example.com/x.jpg"}
                sink.write(sample)
    return str(folder / f"part-{{000..{(len(recs) - 1) // per_shard:03d}}}.tar")


@needs_coco_mini
def test_webdataset_tar_shards_train_with_a_coco_val_split(tmp_path):
    from fastcap.data.coco import read_image
    from fastcap.data.shards import ShardRecords

    recs = load_coco_captions(COCO_MINI / "captions_train2017.json", COCO_MINI / "images")
    spec = write_shards(tmp_path / "shards", recs)
    lazy = ShardRecords(spec)
    assert len(lazy) == len(recs) == 26 and len(lazy.shards) == 3
    assert [r.captions[0] for r in lazy] == [r.captions[0].strip() for r in recs]  # .txt and .json captions
    assert read_image(lazy[4]).size == read_image(recs[4]).size  # the JPEG read out of the tar
    assert len(ShardRecords(str(tmp_path / "shards"))) == 26  # a folder of shards works too
    metrics = run_train(["data=corpus", f"data.train_annotations='{spec}'", "data.num_workers=0",
                         f"data.val_annotations={COCO_MINI}/captions_val2017.json", f"data.image_dir={COCO_MINI}/images",
                         "data.min_word_count=1", "training.num_epochs=1", "data.pin_memory=false"], tmp_path / "run")
    assert metrics["num_images"] == 25


def test_bad_tar_shards_fail_naming_the_shard_and_sample(tmp_path):
    import tarfile

    from fastcap.data.coco import ImageRecord, read_image
    from fastcap.data.shards import ShardRecords

    with pytest.raises(DataError, match="no tar shards match"):
        ShardRecords(str(tmp_path / "none-*.tar"))
    with pytest.raises(DataError, match="tar shard not found"):
        ShardRecords(str(tmp_path / "missing.tar"))
    with pytest.raises(DataError, match="compressed"):
        ShardRecords(str(tmp_path / "x.tar.gz"))
    (tmp_path / "img.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "img.txt").write_text("a caption")
    (tmp_path / "lonely.jpg").write_bytes(b"x")
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        tar.add(tmp_path / "lonely.jpg", arcname="lonely.jpg")
    with pytest.raises(DataError, match=r"bad.tar: sample 'lonely' has no caption"):
        ShardRecords(str(tmp_path / "bad.tar"))
    with tarfile.open(tmp_path / "corrupt.tar", "w") as tar:
        tar.add(tmp_path / "img.jpg", arcname="img.jpg")
        tar.add(tmp_path / "img.txt", arcname="img.txt")
    rec = ShardRecords(str(tmp_path / "corrupt.tar"))[0]
    assert isinstance(rec, ImageRecord) and rec.member == "img.jpg" and rec.captions == ("a caption",)
    with pytest.raises(DataError, match=r"cannot read image img.jpg in tar shard .*corrupt.tar"):
        read_image(rec)
