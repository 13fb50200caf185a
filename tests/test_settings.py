"""The settings table (`iei.settings.SETTINGS`) is the one declaration: the parts' classes, the
model, and the README follow it; values are validated and nonsense is refused by name."""

from __future__ import annotations

import logging
import os
import re
import socket
import types
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from fake_pb_utils import install
from iei import settings as table
from iei.launcher.settings import LauncherSettings
from iei.server.settings import ServerSettings
from pydantic import SecretStr, ValidationError
from stack import free_port

ROOT = Path(__file__).resolve().parents[1]
PYTHON_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "path": Path}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("IEI_") or name == "IMAGE_EMBEDDING_MODEL":
            monkeypatch.delenv(name)


def field_type(annotation: object) -> str:
    """A pydantic annotation in the table's words ("int", "a|b", "secret"...)."""
    if get_origin(annotation) in (types.UnionType, typing.Union):
        [annotation] = [a for a in get_args(annotation) if a is not type(None)]
        return field_type(annotation)
    if get_origin(annotation) is Literal:
        return "|".join(get_args(annotation))
    if annotation is SecretStr:
        return "secret"
    return {v: k for k, v in PYTHON_TYPES.items()}[annotation]


@pytest.mark.parametrize(
    ("cls", "parts"),
    [(ServerSettings, {table.SERVER}), (LauncherSettings, set(table.SETTINGS_READERS))],
)
def test_each_class_declares_exactly_the_settings_its_part_reads(cls, parts):
    expected = {name for name, s in table.SETTINGS.items() if parts & set(s.readers)}
    assert set(cls.model_fields) == expected


@pytest.mark.parametrize("name", sorted(table.SETTINGS))
def test_each_field_takes_name_default_and_type_from_the_table(name):
    entry = table.SETTINGS[name]
    field = LauncherSettings.model_fields[name]
    assert field.default == entry.default
    assert entry.env in field.validation_alias.choices
    assert field_type(field.annotation) == entry.type
    assert field.description == entry.description


def test_the_model_reads_the_tables_model_settings_with_the_same_defaults():
    install()
    from iei_runtime.settings import SETTINGS

    by_env = dict(SETTINGS.values())
    expected = table.read_by(table.MODEL)
    assert set(by_env) == {s.env for s in expected.values()}
    for entry in expected.values():
        assert by_env[entry.env] == table.as_env_value(entry.default), entry.env


def test_the_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert table.markdown_table() in readme, "regenerate it: python -m iei.settings"


def test_defaults():
    settings = LauncherSettings()
    assert settings.embedding_model == "google/vit-base-patch16-224"
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.triton_endpoint == "127.0.0.1:8100"
    assert settings.dtype == "auto"
    assert settings.pooling == "auto"
    assert settings.max_client_batch_size == 64
    assert settings.max_image_pixels == 50_000_000
    assert settings.repository.joinpath("iei", "config.pbtxt").is_file()


def test_environment(monkeypatch):
    monkeypatch.setenv("IMAGE_EMBEDDING_MODEL", "/models/vit")
    monkeypatch.setenv("IEI_BIND", "[::]:9000")
    monkeypatch.setenv("IEI_WORKERS", "4")
    monkeypatch.setenv("IEI_CONCURRENCY_LEVEL", "8")
    monkeypatch.setenv("IEI_TRITON_URL", "http://triton:8000/")
    monkeypatch.setenv("IEI_DTYPE", "bfloat16")
    settings = LauncherSettings()
    assert settings.embedding_model == "/models/vit"
    assert (settings.host, settings.port) == ("::", 9000)
    assert settings.workers == "4"
    assert settings.concurrency_level == 8
    assert settings.triton_endpoint == "triton:8000"
    assert settings.dtype == "bfloat16"


def test_a_limit_that_counts_images_is_named_for_images_and_its_old_name_still_works(
    monkeypatch,
):
    monkeypatch.setenv("IEI_MAX_CLIENT_BATCH_SIZE", "4")
    monkeypatch.setenv("IEI_MAX_CONCURRENT_REQUESTS", "7")
    assert ServerSettings().max_concurrent_images == 7
    monkeypatch.setenv("IEI_MAX_CONCURRENT_IMAGES", "9")
    assert ServerSettings().max_concurrent_images == 9  # the new name wins


def test_empty_variables_mean_default(monkeypatch):
    monkeypatch.setenv("IEI_WORKERS", "")
    assert LauncherSettings().workers == "auto"
    monkeypatch.setenv("IEI_WORKERS", "  \n")  # only whitespace: empty too
    assert LauncherSettings().workers == "auto"


def test_values_are_stripped_of_surrounding_whitespace(monkeypatch):
    """A key from a file keeps its newline (`kubectl create secret --from-file`): it locked
    every route; a model id with a trailing space was half accepted."""
    monkeypatch.setenv("IEI_API_KEY", "secret\n")
    monkeypatch.setenv("IMAGE_EMBEDDING_MODEL", " openai/clip-vit-base-patch32 ")
    settings = ServerSettings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "secret"
    assert settings.embedding_model == "openai/clip-vit-base-patch32"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IEI_BIND", "8000"),
        ("IEI_BIND", "host:http"),
        ("IEI_BIND", "0.0.0.0:70000"),
        ("IEI_BIND", "::1"),  # was host ":", port 1
        ("IEI_BIND", "::1:8000"),
        ("IEI_BIND", "[127.0.0.1]:8000"),
        ("IEI_BIND", "[localhost]:8000"),
        ("IEI_WORKERS", "0"),
        ("IEI_WORKERS", "two"),
        ("IEI_CONCURRENCY_LEVEL", "-1"),
        ("IEI_DTYPE", "float8"),
        ("IEI_POOLING", "max"),
        ("IEI_TRITON_URL", "grpc://triton:8001"),
        ("IEI_TRITON_URL", "triton"),
        ("IEI_TRITON_URL", ":8100"),
        ("IEI_TRITON_URL", "triton:99999"),
        ("IEI_SERVED_MODEL_NAME", "my model"),
        ("IEI_REQUEST_TIMEOUT", "0"),
        ("IEI_MAX_IMAGE_PIXELS", "0"),
        ("IEI_FORWARD_BATCH_SIZE", "0"),
        ("IEI_FORWARD_THREADS", "-2"),
        ("IEI_JPEG_DRAFT", "maybe"),
    ],
)
def test_nonsense_is_refused_by_the_variables_name(monkeypatch, caplog, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        LauncherSettings()
    with caplog.at_level(logging.ERROR, "iei"), pytest.raises(SystemExit) as stopped:
        table.load(LauncherSettings)
    assert stopped.value.code == 2
    assert re.search(rf"invalid setting {name}: ", caplog.text), caplog.text


@pytest.mark.parametrize(
    ("name", "value", "most"),
    [
        ("IEI_FORWARD_BATCH_SIZE", "20000", "64 (the model's max_batch_size)"),
        ("IEI_FORWARD_THREADS", "4096", "CORES (the cores here)"),
    ],
)
def test_forward_counts_are_bounded_as_the_model_bounds_them(
    monkeypatch, caplog, name, value, most
):
    """20000 images per pass was accepted, and the model's load failed in its allocator."""
    from iei.launcher.repository import available_cores, shipped_model_repository

    most = most.replace("CORES", str(available_cores(shipped_model_repository())))
    monkeypatch.setenv(name, value)
    with caplog.at_level(logging.ERROR, "iei"), pytest.raises(SystemExit) as stopped:
        table.load(LauncherSettings)
    assert stopped.value.code == 2
    assert f"{name}={value}: expected auto or a count from 1 to {most}" in caplog.text
    monkeypatch.setenv(name, "1")
    assert getattr(LauncherSettings(), name.removeprefix("IEI_").lower()) == "1"


def test_a_served_name_that_is_another_models_name_is_refused(monkeypatch, caplog):
    """It was added to the default model's names, but a request naming it got the other one."""
    monkeypatch.setenv("IEI_MODELS", "a=org/vit,b=org/dino")
    monkeypatch.setenv("IEI_SERVED_MODEL_NAME", "b")
    with caplog.at_level(logging.ERROR, "iei"), pytest.raises(SystemExit):
        table.load(ServerSettings)
    assert "IEI_SERVED_MODEL_NAME=b" in caplog.text and "another model" in caplog.text


def test_the_frontend_app_reports_an_invalid_variable_in_one_line(monkeypatch, caplog):
    """The frontend's container starts uvicorn on create_app: it printed pydantic's traceback."""
    from iei.server.app import create_app

    # create_app gives the `iei` logger a worker's handler and stops its propagation (once per
    # process: an earlier test may have done it): caplog's handler goes on the logger itself.
    logger = logging.getLogger("iei")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, caplog.handler])
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setenv("IEI_CONCURRENCY_LEVEL", "0")
    with pytest.raises(SystemExit) as stopped:
        create_app()
    assert stopped.value.code == 2
    assert "invalid setting IEI_CONCURRENCY_LEVEL: " in caplog.text


def test_the_api_key_is_never_shown(monkeypatch):
    monkeypatch.setenv("IEI_API_KEY", "s3cret")
    shown = LauncherSettings().shown()
    assert shown["api_key"] == "set (hidden)"
    assert "s3cret" not in repr(shown)


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"IEI_MAX_CLIENT_BATCH_SIZE": "100", "IEI_MAX_CONCURRENT_IMAGES": "50"},
         "IEI_MAX_CLIENT_BATCH_SIZE=100 (inputs a request may carry) is more than "
         "IEI_MAX_CONCURRENT_IMAGES=50"),
        ({"IEI_PAYLOAD_LIMIT": "2000000", "IEI_BODY_WORKER_MAX_BYTES": "1000000"},
         "IEI_PAYLOAD_LIMIT=2000000 (bytes of one request body) is more than "
         "IEI_BODY_WORKER_MAX_BYTES=1000000"),
        ({"IEI_URL_MAX_BYTES": "2000000", "IEI_URL_REQUEST_MAX_BYTES": "1000000"},
         "IEI_URL_MAX_BYTES=2000000"),
        ({"IEI_URL_MAX_BYTES": "1000000", "IEI_URL_REQUEST_MAX_BYTES": "9000000",
          "IEI_URL_WORKER_MAX_BYTES": "8000000"},
         "is more than IEI_URL_WORKER_MAX_BYTES=8000000"),
    ],
)  # fmt: skip
def test_settings_that_contradict_each_other_stop_start_up_with_one_line(
    monkeypatch, caplog, variables, named
):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.ERROR, "iei"), pytest.raises(SystemExit):
        table.load(LauncherSettings)
    [line] = caplog.messages
    assert line.startswith("invalid settings: ") and named in line


def stray_variables() -> dict[str, str]:
    """Every name a setting is not documented under: the field's name in both cases, and the
    documented names in lower case (pydantic-settings took them all)."""
    stray = {}
    for name, entry in table.SETTINGS.items():
        lower = [entry.env.lower(), *(alias.lower() for alias in entry.aliases)]
        for variable in (name, name.upper(), *lower):
            stray[variable] = "oops"
    return stray


@pytest.mark.parametrize(
    ("variable", "value"),
    [("API_KEY", "oops"), ("ALLOW_PRIVATE_URLS", "true"), ("TRITON_URL", "elsewhere:1"),
     ("WORKERS", "9"), ("PAYLOAD_LIMIT", "2048"), ("api_key", "oops"), ("iei_api_key", "oops")],
)  # fmt: skip
def test_a_variable_without_its_documented_name_is_not_read(monkeypatch, variable, value):
    defaults = LauncherSettings().model_dump()
    monkeypatch.setenv(variable, value)
    assert LauncherSettings().model_dump() == defaults
    assert ServerSettings().api_key is None


def test_only_the_documented_names_and_aliases_are_read_by_the_frontend_and_launcher(monkeypatch):
    defaults = LauncherSettings().model_dump()
    for variable, value in stray_variables().items():
        monkeypatch.setenv(variable, value)
    assert LauncherSettings().model_dump() == defaults  # "oops" would not even validate
    assert ServerSettings().model_dump() == ServerSettings.model_validate({}).model_dump()
    monkeypatch.setenv("IEI_API_KEY", "k")
    monkeypatch.setenv("IEI_WORKERS", "3")
    monkeypatch.setenv("IEI_MAX_CONCURRENT_REQUESTS", "99")  # the older name of ..._IMAGES
    settings = LauncherSettings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"
    assert (settings.workers, settings.max_concurrent_images) == ("3", 99)
    assert LauncherSettings(workers=5).workers == "5"  # code may still pass the field's name


def test_only_the_documented_names_are_read_by_the_model():
    install()
    from iei_runtime.settings import read_settings

    defaults = read_settings({}, {})
    assert read_settings({}, stray_variables()) == defaults
    documented = read_settings({}, {"IEI_DTYPE": "float32", "IEI_POOLING": "cls"})
    assert (documented.dtype, documented.pooling) == ("float32", "cls")


def test_an_empty_model_argument_is_refused_not_read_as_no_models(monkeypatch, caplog):
    """`iei serve --model "$M"` with M unset served the default ViT without a word."""
    from iei import cli

    monkeypatch.setattr(os, "environ", dict(os.environ))  # launch() writes IEI_MODELS there
    monkeypatch.delenv("IEI_MODELS", raising=False)
    with caplog.at_level(logging.ERROR, "iei"):
        assert cli.launch("serve", [""]) == 2
    assert "--model needs a model" in caplog.text
    assert "IEI_MODELS" not in os.environ


def test_the_model_argument_replaces_image_embedding_model(monkeypatch):
    from iei import cli

    monkeypatch.setattr(os, "environ", dict(os.environ))  # launch() writes IEI_MODELS there
    monkeypatch.setenv("IMAGE_EMBEDDING_MODEL", "org/vit")
    monkeypatch.delenv("IEI_MODELS", raising=False)
    monkeypatch.setattr("iei.launcher.serve.serve", lambda settings: settings)
    settings = cli.launch("serve", ["clip=org/clip"])
    assert [model.model_id for model in settings.served] == ["org/clip"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("bind", "host"), [("[::1]:8000", "::1"), ("localhost:8000", "localhost"), ("[::]:80", "::")]
)
def test_a_bind_address_is_a_host_and_a_port(bind, host):
    assert LauncherSettings(bind=bind).host == host


def test_triton_s_ports_must_differ_under_iei_triton_with_a_url_too(monkeypatch, caplog):
    """The containers' `iei triton` has IEI_TRITON_URL (for its frontend) and starts Triton: its
    clash was found only by Triton, once the model had loaded, and read 'no error in its log'."""
    from iei.launcher.serve import serve_triton

    monkeypatch.setenv("IEI_TRITON_URL", "triton:8100")
    monkeypatch.setenv("IEI_TRITON_GRPC_PORT", "8100")
    monkeypatch.setattr("iei.launcher.serve.TritonServer", None)  # nothing may start
    with caplog.at_level(logging.ERROR, "iei"):
        assert serve_triton(LauncherSettings()) == 2
    assert "Triton's ports must differ: IEI_TRITON_HTTP_PORT=8100, IEI_TRITON_GRPC_PORT=8100" in (
        caplog.text
    )


@pytest.mark.parametrize("taken", ["IEI_BIND", "IEI_TRITON_HTTP_PORT", "IEI_TRITON_METRICS_PORT"])
def test_a_port_in_use_is_refused_before_anything_loads(monkeypatch, caplog, taken):
    """Found by Triton once the model had loaded (minutes), or by uvicorn after that."""
    from iei.launcher.serve import serve

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ports = {name: str(free_port()) for name in ("IEI_TRITON_HTTP_PORT", "IEI_TRITON_GRPC_PORT",
                                                     "IEI_TRITON_METRICS_PORT")}  # fmt: skip
        monkeypatch.setenv("IEI_BIND", f"127.0.0.1:{free_port()}")
        for name, value in ports.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv(taken, f"127.0.0.1:{port}" if taken == "IEI_BIND" else str(port))
        monkeypatch.setattr("iei.launcher.serve.TritonServer", None)  # nothing may start
        with caplog.at_level(logging.ERROR, "iei"):
            assert serve(LauncherSettings()) == 1
    assert f"{taken}: nothing can listen on 127.0.0.1:{port}: Address already in use" in (
        caplog.text
    )


def test_an_address_not_of_this_host_is_refused_before_anything_loads(monkeypatch, caplog):
    from iei.launcher.serve import serve

    monkeypatch.setenv("IEI_BIND", f"192.0.2.7:{free_port()}")  # TEST-NET-1: on no interface
    monkeypatch.setattr("iei.launcher.serve.TritonServer", None)
    with caplog.at_level(logging.ERROR, "iei"):
        assert serve(LauncherSettings()) == 1
    assert "IEI_BIND: nothing can listen on 192.0.2.7:" in caplog.text
    assert "Cannot assign requested address" in caplog.text


def test_port_clashes_are_refused_before_anything_loads(monkeypatch, caplog):
    """Triton binds its ports once the model has loaded: a clash cost the whole load and said
    only that the frontend exited."""
    from iei.launcher.serve import serve, serve_triton

    monkeypatch.setenv("IEI_TRITON_GRPC_PORT", "8100")
    monkeypatch.setenv("IEI_TRITON_HTTP_PORT", "8100")
    with caplog.at_level(logging.ERROR, "iei"), pytest.raises(SystemExit):
        table.load(LauncherSettings)
    assert "Triton's ports must differ: IEI_TRITON_HTTP_PORT=8100, IEI_TRITON_GRPC_PORT=8100" in (
        caplog.text
    )
    monkeypatch.setenv("IEI_TRITON_GRPC_PORT", "8101")
    monkeypatch.setenv("IEI_BIND", "0.0.0.0:8100")
    settings = LauncherSettings()
    monkeypatch.setattr("iei.launcher.serve.TritonServer", None)  # nothing may start
    with caplog.at_level(logging.ERROR, "iei"):
        assert serve(settings) == 2
    assert "IEI_BIND=0.0.0.0:8100 takes Triton's port (IEI_TRITON_HTTP_PORT=8100)" in caplog.text
    # `iei triton` runs no frontend: its container binds Triton where a frontend would
    monkeypatch.setattr("iei.launcher.serve.run", lambda settings, **parts: parts)
    assert serve_triton(settings) == {"with_triton": True, "with_frontend": False}
