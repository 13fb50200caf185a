"""`iei embed --ray` without Ray: listing and reading local paths and URIs, the output folder's
resume bookkeeping, and the arguments refused before Ray starts."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from iei.cli import main, parser  # noqa: E402
from iei.client.bulk import find_images  # noqa: E402
from iei.client.index_files import BulkError  # noqa: E402
from iei.ray.files import list_roots, locate, read_file, walk_folder  # noqa: E402
from iei.ray.job import prepare_output, read_written  # noqa: E402
from pyarrow.fs import LocalFileSystem  # noqa: E402


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "z").mkdir()
    for name in ("top.JPG", "a/one.png", "a/deep/two.webp", "z/three.gif", "a/notes.txt"):
        (root / name).write_bytes(name.encode())
    (root / "gone.png").symlink_to(root / "nowhere.png")
    (root / "linked").symlink_to(root / "z")  # a link to a folder is not followed
    return root


def listed(roots: list[str]) -> list[str]:
    files, folders = list_roots(roots)
    return sorted([*files, *(f for folder in folders for f in walk_folder(folder))])


def test_a_local_folder_lists_the_files_iei_embed_walks(tree):
    assert listed([str(tree)]) == sorted(find_images([tree]))
    files, folders = list_roots([str(tree)])
    assert folders == [str(tree / "a"), str(tree / "z")]  # each walked by a task of its own
    assert str(tree / "gone.png") in files  # reported as unreadable, as iei embed does


def test_a_uri_names_its_files_by_uri(tree):
    (tree / "linked").unlink()  # links are a local filesystem's (pyarrow's file:// follows them)
    for scheme in ("file", "local"):  # pyarrow's filesystem, fsspec's
        names = listed([f"{scheme}://{tree}"])
        assert names == sorted(f"{scheme}://{p}" for p in find_images([tree]) if "gone" not in p)
        content = read_file(names[0])
        assert content.content == Path(names[0].split("://", 1)[1]).read_bytes()
        assert content.sha256 == hashlib.sha256(content.content).hexdigest()


def test_a_relative_path_becomes_absolute_and_a_missing_one_is_refused(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert locate("a").path == str(tree / "a")
    with pytest.raises(BulkError, match="no such file or folder"):
        list_roots(["missing"])
    with pytest.raises(BulkError, match="no such file or folder"):
        list_roots([f"file://{tree}/missing"])


def test_overlapping_roots_list_each_file_once(tree):
    """`photos photos/a`: a.png was listed as a file of one root and walked in the other's
    folder, so it was embedded and written twice."""
    (tree / "a" / "named.txt").write_bytes(b"named, whatever its suffix")
    names = listed([str(tree), str(tree / "a"), str(tree / "a" / "one.png"),
                    str(tree / "a" / "named.txt")])  # fmt: skip
    assert len(names) == len(set(names))
    assert names == sorted([*find_images([tree]), str(tree / "a" / "named.txt")])


@pytest.mark.parametrize(
    "uri", ["hdfs://namenode:8020/photos", "abfs://c@a.dfs.core.windows.net/x"]
)
def test_schemes_whose_rows_would_lose_their_host_are_refused(uri):
    with pytest.raises(BulkError, match="not supported by --ray"):
        list_roots([uri])


def test_a_resumed_listing_leaves_out_the_files_done_by_their_keys(tree):
    from iei.ray.job import expand, sorted_keys

    walked = walk_folder(str(tree / "a"))
    assert len(walked) == 2
    done = sorted_keys([walked[1], "s3://elsewhere/x.jpg", str(tree / "z" / "three.gif")])
    assert expand({"name": str(tree / "a"), "folder": True}, done) == [{"path": walked[0]}]
    assert expand({"name": walked[1], "folder": False}, done) == []
    nothing = sorted_keys([])
    assert expand({"name": str(tree / "a"), "folder": True}, nothing) == [
        {"path": p} for p in walked
    ]


def test_an_unreadable_file_is_a_reason_not_an_exception(tree):
    assert read_file(str(tree / "gone.png")).error == "cannot read: No such file or directory"
    assert read_file(str(tree / "gone.png")).sha256 is None


def part(folder: Path, name: str, rows: list[tuple[str, list[float] | None, str | None]]) -> Path:
    table = pa.table(
        {
            "path": [r[0] for r in rows],
            "embedding": pa.array([r[1] for r in rows], pa.list_(pa.float32())),
            "sha256": ["0" * 64] * len(rows),
            "error": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    folder.mkdir(exist_ok=True)
    pq.write_table(table, folder / name)
    return folder / name


def test_resume_keeps_vectors_drops_errors_and_files_cut_short(tmp_path, caplog):
    out = tmp_path / "vectors"
    part(out, "clean.parquet", [("a", [1.0], None), ("b", [2.0], None)])
    mixed = part(out, "mixed.parquet", [("c", [3.0], None), ("d", None, "not an image")])
    errors_only = part(out, "bad.parquet", [("e", None, "cannot read: gone")])
    (out / "cut.parquet").write_bytes(b"PAR1 and then nothing")
    with pytest.raises(BulkError, match="--resume"):
        prepare_output(str(out), resume=False, overwrite=False)
    with caplog.at_level(logging.WARNING, "iei"):
        done = prepare_output(str(out), resume=True, overwrite=False)
    assert done == {"a", "b", "c"}
    assert "cut.parquet: unreadable" in caplog.text and not (out / "cut.parquet").exists()
    assert not errors_only.exists()
    assert pq.read_table(mixed).column("path").to_pylist() == ["c"]
    assert prepare_output(str(out), resume=False, overwrite=True) == set()
    assert list(out.iterdir()) == []


def test_overwrite_removes_the_results_only(tmp_path):
    """It emptied the whole folder (photos, notes, folders) once it held one Parquet file; then
    it still removed the Parquet files of subfolders (another table's), where the job writes
    none."""
    out = tmp_path / "data"
    part(out, "old.parquet", [("a", [1.0], None)])
    (out / "sub").mkdir()
    part(out / "sub", "nested.parquet", [("b", [2.0], None)])
    (out / "old.parquet.partial").write_bytes(b"a killed rewrite")
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "photo.jpg").write_bytes(b"mine too")
    assert prepare_output(str(out), resume=False, overwrite=True) == set()
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["notes.txt", "sub", "sub/nested.parquet", "sub/photo.jpg"]


def test_overwrite_refuses_a_parquet_file_of_another_writer_and_removes_nothing(tmp_path):
    out = tmp_path / "lake"
    ours = part(out, "ours.parquet", [("a", [1.0], None)])
    pq.write_table(pa.table({"id": [1]}), out / "theirs.parquet")
    with pytest.raises(BulkError, match=r"not written by `iei embed --ray`.*nothing was removed"):
        prepare_output(str(out), resume=False, overwrite=True)
    assert ours.exists() and (out / "theirs.parquet").exists()


def test_a_file_too_large_for_an_image_is_a_reason_not_read_whole(tree, monkeypatch):
    """One of 2 GiB or more failed the job (Arrow's binary column) on every --resume."""
    monkeypatch.setattr("iei.ray.files.MAX_FILE_BYTES", 7)
    assert read_file(str(tree / "top.JPG")).content == b"top.JPG"  # 7 bytes: at the limit
    read = read_file(str(tree / "a" / "one.png"))  # 9 bytes
    assert (read.content, read.sha256, read.error) == (b"", None, "too large: over 0 MiB")


def test_a_block_s_files_are_a_large_binary_column(tree):
    from iei.ray.job import read_batch

    batch = read_batch(pa.table({"path": [str(tree / "top.JPG"), str(tree / "gone.png")]}))
    assert batch.schema.field("bytes").type == pa.large_binary()
    assert batch.column("bytes").to_pylist() == [b"top.JPG", b""]


def test_a_cluster_s_actors_get_the_driver_s_model_settings_and_hub_token(monkeypatch):
    """A node's workers see that node's environment only: IEI_POOLING=cls given to the driver
    was not the actors' pooling; a local Ray's workers inherit the driver's."""
    ray = pytest.importorskip("ray")
    from iei.ray.job import connect

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("IEI_POOLING", "cls")
    monkeypatch.setenv("IEI_MAX_IMAGE_PIXELS", "1000000")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("IEI_API_KEY", "not the model's")  # the frontend's: not forwarded
    assert connect("auto", 4) and connect("local", 4)
    forwarded = calls[0]["runtime_env"]["env_vars"]
    assert forwarded["IEI_POOLING"] == "cls" and forwarded["HF_TOKEN"] == "hf_secret"  # noqa: S105
    assert forwarded["IEI_MAX_IMAGE_PIXELS"] == "1000000" and "IEI_API_KEY" not in forwarded
    assert calls[1] == {"num_cpus": 4, "include_dashboard": False}


def test_a_submitted_job_s_own_env_vars_are_not_named_again(monkeypatch):
    """A driver run as a Ray job (a RayJob's entrypoint) has its job's env_vars in its
    environment: ray.init refuses a runtime_env naming one again ('Failed to merge')."""
    import json

    from iei.ray.job import forwarded_environment

    job = {"runtime_env": {"env_vars": {"IEI_DTYPE": "bfloat16"}, "pip": ["x"]}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setenv("IEI_DTYPE", "bfloat16")
    monkeypatch.setenv("IEI_POOLING", "cls")
    forwarded = forwarded_environment()
    assert "IEI_DTYPE" not in forwarded and forwarded["IEI_POOLING"] == "cls"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert forwarded_environment()["IEI_DTYPE"] == "bfloat16"


def test_a_wrong_input_path_removes_nothing_with_overwrite(tmp_path, caplog):
    out = tmp_path / "vectors"
    old = part(out, "old.parquet", [("a", [1.0], None)])
    with caplog.at_level(logging.ERROR, "iei"):
        status = main(["embed", str(tmp_path / "typo"), "--out", str(out), "--ray",
                       "--model", "x", "--overwrite"])  # fmt: skip
    assert status == 2 and "no such file or folder" in caplog.text
    assert old.exists()


def test_resume_removes_a_killed_rewrite_and_keeps_files_the_store_would_not_read(tmp_path):
    out = tmp_path / "vectors"
    good = part(out, "good.parquet", [("a", [1.0], None)])
    (out / "good.parquet.partial").write_bytes(b"a rewrite cut short")
    assert prepare_output(str(out), resume=True, overwrite=False) == {"a"}
    assert not (out / "good.parquet.partial").exists()

    class Throttled:  # the store refuses the reads (a throttled S3: its OSError)
        def __init__(self) -> None:
            self.local = LocalFileSystem()

        def __getattr__(self, name: str):
            return getattr(self.local, name)

        def open_input_file(self, path: str):
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: reduce your rate")

    with pytest.raises(BulkError, match=r"SLOW_DOWN.*nothing was removed"):
        read_written(Throttled(), str(out), repair=True, paths=True)
    assert good.exists()


def test_a_parquet_file_of_another_writer_is_not_deleted_by_resume(tmp_path):
    out = tmp_path / "vectors"
    out.mkdir()
    pq.write_table(pa.table({"id": [1], "error": pa.array([None], pa.string())}), out / "x.parquet")
    with pytest.raises(BulkError, match="not written by `iei embed --ray`"):
        prepare_output(str(out), resume=True, overwrite=False)
    assert (out / "x.parquet").exists()


def test_the_summary_counts_vectors_and_errors_from_the_files(tmp_path):
    out = tmp_path / "vectors"
    part(out, "one.parquet", [("a", [1.0], None), ("b", None, "not an image")])
    part(out, "two.parquet", [("c", [3.0], None)])
    written = read_written(LocalFileSystem(), str(out), repair=False, paths=False)
    assert written.vectors == 2 and written.errors == [("b", "not an image")]


def test_a_file_for_out_is_refused(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(BulkError, match="is a file"):
        prepare_output(str(tmp_path / "x.parquet"), resume=False, overwrite=False)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--ray"], "--ray needs --model MODEL"),
        (["--url", "http://127.0.0.1:9"], "URIs need a Ray Data job"),
    ],
)
def test_arguments_refused_before_ray_starts(tmp_path, caplog, arguments, message):
    source = "s3://bucket/photos" if "URIs" in message else str(tmp_path)
    with caplog.at_level(logging.ERROR, "iei"):
        status = main(["embed", source, "--out", str(tmp_path / "out"), *arguments])
    assert status == 2
    assert message in caplog.text


def test_with_url_model_names_one_of_the_services_models(tmp_path):
    """`--ray --url URL --model NAME`: the actors call the service and name its model NAME (as
    `iei embed --model` does without Ray); without --url, --model is the model in the actors."""
    from iei.ray.actors import ServiceEmbedder

    embedder = ServiceEmbedder("http://127.0.0.1:9", model="dino")
    assert embedder.client._core.model == "dino"
    assert ServiceEmbedder("http://127.0.0.1:9").client._core.model is None


def nodes(*resources: dict[str, float]) -> list[dict]:
    return [{"Alive": True, "Resources": r} for r in resources]


@pytest.mark.parametrize(
    ("cluster", "model_mode", "actors", "actor_cpus", "expected"),
    [
        (nodes({"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}), True, None, None, (4, 1, 1)),
        (nodes({"CPU": 8}, {"CPU": 8}), True, None, None, (2, 0, 8)),  # one per node, its cores
        (nodes({"CPU": 8}), True, 2, None, (2, 0, 4)),  # actors share a node's cores
        (nodes({"CPU": 8}), True, 3, 2, (3, 0, 2)),
        (nodes({"CPU": 8}, {"CPU": 4}), False, None, None, (2, 0, 0)),  # a service actor a node
        # KubeRay's head started with num-cpus 0 runs no model actor: 2 actors of 16 threads
        (nodes({"memory": 8e9}, {"CPU": 16}, {"CPU": 16}), True, None, None, (2, 0, 16)),
        (nodes({"CPU": 0}, {"CPU": 16}, {"CPU": 16}), True, None, None, (2, 0, 16)),
    ],
)
def test_actors_are_sized_from_the_cluster(
    monkeypatch, cluster, model_mode, actors, actor_cpus, expected
):
    ray = pytest.importorskip("ray")
    from iei.ray.job import layout

    monkeypatch.setattr(ray, "nodes", lambda: cluster)
    assert layout(model_mode, actors, actor_cpus) == expected


@pytest.mark.parametrize(
    ("actors", "concurrency", "expected"),
    [(3, 4, (3, 1)), (8, 4, (4, 1)), (5, 32, (5, 6)), (1, 32, (1, 32)), (2, 1, (1, 1))],
)
def test_service_actors_never_have_more_than_concurrency_requests_in_flight(
    actors, concurrency, expected
):
    from iei.ray.job import requests_in_flight

    assert requests_in_flight(actors, concurrency) == expected
    shown, each = expected
    assert shown * each <= concurrency


def test_a_failed_job_names_the_task_s_own_error():
    from iei.ray.job import first_line

    class UserCodeException(Exception):  # Ray's wrapper: its text is a hint, the cause is ours
        pass

    error = "iei.client.errors.UnavailableError: 503 Unhealthy: the inference server is unreachable"
    remote = f"ray::MapWorker(ServiceEmbedder).submit()\n  File ...\n{error}"
    try:
        try:
            raise RuntimeError(remote)
        except RuntimeError as exc:
            raise UserCodeException("To change retry attempts, configure DataContext") from exc
    except UserCodeException as exc:
        assert first_line(exc) == error
    assert first_line(ValueError("plain\nmore")) == "ValueError: plain"


def test_retries_default_to_more_with_ray():
    from iei.cli import parser

    args = parser().parse_args(["embed", "x", "--out", "y", "--ray"])
    assert args.retries is None and args.ray == "local"  # the job reads None as RAY_RETRIES


def test_resume_refuses_vectors_of_another_model_and_removes_nothing(tmp_path):
    """A resumed job with another --model (or --raw) mixed two models' vectors in one folder."""
    from iei.ray.job import JOB_FILE, job_identity, record_job

    out = tmp_path / "vectors"
    mixed = part(out, "mixed.parquet", [("c", [3.0], None), ("d", None, "not an image")])
    args = parser().parse_args(["embed", "x", "--out", str(out), "--ray", "--model", "vit"])
    first = job_identity(args)
    record_job(str(out), first)
    assert pq.read_table(out).num_rows == 2  # readers skip the job's file
    other = {**first, "model": "clip"}
    with pytest.raises(BulkError, match=r"holds vectors of model vit \(normalised\); this job "
                       r"makes model clip \(normalised\)"):  # fmt: skip
        prepare_output(str(out), resume=True, overwrite=False, job=other)
    with pytest.raises(BulkError, match="raw"):
        prepare_output(str(out), resume=True, overwrite=False, job={**first, "normalize": False})
    assert pq.read_table(mixed).num_rows == 2  # its error row not dropped yet
    assert prepare_output(str(out), resume=True, overwrite=False, job=first) == {"c"}
    (out / JOB_FILE).unlink()  # a folder from before the job's file: taken as it is
    assert prepare_output(str(out), resume=True, overwrite=False, job=other) == {"c"}


def test_a_file_name_that_is_not_utf8_is_listed_printable_and_read_by_its_bytes(tmp_path):
    """Arrow strings are UTF-8: such a name failed the listing's block, and the job with it, on
    every --resume. It is listed as `iei embed` records it, and read from the real file."""
    from iei.ray.job import read_batch

    folder = tmp_path / "archive"
    (folder / "caf\udce9").mkdir(parents=True)  # the bytes b"caf\xe9", as os.walk names them
    (folder / "caf\udce9" / "\udcff.jpg").write_bytes(b"latin-1 name")
    (folder / "top\udce9.jpg").write_bytes(b"top")
    names = listed([str(folder)])
    assert names == [f"{folder}/caf\\xe9/\\xff.jpg", f"{folder}/top\\xe9.jpg"]
    batch = read_batch(pa.table({"path": names}))  # an Arrow string column: it failed here
    assert batch.column("bytes").to_pylist() == [b"latin-1 name", b"top"]
    assert batch.column("error").to_pylist() == [None, None]
