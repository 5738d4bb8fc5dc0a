"""The training store schema (ldm.data.store): what the writers write is what readers expect."""
import pickle

import h5py
import numpy as np

from ldm.data import store


def _write(path, n=3, summaries=(["a", "b"], [])):
    tiles = [store.encode_jpeg(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(n)]
    with h5py.File(path, "w") as f:
        store.write_rows(f, tiles, [0, 1, 1][:n], [0.1, 0.9, np.nan][:n], [0.5, 0.2, 0.3][:n])
        store.write_slide_table(f, ["S0", "S1"], list(summaries))
        store.write_attrs(f, {"split": "train", "tile_size": 8})
    return path


def test_written_layout_matches_the_documented_schema(tmp_path):
    path = _write(tmp_path / "train.h5")
    with h5py.File(path, "r") as f:
        assert store.missing_datasets(f) == []
        assert f["images"].dtype == h5py.vlen_dtype(np.uint8) and f["images"].shape == (3,)
        assert f["slide_index"].dtype == np.int32 and f["coords"].dtype == np.int64
        assert f["coords"].shape == (3, 2) and (f["coords"][()] == -1).all()
        assert f["tumor_prob"].dtype == np.float32 and np.isnan(f["tumor_prob"][2])
        assert h5py.check_string_dtype(f["summaries"].dtype).encoding == "utf-8"
        assert f["summaries"].shape == (2, 2) and list(f["n_summaries"][()]) == [2, 0]
        assert store.read_slide_summaries(f) == [["a", "b"], []]
        assert store.read_attrs(f) == {"split": "train", "tile_size": 8,
                                       "format_version": store.FORMAT_VERSION}
        assert store.decode_jpeg(f["images"][1]).shape == (8, 8, 3)
    assert store.store_problem(path) is None


def test_resizable_rows_append_slide_by_slide(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        ds = store.create_row_datasets(f)
        for slide in range(2):
            store.append_rows(ds, {"slide_index": np.full(2, slide, np.int32),
                                   "tumor_prob": np.array([0.2, 0.8], np.float32)})
        assert list(f["slide_index"][()]) == [0, 0, 1, 1]
        assert f["images"].maxshape == (None,) and f["coords"].shape == (0, 2)


def test_store_problems_name_the_file_and_the_missing_datasets(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("images", data=np.zeros(2))
    problem = store.store_problem(bad)
    assert str(bad) in problem and "slide_index" in problem and "§3" in problem
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        store.write_rows(f, [], [], [], [])
        store.write_slide_table(f, [], [])
    assert "empty store (0 patches): nothing to validation on" in store.store_problem(
        empty, "validation")
    (tmp_path / "text.h5").write_text("not hdf5")
    assert "not a readable HDF5 store" in store.store_problem(tmp_path / "text.h5")


def test_lazy_handle_opens_on_use_and_never_pickles_an_open_file(tmp_path):
    lazy = store.LazyFile(_write(tmp_path / "train.h5"))
    assert not lazy.is_open
    assert len(lazy["images"]) == 3 and lazy.is_open
    clone = pickle.loads(pickle.dumps(lazy))  # what a DataLoader worker receives
    assert not clone.is_open and clone.path == lazy.path
    assert len(clone["slides"]) == 2 and clone.is_open
    lazy.close()
    assert not lazy.is_open
