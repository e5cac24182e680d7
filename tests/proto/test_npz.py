"""proto/npz.py: arrays by name in .npz, any name (np.savez drops one called allow_pickle)."""

from __future__ import annotations

import io

import numpy as np

from gradserve.proto.npz import save_npz


def test_every_name_round_trips_without_pickle():
    arrays = {
        "allow_pickle": np.arange(3.0),  # np.savez(f, **arrays) takes this one as its flag and drops it
        "file": np.ones((2, 2), np.float32),
        "w/0": np.array(7, np.int64),
        "empty": np.zeros((0, 4)),
    }
    buffer = io.BytesIO()
    save_npz(buffer, arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(arrays)
        for name, want in arrays.items():
            assert data[name].dtype == want.dtype and data[name].shape == want.shape
            np.testing.assert_array_equal(data[name], want)
