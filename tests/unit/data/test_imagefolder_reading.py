"""Reading an image folder is bounded and exact: a pixel cap checked on the header, every Pillow mode made 8-bit
RGB by a defined conversion, unreadable files skipped up to data.max_unreadable_fraction and named.

Files are real, written into tmp_path: by Pillow, or byte by byte (struct + zlib) where Pillow cannot write
them (a 16-bit colour PNG, a 20000 x 20000 PNG that is 50 KB on disk).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.config import DataConfig
from selfsup.data.arrays import MANIFEST, load_split
from selfsup.data.sources import prepare_dataset, read_image_folder
from selfsup.errors import DatasetError

WHITE = (255, 255, 255)


def write_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes]) -> None:
    """A PNG from raw scanlines (filter 0), for what Pillow cannot write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def write_bomb(path: Path, side: int = 20000) -> None:
    """A valid 1-bit grey PNG of side x side pixels, all black: ~50 KB on disk, side^2 bytes once decoded."""
    write_png(path, side, side, 1, 0, itertools.repeat(bytes((side + 7) // 8), side))


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def read_one(tmp_path: Path, write) -> np.ndarray:
    """The one image that write(path) puts in a folder, as read_image_folder returns it at native size."""
    (tmp_path / "images" / "only").mkdir(parents=True)
    write(tmp_path / "images" / "only" / "image.png")
    split, _ = read_image_folder(tmp_path / "images")
    assert split.images.shape[0] == 1 and split.images.dtype == np.uint8 and split.images.shape[-1] == 3
    return split.images[0]


def good_folder(root: Path, per_class: int = 3, size: int = 12) -> None:
    for index, name in enumerate(("apple", "banana", "cherry")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(noise(size, size, seed=10 * index + i)).save(root / name / f"{i:03d}.png")


# --- every mode to 8-bit RGB --------------------------------------------------------------------------


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 257 * 100, 32768, 65535]], dtype=np.uint16)

    def write(path: Path) -> None:
        image = Image.fromarray(values)
        assert image.mode == "I;16"  # Pillow reads it back as I;16 too
        image.save(path)

    image = read_one(tmp_path, write)
    assert image[0, :, 0].tolist() == [0, 1, 100, 128, 255]  # round(v / 257); Pillow's convert gives 0 255 255 ...
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])


def test_16_bit_colour_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    pixels = np.array([[[0, 257, 65535], [257 * 100, 32768, 1000]]], dtype=">u2")  # 1 x 2, big-endian as in PNG
    image = read_one(tmp_path, lambda path: write_png(path, 2, 1, 16, 2, [pixels[0].tobytes()]))
    assert image.tolist() == [[[0, 1, 255], [100, 128, 4]]]


def test_32_bit_integer_and_float_tiffs(tmp_path: Path) -> None:
    integers = np.array([[-5, 0, 257 * 3, 65535, 70000]], dtype=np.int32)  # I: taken as 0..65535, clipped
    floats = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32)  # F: taken as 0..1, clipped
    as_i = read_one(tmp_path / "i", lambda path: Image.fromarray(integers, "I").save(path.with_suffix(".tif")))
    as_f = read_one(tmp_path / "f", lambda path: Image.fromarray(floats, "F").save(path.with_suffix(".tif")))
    assert as_i[0, :, 1].tolist() == [0, 0, 3, 255, 255]
    assert as_f[0, :, 2].tolist() == [0, 0, 128, 255, 255, 0]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    def write(path: Path) -> None:
        image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # left: red
        image.paste((0, 128, 255, 64), (8, 0, 16, 8))  # right: R = 255 * 191 / 255, G = 127 * 191 / 255, B = 0
        image.save(path.with_suffix(".jpg"), quality=100)

    image = read_one(tmp_path, write).astype(int)
    assert np.abs(image[4, 2] - (255, 0, 0)).max() <= 3  # JPEG: close, not exact
    assert np.abs(image[4, 13] - (191, 95, 0)).max() <= 3


def test_palette_png_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    def write(path: Path) -> None:
        image = Image.new("P", (3, 1))
        image.putpalette([0, 0, 0, 255, 0, 0, 200, 0, 0])
        image.putdata([0, 1, 2])
        image.save(path, transparency=bytes([0, 255, 128]))  # entry 0 transparent, 1 opaque, 2 half

    image = read_one(tmp_path, write)
    assert Image.open(tmp_path / "images" / "only" / "image.png").mode == "P"
    # 200 * 128/255 + 255 * 127/255 = 227; 255 * 127/255 = 127. Dropping alpha would give black, red, (200, 0, 0).
    assert image[0].tolist() == [list(WHITE), [255, 0, 0], [227, 127, 127]]


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("RGBA", (0, 0, 255, 0), WHITE),
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
        ("RGBA", (0, 0, 255, 128), (127, 127, 255)),
        ("LA", (0, 128), (127, 127, 127)),
    ],
)
def test_alpha_is_composited_on_white(tmp_path: Path, mode: str, colour: tuple, expected: tuple) -> None:
    image = read_one(tmp_path, lambda path: Image.new(mode, (4, 4), colour).save(path))
    assert tuple(image[2, 2]) == expected


def test_one_bit_and_grey_become_rgb(tmp_path: Path) -> None:
    def write_1bit(path: Path) -> None:
        image = Image.new("1", (2, 1))
        image.putpixel((1, 0), 1)
        image.save(path)

    assert read_one(tmp_path / "1", write_1bit).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    grey = read_one(tmp_path / "L", lambda path: Image.new("L", (2, 2), 77).save(path))
    assert grey.reshape(-1, 3).tolist() == [[77, 77, 77]] * 4


@pytest.mark.parametrize("mode", ["RGB", "P"], ids=["torchvision-png", "pillow-palette-png"])
def test_exif_orientation_is_applied(tmp_path: Path, mode: str) -> None:
    """Orientation 6 (rotate 90 degrees clockwise to display): the same upright result from either decoder."""
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)  # stored top left -> displayed top right
    exif = Image.Exif()
    exif[0x0112] = 6

    def write(path: Path) -> None:
        image = Image.fromarray(pixels)
        (image if mode == "RGB" else image.convert("P")).save(path, exif=exif.tobytes())

    image = read_one(tmp_path, write)
    assert image.shape == (4, 2, 3)
    assert np.argwhere(image[..., 0] == 255).tolist() == [[0, 1]]


# --- unreadable files ----------------------------------------------------------------------------------


def test_pillow_sees_a_bomb(tmp_path: Path) -> None:
    write_bomb(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(Image.DecompressionBombError):  # by Pillow's own limit: a traceback before this change
        Image.open(tmp_path / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 == DataConfig().max_image_pixels  # the default is Pillow's


# Why each is unreadable, as the warning and the error say (a cap of 1000 pixels; the good images are 12 x 12).
REASONS = {
    "bomb": "(400,000,000 pixels, over data.max_image_pixels=1,000)",
    "over the cap": "(1,600 pixels, over data.max_image_pixels=1,000)",
    "truncated jpeg": "(Image is incomplete or truncated)",  # torchvision's words
    "truncated palette png": "(image file is truncated",  # Pillow's
    "not an image": "(not an image Pillow can identify)",
}


def write_bad_files(root: Path) -> dict[str, Path]:
    """Five unreadable files among nine good ones, named so that they sort in this order; the truncated ones
    are within the cap (24 x 24 = 576 pixels)."""
    bad = {
        "bomb": root / "apple" / "a_bomb.png",
        "over the cap": root / "apple" / "b_large.png",  # 40 x 40 = 1600 pixels, between the cap and twice it
        "truncated jpeg": root / "banana" / "c_truncated.jpg",
        "truncated palette png": root / "banana" / "d_truncated.png",
        "not an image": root / "cherry" / "e_notes.png",
    }
    write_bomb(bad["bomb"])
    Image.fromarray(noise(40, 40)).save(bad["over the cap"])
    Image.fromarray(noise(24, 24)).save(bad["truncated jpeg"])
    Image.fromarray(noise(24, 24)).convert("P").save(bad["truncated palette png"])
    for path in (bad["truncated jpeg"], bad["truncated palette png"]):  # the headers whole, the pixels cut
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    bad["not an image"].write_text("this is not an image")
    return bad


def test_unreadable_files_are_skipped_with_a_one_line_warning(tmp_path: Path, capsys) -> None:
    root = tmp_path / "images"
    good_folder(root)
    bad = write_bad_files(root)
    split, classes = read_image_folder(root, max_image_pixels=1000, max_unreadable_fraction=0.4)  # 5 of 14 allowed
    assert split.images.shape == (9, 12, 12, 3)
    assert np.bincount(split.labels).tolist() == [3, 3, 3]
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's limit is set back
    warning = capsys.readouterr().err.strip()
    assert "\n" not in warning
    assert warning.startswith("warning: skipped 5 of 14 image files that cannot be read")
    assert "data.max_unreadable_fraction=0.4 allows 5" in warning
    entries = warning.split("): ", 1)[1].split("; ")
    for entry, name in zip(entries, ("bomb", "over the cap", "truncated jpeg")):  # the first three, then a count
        assert entry.startswith(f"{bad[name]} {REASONS[name]}")
    assert entries[3:] == ["and 2 more"] and str(bad["not an image"]) not in warning


@pytest.mark.parametrize("name", ["bomb", "over the cap", "truncated jpeg", "truncated palette png", "not an image"])
def test_each_unreadable_file_alone_is_named_in_a_one_line_error(tmp_path: Path, name: str) -> None:
    root = tmp_path / "images"
    good_folder(root)
    bad = write_bad_files(root)
    for other, path in bad.items():
        if other != name:
            path.unlink()
    config = DataConfig(source="imagefolder", root=str(root), image_size=None, max_image_pixels=1000)
    with pytest.raises(DatasetError) as caught:  # 1 of 10 is over the default 0.01
        prepare_dataset(config, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"1 of the first {sorted(root.glob('*/*')).index(bad[name]) + 1} of 10 image files")
    assert f"{bad[name]} {REASONS[name]}" in message
    assert "raise data.max_unreadable_fraction" in message
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_the_bomb_is_over_the_default_cap_too(tmp_path: Path) -> None:
    root = tmp_path / "images"
    good_folder(root)
    write_bomb(root / "apple" / "bomb.png")
    with pytest.raises(DatasetError, match=r"bomb\.png \(400,000,000 pixels, over data\.max_image_pixels=89,478,485\)"):
        read_image_folder(root)


def test_the_threshold_both_ways(tmp_path: Path, capsys) -> None:
    root = tmp_path / "images"
    good_folder(root)  # 9 good
    (root / "banana" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # and 1 bad: 10%
    for fraction in (0.1, 0.5):  # 1 of 10 allowed: skipped
        config = DataConfig(source="imagefolder", root=str(root), image_size=None, max_unreadable_fraction=fraction)
        manifest = prepare_dataset(config, tmp_path / f"out{fraction}")
        assert sum(info["count"] for info in manifest.splits.values()) == 9
        assert "skipped 1 of 10 image files" in capsys.readouterr().err
    for fraction in (0.0, 0.09):  # none allowed: an error
        config = DataConfig(source="imagefolder", root=str(root), image_size=None, max_unreadable_fraction=fraction)
        with pytest.raises(DatasetError, match=f"more than data.max_unreadable_fraction={fraction} allows"):
            prepare_dataset(config, tmp_path / "out")


def test_train_and_test_folders_are_each_held_to_the_threshold(tmp_path: Path, capsys) -> None:
    root = tmp_path / "images"
    good_folder(root / "train", per_class=4)
    good_folder(root / "test", per_class=1)
    (root / "train" / "apple" / "zz_broken.png").write_text("not an image")  # 1 of 13 train files
    config = DataConfig(source="imagefolder", root=str(root), image_size=8, max_unreadable_fraction=0.1)
    manifest = prepare_dataset(config, tmp_path / "out")
    assert manifest.splits["test"]["count"] == 3
    assert manifest.splits["train"]["count"] + manifest.splits["val"]["count"] == 12
    assert "zz_broken.png (not an image Pillow can identify)" in capsys.readouterr().err
    (root / "test" / "cherry" / "zz_broken.png").write_text("not an image")  # 1 of 4 test files: over 0.1
    with pytest.raises(DatasetError, match="1 of the first 4 of 4 image files"):
        prepare_dataset(config, tmp_path / "again")


def test_unreadable_fraction_must_be_below_one() -> None:
    with pytest.raises(ValueError, match="max_unreadable_fraction"):
        DataConfig(max_unreadable_fraction=1.0)
    with pytest.raises(ValueError, match="max_image_pixels"):
        DataConfig(max_image_pixels=0)


# --- plain RGB: as before --------------------------------------------------------------------------


def read_as_before(files: list[Path], image_size: int | None) -> np.ndarray:
    """The reader before this change, for JPEG and PNG: torchvision's decoder, a list, then one stack."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import center_crop, resize

    images = []
    for path in files:
        image = decode_image(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if image_size:
            image = center_crop(resize(image, image_size, antialias=True), [image_size, image_size])
        images.append(image)
    return torch.stack(images).permute(0, 2, 3, 1).contiguous().numpy()


@pytest.mark.parametrize("image_size", [None, 8, 20])
def test_plain_rgb_and_grey_images_read_as_before(tmp_path: Path, image_size: int | None) -> None:
    root = tmp_path / "images"
    sizes = [(16, 16)] * 4 if image_size is None else [(16, 16), (24, 13), (11, 30), (17, 17)]
    for index, (height, width) in enumerate(sizes):
        (root / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(noise(height, width, seed=index))
        image.save(root / f"class{index % 2}" / f"{index}.png")
        image.save(root / f"class{index % 2}" / f"{index}.jpg", quality=90)
        image.convert("L").save(root / f"class{index % 2}" / f"{index}_grey.jpg")
    split, _ = read_image_folder(root, image_size)
    expected = read_as_before(sorted(root.glob("*/*")), image_size)
    assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
    assert np.array_equal(split.images, expected)


def test_prepared_splits_are_unchanged_for_plain_images(tmp_path: Path) -> None:
    root = tmp_path / "images"
    good_folder(root, per_class=4, size=20)
    prepare_dataset(DataConfig(source="imagefolder", root=str(root), image_size=8), tmp_path / "out")
    train = load_split(tmp_path / "out", "train")
    expected = read_as_before(sorted(root.glob("*/*")), 8)
    assert all(any(np.array_equal(image, other) for other in expected) for image in train.images)
