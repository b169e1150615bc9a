"""User data is checked and normalised, each step said in one line: integer ranges, channel-last layouts, the
array of an .npz, tiny data, and files that are not what their suffix says."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from noiserater.trainer.substrate.data import load_dataset, warn_if_tiny

RNG = np.random.default_rng(0)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("noiserater")]


def test_uint8_is_scaled_to_minus_one_one_with_one_line(tmp_path, caplog):
    x = RNG.integers(0, 256, (30, 16), dtype=np.uint8)
    x[0, 0], x[0, 1] = 0, 255
    np.save(tmp_path / "u8.npy", x)
    with caplog.at_level(logging.INFO):
        d = load_dataset(str(tmp_path / "u8.npy"))
    values = np.concatenate([d.train.numpy(), d.val.numpy(), d.test.numpy()])
    assert values.min() == -1.0 and values.max() == 1.0
    assert messages(caplog) == ["u8.npy: uint8 values scaled from [0, 255] to [-1, 1]"]


def test_other_integer_ranges_need_a_flag(tmp_path, caplog):
    np.save(tmp_path / "i64.npy", RNG.integers(0, 17, (30, 4)))
    with pytest.raises(ValueError, match=r"i64.npy: int64 values in \[0, 16\], an unknown range: pass --data-range"):
        load_dataset(str(tmp_path / "i64.npy"))
    with caplog.at_level(logging.INFO):
        d = load_dataset(str(tmp_path / "i64.npy"), value_range="0:16")
    assert d.train.min() >= -1 and d.train.max() <= 1
    assert messages(caplog) == ["i64.npy: int64 values scaled from [0, 16] to [-1, 1]"]
    raw = load_dataset(str(tmp_path / "i64.npy"), value_range="none")
    assert raw.train.max() == 16
    np.save(tmp_path / "signs.npy", RNG.choice([-1, 1], (30, 4)))  # integers within [-1, 1]: as they are
    assert set(load_dataset(str(tmp_path / "signs.npy")).train.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="--data-range: '0-255' is not auto, none or LOW:HIGH"):
        load_dataset(str(tmp_path / "i64.npy"), value_range="0-255")


def test_channel_last_images_are_transposed_with_one_line(tmp_path, caplog):
    x = RNG.standard_normal((30, 8, 6, 3)).astype(np.float32)
    np.save(tmp_path / "nhwc.npy", x)
    with caplog.at_level(logging.INFO):
        d = load_dataset(str(tmp_path / "nhwc.npy"))
    assert d.data_shape == (3, 8, 6)
    assert messages(caplog) == ["nhwc.npy: channel-last (N, H, W, C) [30, 8, 6, 3] transposed to (N, C, H, W) "
                                "[30, 3, 8, 6]"]
    item = np.concatenate([d.train.numpy(), d.val.numpy(), d.test.numpy()])
    assert {tuple(np.round(a.ravel(), 5)) for a in item} == {tuple(np.round(a.transpose(2, 0, 1).ravel(), 5))
                                                            for a in x}
    assert load_dataset(str(tmp_path / "nhwc.npy"), layout="nchw").data_shape == (8, 6, 3)
    np.save(tmp_path / "nchw.npy", RNG.standard_normal((30, 3, 8, 8)).astype(np.float32))
    assert load_dataset(str(tmp_path / "nchw.npy")).data_shape == (3, 8, 8)
    np.save(tmp_path / "cube.npy", RNG.standard_normal((30, 4, 4, 4)).astype(np.float32))  # either: says so
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert load_dataset(str(tmp_path / "cube.npy")).data_shape == (4, 4, 4)
    assert messages(caplog) == ["cube.npy: shape [30, 4, 4, 4] read as (N, C, H, W); pass --layout nhwc if the "
                                "channels are last"]
    assert load_dataset(str(tmp_path / "cube.npy"), layout="nhwc").data_shape == (4, 4, 4)


def test_layout_flag_on_vectors_is_refused(tmp_path):
    np.save(tmp_path / "vec.npy", RNG.standard_normal((30, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=r"vec.npy: --layout nhwc needs an image array"):
        load_dataset(str(tmp_path / "vec.npy"), layout="nhwc")
    with pytest.raises(ValueError, match=r"--layout: 'bogus' is not one of auto, nchw, nhwc"):
        load_dataset(str(tmp_path / "vec.npy"), layout="bogus")


def test_npz_with_several_arrays_needs_key(tmp_path):
    a, b = RNG.standard_normal((30, 4)).astype(np.float32), RNG.standard_normal((30, 2)).astype(np.float32)
    np.savez(tmp_path / "ab.npz", a=a, b=b)
    with pytest.raises(ValueError, match=r"^\S*ab.npz: holds arrays a, b; choose the data with --key NAME$"):
        load_dataset(str(tmp_path / "ab.npz"))
    assert load_dataset(str(tmp_path / "ab.npz"), key="b").data_shape == (2,)
    with pytest.raises(ValueError, match=r"no array 'c' \(arrays: a, b\)"):
        load_dataset(str(tmp_path / "ab.npz"), key="c")
    np.savez(tmp_path / "xy.npz", x=a, y=np.arange(30))  # data + labels by their usual names: no question
    d = load_dataset(str(tmp_path / "xy.npz"))
    assert d.data_shape == (4,) and "train" in d.labels
    np.savez(tmp_path / "one.npz", pixels=a)
    assert load_dataset(str(tmp_path / "one.npz")).data_shape == (4,)
    np.save(tmp_path / "plain.npy", a)
    with pytest.raises(ValueError, match=r"--key b names an array of an .npz archive"):
        load_dataset(str(tmp_path / "plain.npy"), key="b")


@pytest.mark.parametrize("name, content, message", [
    ("text.npy", b"1 2 3\n4 5 6\n", r"text.npy: not a NumPy .npy file \(a text or pickle file\?\); write arrays "
                                    r"with numpy.save$"),
    ("text.npz", b"1 2 3\n", r"text.npz: not a NumPy .npz archive; write arrays with numpy.savez$"),
])
def test_files_that_are_not_numpy_get_one_clear_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(str(tmp_path / name))
    assert "allow_pickle" not in str(info.value) and len(str(info.value).splitlines()) == 1


def test_object_and_truncated_npy_are_one_line(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects.npy: holds Python objects, not a numeric array") as info:
        load_dataset(str(tmp_path / "objects.npy"))
    assert "allow_pickle" not in str(info.value)
    np.save(tmp_path / "full.npy", RNG.standard_normal((300, 4)).astype(np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:500])
    with pytest.raises(ValueError, match=r"cut.npy: cannot read it"):
        load_dataset(str(tmp_path / "cut.npy"))


def test_tiny_data_warns(tmp_path, caplog):
    np.save(tmp_path / "five.npy", RNG.standard_normal((5, 4)).astype(np.float32))
    d = load_dataset(str(tmp_path / "five.npy"))
    with caplog.at_level(logging.INFO):
        assert warn_if_tiny(d, 128) is True
        assert warn_if_tiny(d, 2) is False
    assert messages(caplog) == ["dataset five: 3 training items (of 5), fewer than a batch of 128: every batch "
                                "repeats items"]
    assert caplog.records[0].levelno == logging.WARNING
