"""data-tools end to end on real components: synthetic data, the three source layouts, local and S3
(moto server) destinations, resume, verification, bad inputs, Ray, and the contact sheet."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.sources import in22k_synsets
from data_tools.synth import make_dataset
from pretrain import storage
from pretrain.data import shards


def _jpeg(seed: int, size: tuple[int, int] = (24, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def make(capsys, src, dest, *extra) -> shards.Manifest:
    rc, out, err = run(capsys, "make-shards", src, dest, "--no-progress", *extra)
    assert rc == 0, err
    return shards.read_manifest(str(dest))


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def samples_of(tar_path: Path) -> list[dict[str, bytes]]:
    """Samples read back with plain webdataset, proving the tars stay WebDataset-compatible."""
    import webdataset as wds

    return list(wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "train"
    make_dataset(str(root), classes=4, per_class=8, size=32, seed=3)
    return root


def test_synth_is_deterministic_with_holdout(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_dataset(str(a), 3, 2, 24, seed=1, holdout=1)
    make_dataset(str(b), 3, 2, 24, seed=1, holdout=1, workers=2)
    make_dataset(str(c), 3, 2, 24, seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert [str(f) for f in files][:2] == ["class_000/00000.jpg", "class_000/00001.jpg"] and len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    holdout = sorted(p.relative_to(tmp_path / "a_holdout") for p in (tmp_path / "a_holdout").rglob("*.jpg"))
    assert len(holdout) == 3
    assert (tmp_path / "a_holdout" / holdout[0]).read_bytes() != (a / files[0]).read_bytes()
    assert Image.open(a / files[0]).size == (24, 24)


def test_folder_to_local_shards(capsys, tmp_path, synth_src):
    dest = tmp_path / "shards"
    manifest = make(capsys, synth_src, dest, "--shard-samples", 6, "--workers", 2)
    classes = [f"class_{i:03d}" for i in range(4)]
    assert manifest.num_samples == 32 and manifest.classes == classes and manifest.label_source == "sorted"
    assert [s.num_samples for s in manifest.shards] == [6, 6, 6, 6, 6, 2]
    assert manifest.build["seed"] == 0 and manifest.build["shard_samples"] == 6 and manifest.skipped == {}
    mixed, keys = 0, []
    for info in manifest.shards:
        tar = dest / info.name
        assert info.bytes == tar.stat().st_size and info.sha256 == storage.sha256_file(str(tar))
        assert (dest / shards.done_name(info.name)).exists()
        samples = samples_of(tar)
        assert len(samples) == info.num_samples
        for sample in samples:
            meta = json.loads(sample["json"])
            assert sample["jpg"] == (synth_src / meta["source"]).read_bytes()  # JPEG bytes preserved
            assert int(sample["cls"]) == classes.index(meta["class"])
            keys.append((sample["__key__"], meta["source"]))
        mixed += len({json.loads(s["json"])["class"] for s in samples}) > 1
    assert mixed >= 4  # the global shuffle mixes classes within shards
    assert [k for k, _ in keys] == [f"{i:09d}" for i in range(32)]
    assert [s for _, s in keys] != sorted(s for _, s in keys)


def test_idx_offsets_land_on_samples(capsys, tmp_path, synth_src):
    dest = tmp_path / "shards"
    manifest = make(capsys, synth_src, dest, "--shard-samples", 10)
    for info in manifest.shards:
        offsets = shards.read_index(str(dest), info.name)
        assert len(offsets) == info.num_samples + 1
        tar_bytes = (dest / info.name).read_bytes()
        assert set(tar_bytes[offsets[-1]:]) == {0}  # only end-of-archive blocks follow the last sample
        for i in (0, info.num_samples // 2, info.num_samples - 1):
            blob = storage.read_bytes(str(dest / info.name), start=int(offsets[i]), end=int(offsets[i + 1]))
            with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
                names = tf.getnames()
            stems = {n.split(".")[0] for n in names}
            assert len(stems) == 1 and sorted(n.split(".", 1)[1] for n in names) == ["cls", "jpg", "json"]


def test_resume_is_byte_identical_and_other_plans_are_refused(capsys, tmp_path, synth_src):
    dest = tmp_path / "shards"
    make(capsys, synth_src, dest, "--shard-samples", 5, "--workers", 2)
    clean = snapshot(dest)
    # An interrupted build: one shard and its record gone, one tar half-written without a record,
    # no manifest yet.
    (dest / "shard-000001.tar").unlink()
    (dest / "shard-000001.done").unlink()
    (dest / "shard-000003.tar").write_bytes(b"partial")
    (dest / "shard-000003.done").unlink()
    (dest / "manifest.json").unlink()
    (dest / "shard-000001.tar.tmp-0123abcd").write_bytes(b"left by a killed local write")
    rc, out, err = run(capsys, "make-shards", synth_src, dest, "--shard-samples", 5, "--no-progress")
    assert rc == 0 and "5 already complete" in err
    assert snapshot(dest) == clean
    rc, _, err = run(capsys, "make-shards", synth_src, dest, "--shard-samples", 5, "--seed", 1,
                     "--no-progress")
    assert rc == 2 and "different build plan" in err and "seed: 0 -> 1" in err
    (dest / "manifest.json").unlink()  # refused on the .done records alone, too
    rc, _, err = run(capsys, "make-shards", synth_src, dest, "--shard-samples", 4, "--no-progress")
    assert rc == 2 and "different build plan" in err
    assert {k: v for k, v in snapshot(dest).items() if k != "manifest.json"} == \
        {k: v for k, v in clean.items() if k != "manifest.json"}


def test_verify_catches_corruption_wrong_count_and_missing_shard(capsys, tmp_path, synth_src):
    dest = tmp_path / "shards"
    make(capsys, synth_src, dest, "--shard-samples", 8)
    rc, out, _ = run(capsys, "verify", dest, "--decode-sample", -1)
    assert rc == 0 and "32 images decoded" in out and out.strip().endswith("OK")
    good = (dest / "shard-000001.tar").read_bytes()
    offsets = shards.read_index(str(dest), "shard-000001.tar")
    corrupt = bytearray(good)
    corrupt[int(offsets[1]) + 1500] ^= 0xFF  # inside the second sample's JPEG data; tar still parses
    (dest / "shard-000001.tar").write_bytes(bytes(corrupt))
    rc, out, _ = run(capsys, "verify", dest)
    assert rc == 1 and "shard-000001.tar: sha256 mismatch" in out
    (dest / "shard-000001.tar").write_bytes(good)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = 9
    (dest / "manifest.json").write_text(json.dumps(manifest))
    rc, out, _ = run(capsys, "verify", dest)
    assert rc == 1 and "shard-000000.tar: 8 samples, manifest says 9" in out
    manifest["shards"][0]["num_samples"] = 8
    (dest / "manifest.json").write_text(json.dumps(manifest))
    (dest / "shard-000002.tar").unlink()
    rc, out, _ = run(capsys, "verify", dest)
    assert rc == 1 and "shard-000002.tar: missing" in out and "FAILED: 1 problem" in out


def test_bad_inputs_are_skipped_and_reported(capsys, tmp_path):
    src, dest = tmp_path / "src", tmp_path / "shards"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
    for i in range(3):
        (src / "cat" / f"good{i}.jpg").write_bytes(_jpeg(i))
    (src / "cat" / "empty.jpg").write_bytes(b"")
    (src / "cat" / "text.jpg").write_text("this is not an image\n")
    (src / "cat" / "truncated.jpg").write_bytes(_jpeg(9, (64, 64))[:900])
    (src / "dog" / "good.jpg").write_bytes(_jpeg(5))
    png = io.BytesIO()
    Image.new("RGBA", (20, 10), (0, 0, 255, 128)).save(png, format="PNG")
    (src / "dog" / "alpha.png").write_bytes(png.getvalue())
    (src / "dog" / "big.jpg").write_bytes(_jpeg(6, (100, 50)))
    manifest = make(capsys, src, dest, "--max-side", 40, "--shard-samples", 3)
    expected = {"corrupt_image": 1, "empty": 1, "not_an_image": 1}
    assert manifest.num_samples == 6 and manifest.skipped == expected
    report = json.loads((dest / "report.json").read_text())
    assert report["skipped"] == expected and report["num_items"] == 9
    assert report["skipped_items"] == {"corrupt_image": ["cat/truncated.jpg"], "empty": ["cat/empty.jpg"],
                                       "not_an_image": ["cat/text.jpg"]}
    stored = {json.loads(s["json"])["source"]: s["jpg"] for info in manifest.shards
              for s in samples_of(dest / info.name)}
    assert stored["cat/good0.jpg"] == (src / "cat" / "good0.jpg").read_bytes()
    assert Image.open(io.BytesIO(stored["dog/alpha.png"])).format == "JPEG"
    assert Image.open(io.BytesIO(stored["dog/big.jpg"])).size == (40, 20)
    rc, out, _ = run(capsys, "verify", dest, "--decode-sample", -1)
    assert rc == 0 and "skipped while building" in out


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_source_uses_imagenet22k_synset_ids(capsys, tmp_path):
    src = tmp_path / "winter21_whole"
    src.mkdir()
    members = {"n01440764": {f"n01440764_{i}.JPEG": _jpeg(i) for i in range(3)},
               "n01443537": {f"n01443537_{i}.JPEG": _jpeg(10 + i) for i in range(2)},
               "n00004475": {f"n00004475_{i}.JPEG": _jpeg(20 + i, (64, 64)) for i in range(2)}}
    for synset, files in members.items():
        _write_tar(src / f"{synset}.tar", files)
    damaged = src / "n00004475.tar"
    damaged.write_bytes(damaged.read_bytes()[:2048 + len(members["n00004475"]["n00004475_0.JPEG"])])
    manifest = make(capsys, src, tmp_path / "shards", "--shard-samples", 4, "--workers", 2)
    synsets = in22k_synsets()
    assert manifest.label_source == "imagenet22k_synsets" and manifest.classes == synsets
    assert manifest.num_classes == 21841 and manifest.num_samples == 6
    assert manifest.skipped == {"unreadable_tar_member": 1}
    for info in manifest.shards:
        for sample in samples_of(tmp_path / "shards" / info.name):
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == synsets.index(meta["class"])
            tar_name, member = meta["source"].split("/")
            assert sample["jpg"] == members[tar_name[:-4]][member]
    report = json.loads((tmp_path / "shards" / "report.json").read_text())
    assert report["skipped_items"] == {"unreadable_tar_member": ["n00004475.tar/n00004475_1.JPEG"]}
    sorted_labels = make(capsys, src, tmp_path / "sorted", "--labels", "sorted")
    assert sorted_labels.classes == sorted(members) and sorted_labels.label_source == "sorted"


def test_sources_on_s3_read_in_place(capsys, tmp_path, s3_bucket):
    """Folder and tar sources behind s3:// give the same shards as the same files on local disk."""
    local = tmp_path / "local"
    for k, synset in enumerate(("n01440764", "n01443537")):
        files = {f"{synset}_{i}.JPEG": _jpeg(10 * k + i) for i in range(3)}
        _write_tar(tmp_path / f"{synset}.tar", files)
        storage.write_bytes(f"{s3_bucket}/tars/{synset}.tar", (tmp_path / f"{synset}.tar").read_bytes())
        for name, data in files.items():
            (local / synset).mkdir(parents=True, exist_ok=True)
            (local / synset / name).write_bytes(data)
            storage.write_bytes(f"{s3_bucket}/folder/{synset}/{name}", data)
    from_s3 = make(capsys, f"{s3_bucket}/folder", tmp_path / "a", "--shard-samples", 4)
    from_disk = make(capsys, local, tmp_path / "b", "--shard-samples", 4)
    assert from_s3.shards == from_disk.shards and from_s3.label_source == "imagenet22k_synsets"
    from_tars = make(capsys, f"{s3_bucket}/tars", tmp_path / "c", "--shard-samples", 4, "--workers", 2)
    assert from_tars.build["source_type"] == "tars" and from_tars.num_samples == 6 and from_tars.skipped == {}


def test_list_source_with_s3_inputs_into_s3(capsys, tmp_path, s3_bucket, synth_src):
    images = sorted(synth_src.rglob("*.jpg"))[:4]
    for i, image in enumerate(images[:2]):
        storage.write_bytes(f"{s3_bucket}/raw/img{i}.jpg", image.read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rel.jpg").write_bytes(images[2].read_bytes())
    lines = [f"{s3_bucket}/raw/img0.jpg\t5", f"{s3_bucket}/raw/img1.jpg\t0",
             f"{images[3]}\t2", "sub/rel.jpg 05", "# comment", ""]
    (tmp_path / "list.txt").write_text("\n".join(lines))
    dest = f"{s3_bucket}/shards/train"
    manifest = make(capsys, tmp_path / "list.txt", dest, "--shard-samples", 3)
    assert manifest.label_source == "list" and manifest.classes == [str(i) for i in range(6)]
    assert manifest.num_samples == 4 and len(manifest.shards) == 2
    assert {shards.MANIFEST, shards.REPORT, "shard-000000.tar", "shard-000000.idx",
            "shard-000000.done"} <= set(storage.listdir(dest))
    offsets = shards.read_index(dest, "shard-000000.tar")
    blob = storage.read_bytes(f"{dest}/shard-000000.tar", start=int(offsets[1]), end=int(offsets[2]))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        fields = {m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in tf}
    source = json.loads(fields["json"])["source"]
    expected = {lines[0].split("\t")[0]: (images[0], 5), lines[1].split("\t")[0]: (images[1], 0),
                str(images[3]): (images[3], 2), "sub/rel.jpg": (images[2], 5)}[source]
    assert fields["jpg"] == expected[0].read_bytes() and int(fields["cls"]) == expected[1]
    rc, out, _ = run(capsys, "verify", dest)
    assert rc == 0 and out.strip().endswith("OK")


@pytest.mark.integration
def test_ray_build_matches_process_pool(capsys, tmp_path, synth_src):
    ray = pytest.importorskip("ray")
    make(capsys, synth_src, tmp_path / "pool", "--shard-samples", 12, "--workers", 2)
    try:
        make(capsys, synth_src, tmp_path / "ray", "--shard-samples", 12, "--workers", 2, "--ray")
    finally:
        ray.shutdown()
    assert not ray.is_initialized()
    pool, via_ray = snapshot(tmp_path / "pool"), snapshot(tmp_path / "ray")
    assert len(pool) == 3 * 3 + 2 and via_ray == pool  # tars, idx, .done, report and manifest


def test_inspect_writes_contact_sheets(capsys, tmp_path, synth_src):
    dest = tmp_path / "shards"
    make(capsys, synth_src, dest, "--shard-samples", 10)
    for extra in ((), ("--augmented",)):
        out = tmp_path / f"grid{len(extra)}.png"
        rc, stdout, _ = run(capsys, "inspect", dest, "--out", out, "--n", 10, "--image-size", 32, *extra)
        assert rc == 0 and "10 samples" in stdout
        with Image.open(out) as sheet:
            assert sheet.format == "PNG" and sheet.size == (8 * 32, 2 * (32 + 14))


def test_cli_errors_are_one_clear_line(capsys, tmp_path, synth_src):
    rc, _, err = run(capsys, "make-shards", tmp_path / "missing", tmp_path / "out")
    assert rc == 2 and "does not exist" in err and "ImageFolder" in err
    rc, _, err = run(capsys, "make-shards", synth_src, "ftp2://host/x")
    assert rc == 2 and "unsupported URL scheme 'ftp2'" in err and "s3://" in err
    rc, _, err = run(capsys, "verify", tmp_path)
    assert rc == 2 and "no manifest.json" in err
    rc, _, err = run(capsys, "make-shards", synth_src, tmp_path / "o", "--labels", "in22k", "--no-progress")
    assert rc == 2 and "not ImageNet-22k synsets" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "make-shards", tmp_path / "empty", tmp_path / "o2")
    assert rc == 2 and "neither class sub-folders nor .tar files" in err
    for command in ("synth", "make-shards", "verify", "inspect"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "usage: data-tools " + command in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # nothing is created for a command that fails validation
