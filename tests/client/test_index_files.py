"""The files `iei embed` writes and `iei similar` reads (`index_files.py`), without a server."""

from __future__ import annotations

import numpy as np
import pytest
from iei.client import index_files
from iei.client.index_files import BulkError, load_index, write_index

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_an_index_reads_back_as_written(tmp_path, suffix):
    out = tmp_path / f"index{suffix}"
    vectors = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    write_index(out, [f"p{i}" for i in range(5)], vectors)
    paths, read, _ = load_index(out)
    assert paths == [f"p{i}" for i in range(5)]
    assert read.dtype == np.float32 and np.array_equal(read, vectors)


def test_a_parquet_of_variable_lists_from_another_writer_reads_too(tmp_path):
    out = tmp_path / "other.parquet"
    table = pa.table({"path": ["a", "b"], "embedding": pa.array([[1.0, 2.0], [3.0, 4.0]])})
    pq.write_table(table, out)
    paths, vectors, _ = load_index(out)
    assert paths == ["a", "b"] and vectors.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_an_index_of_nothing_is_refused_in_one_line(tmp_path):
    out = tmp_path / "empty.parquet"
    embedding = pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), 4)
    pq.write_table(pa.table({"path": pa.array([], pa.string()), "embedding": embedding}), out)
    with pytest.raises(BulkError, match="holds no vectors"):
        load_index(out)


def test_a_wrong_suffix_names_the_argument_it_came_from(tmp_path):
    with pytest.raises(BulkError, match=r"^--index must end in"):
        load_index(tmp_path / "vectors.txt")


def test_a_failed_write_leaves_no_temporary_file_and_the_old_index(tmp_path, monkeypatch):
    out = tmp_path / "index.npy"
    write_index(out, ["old"], np.ones((1, 3), np.float32))

    def disk_full(file, array):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_files.np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_index(out, ["new"], np.zeros((1, 3), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.ids.json", "index.npy"]
    monkeypatch.undo()
    assert load_index(out)[0] == ["old"]


def text_named_npy(out):
    out.write_text("hello\n")
    out.with_suffix(".ids.json").write_text('["a"]')


def truncated_ids(out):
    np.save(out, np.ones((2, 3), np.float32))
    out.with_suffix(".ids.json").write_text('["a", "b')


def ids_not_a_list(out):
    np.save(out, np.ones((1, 3), np.float32))
    out.with_suffix(".ids.json").write_text('{"a": 1}')


def two_byte_parquet(out):
    out.write_bytes(b"PA")


def foreign_parquet(out):
    pq.write_table(pa.table({"name": ["a"], "vector": [[1.0]]}), out)


@pytest.mark.parametrize(
    ("name", "write"),
    [("index.npy", text_named_npy), ("index.npy", truncated_ids), ("index.npy", ids_not_a_list),
     ("index.parquet", two_byte_parquet), ("index.parquet", foreign_parquet)],
    ids=["text.npy", "truncated-ids", "ids-not-a-list", "2-byte-parquet", "foreign-parquet"],
)  # fmt: skip
def test_a_corrupt_or_foreign_index_is_refused_in_one_line(tmp_path, name, write):
    out = tmp_path / name
    write(out)
    with pytest.raises(BulkError, match=r"^\S+: not an index written by iei embed \(.+\)$"):
        load_index(out)


@pytest.mark.parametrize("cut_at", [1, 2])
def test_a_write_cut_short_never_pairs_vectors_with_the_wrong_paths(tmp_path, monkeypatch, cut_at):
    out = tmp_path / "index.npy"
    old = (["old0", "old1"], np.zeros((2, 3), np.float32))
    new = (["new0", "new1"], np.ones((2, 3), np.float32))
    write_index(out, *old)
    renames = []

    def replace_until_cut(source, target):
        renames.append(target)
        if len(renames) == cut_at:
            raise OSError(5, "Input/output error")  # the machine stops here
        real_replace(source, target)

    real_replace = index_files.os.replace
    monkeypatch.setattr(index_files.os, "replace", replace_until_cut)
    with pytest.raises(OSError):
        write_index(out, *new)
    try:
        paths, vectors, _ = load_index(out)
    except BulkError as exc:
        assert "are missing" in str(exc)
    else:
        assert (paths, vectors.tolist()) in [(p, v.tolist()) for p, v in (old, new)]
