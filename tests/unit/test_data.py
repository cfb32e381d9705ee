import gzip
import struct

import numpy as np
import pytest

from sim import data, registry
from sim.errors import ConfigError, DataError


def test_mnist5k_is_a_fixed_4000_1000_split_of_real_digits():
    ds = data.load("mnist5k")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
    assert set(np.unique(ds.y_test)) == set(range(10))
    again = data._mnist5k(None, False)
    assert np.array_equal(again.x_test, ds.x_test) and np.array_equal(again.y_train, ds.y_train)


def test_digits_are_resized_to_mnist_geometry():
    ds = data.load("digits")
    x = ds.all_images()
    assert x.shape == (1797, 1, 28, 28) and x.dtype == np.uint8
    assert x[:, :, :4].max() == 0 and x[:, :, -4:].max() == 0  # the 4-pixel frame around a 20x20 box
    assert x.max() > 200


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_data_root(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 28, 28))
    labels = rng.integers(0, 10, 12)
    for split, n in (("train", 8), ("t10k", 4)):
        sl = slice(0, 8) if split == "train" else slice(8, 12)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs[sl])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[sl])
    ds = data._fashion_mnist(str(tmp_path), False)
    assert ds.x_train.shape == (8, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert np.array_equal(ds.x_test[:, 0], imgs[8:]) and np.array_equal(ds.y_train, labels[:8])


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">BBBBI", 0, 0, 8, 1, 100) + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(path)


def test_missing_fashion_mnist_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}.*dataset-fashion-mnist"):
        data._fashion_mnist(str(tmp_path), False)


def test_missing_torchvision_dataset_names_root_and_download(tmp_path):
    with pytest.raises(DataError, match=f"MNIST not found under data.root='{tmp_path}'.*data.download=true"):
        registry.get("dataset", "mnist")(str(tmp_path), False)


def test_unknown_dataset_lists_known():
    with pytest.raises(ConfigError, match="dataset='imagenet' is not a known dataset; expected one of: mnist5k, "
                                          "digits"):
        data.load("imagenet")


def test_torchvision_reader_path_reads_mnist_files_from_data_root(tmp_path):
    """Users elsewhere bring MNIST through torchvision's own reader: files under ROOT/MNIST/raw."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    imgs, labels = rng.integers(0, 256, (10, 28, 28)), rng.integers(0, 10, 10)
    for split, sl in (("train", slice(0, 6)), ("t10k", slice(6, 10))):
        for kind, arr in (("images-idx3", imgs[sl]), ("labels-idx1", labels[sl])):
            gz = tmp_path / "tmp.gz"
            _write_idx(gz, arr)
            (raw / f"{split}-{kind}-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    ds = data.load("mnist", str(tmp_path))
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert np.array_equal(ds.x_train[:, 0], imgs[:6]) and np.array_equal(ds.y_test, labels[6:])


def test_emnist_letters_reader_untransposes_and_counts_letters_from_zero(tmp_path):
    """The MAD paper's Knockoff pool for MNIST, for users who have it: torchvision's files under ROOT/EMNIST/raw,
    stored transposed and labelled 1 to 26."""
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    imgs, labels = rng.integers(0, 256, (9, 28, 28)), rng.integers(1, 27, 9)
    labels[0] = 26
    for split, sl in (("train", slice(0, 6)), ("test", slice(6, 9))):
        for kind, arr in (("images-idx3", imgs[sl].swapaxes(1, 2)), ("labels-idx1", labels[sl])):
            gz = tmp_path / "tmp.gz"
            _write_idx(gz, arr)
            (raw / f"emnist-letters-{split}-{kind}-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    ds = data.load("emnist_letters", str(tmp_path))
    assert ds.num_classes == 26 and ds.y_train[0] == 25 and np.array_equal(ds.y_test, labels[6:] - 1)
    assert np.array_equal(ds.x_train[:, 0], imgs[:6]) and np.array_equal(ds.x_test[:, 0], imgs[6:])


def test_glyphs_are_typeset_letters_in_mnist_geometry():
    ds = data.load("glyphs")
    x, y = ds.all_images(), np.concatenate([ds.y_train, ds.y_test])
    assert x.shape == (10400, 1, 28, 28) and x.dtype == np.uint8 and ds.num_classes == 26
    assert np.array_equal(np.bincount(y), np.full(26, 400))
    assert len({img.tobytes() for img in x}) == len(x)  # every glyph drawn differently
    ink = x[:, 0].astype(np.float64)
    rows, cols = np.indices((28, 28))
    mass = ink.sum((1, 2))
    assert mass.min() > 0 and x.max() == 255
    centre = np.stack([(ink * rows).sum((1, 2)) / mass, (ink * cols).sum((1, 2)) / mass], 1)
    assert np.abs(centre - 13.5).max() < 1.5  # centred by their centre of mass, as MNIST's digits are
    box = [(np.nonzero(i.any(1))[0], np.nonzero(i.any(0))[0]) for i in x[:200, 0]]
    assert max(max(r[-1] - r[0], c[-1] - c[0]) + 1 for r, c in box) <= 20  # within a 20x20 box
    font = data.glyph_fonts()[0]
    assert np.array_equal(data._glyph("A", font, np.random.default_rng(0)),
                          data._glyph("A", font, np.random.default_rng(0)))  # drawn from the seed alone


def test_a_dataset_without_test_images_and_an_idx_file_of_other_than_bytes_are_refused(tmp_path):
    x = np.zeros((4, 1, 8, 8), np.uint8)
    with pytest.raises(DataError, match="has 4 training and 0 test images"):
        data.from_arrays("d", {"x_train": x, "y_train": np.array([0, 1, 0, 1]), "x_test": x[:0],
                               "y_test": np.zeros(0, int)})
    floats = tmp_path / "x"
    floats.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0D, 1, 2) + bytes(8))  # an IDX file of float32
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        data.read_idx(floats)


def test_run_directories_join_onto_uris_and_file_uris_name_local_paths():
    from sim.storage import join, local_path

    assert join("s3://bucket/run/", "queries") == "s3://bucket/run/queries"
    assert local_path("file:///tmp/run") == "/tmp/run" and local_path("s3://bucket/run") is None
