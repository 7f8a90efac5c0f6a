"""Both storage back-ends implement the Storage and ReadFile protocols, and the protocol
names every operation the package calls on a storage."""

import inspect
import pathlib
import re
import types

import pytest

from learnax.checkpoint import _storage
from learnax.checkpoint._storage import (
    FsspecReadFile,
    FsspecStorage,
    LocalReadFile,
    LocalStorage,
    ReadFile,
    Storage,
)

PACKAGE = pathlib.Path(_storage.__file__).parents[2]  # src/learnax


def operations(protocol: type) -> list[str]:
    return [
        name
        for name, value in vars(protocol).items()
        if inspect.isfunction(value) and not name.startswith("_")
    ]


def fake_fs(protocol: str = "memory") -> types.SimpleNamespace:
    return types.SimpleNamespace(protocol=protocol)


def test_the_protocols_list_operations():
    assert "write_durable" in operations(Storage) and "lock" in operations(Storage)
    assert operations(ReadFile) == ["readinto", "size", "close"]


@pytest.mark.parametrize("storage", [LocalStorage(), FsspecStorage(fake_fs())], ids=type)
def test_each_backend_is_a_storage(storage):
    assert isinstance(storage, Storage)


@pytest.mark.parametrize("backend", [LocalStorage, FsspecStorage])
@pytest.mark.parametrize("operation", operations(Storage))
def test_each_backend_takes_the_arguments_the_protocol_names(backend, operation):
    expected = inspect.signature(getattr(Storage, operation)).parameters
    actual = inspect.signature(getattr(backend, operation)).parameters
    assert [(p.name, p.kind, p.default) for p in actual.values()] == [
        (p.name, p.kind, p.default) for p in expected.values()
    ]


def test_each_read_handle_is_a_read_file(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"abc")
    local = LocalReadFile(str(path))
    try:
        assert isinstance(local, ReadFile)
    finally:
        local.close()
    assert isinstance(FsspecReadFile(fake_fs(), "memory://data", 3), ReadFile)


@pytest.mark.parametrize("operation", operations(Storage))
def test_a_backend_missing_one_operation_is_not_a_storage(operation):
    methods = {name: getattr(LocalStorage, name) for name in operations(Storage)}
    del methods[operation]
    partial = type("Partial", (), methods)()
    assert not isinstance(partial, Storage)


def test_every_operation_the_package_calls_on_a_storage_is_in_the_protocol():
    # Calls through a variable or attribute named like "storage", "_storage",
    # "storage_a"...; names the _storage package itself exports are not operations.
    call = re.compile(r"(?<![A-Za-z0-9])_?storage(?:_[a-z])?\.([a-z_]+)\(")
    called = {name for source in PACKAGE.rglob("*.py") for name in call.findall(source.read_text())}
    assert called, "found no storage calls: the pattern is out of date"
    assert called - set(dir(_storage)) <= set(operations(Storage))
