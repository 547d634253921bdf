"""The kernel cache (``lightning_imex.optim.cache``): generated code is loaded only from a
directory of the current user that no one else may write to, only from files of that
user that no one else may write to, and only when the digest stored beside it matches;
anything else is rebuilt, or the cache is left aside with one warning, and training goes
on with the same weights. These tests run as root too: "unsafe" and "read-only" are
decided by owner and mode, not by access errors, so they set owners with ``os.chown``."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lightning_imex.optim import IMEXAdam, cache, kernel, toolkit
from lightning_imex.optim.cpu_backend import CBackend

OTHER_UID = 12345
MARKER_LIBRARY = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE* f = fopen("%s", "w"); if (f) fclose(f); }
void imex_kernel(void) {}
"""


def train(fused: bool | None, steps: int = 3) -> list[torch.Tensor]:
    """IMEXAdam (trapezoidal: two events) on one group of 5,127 elements, so that
    ``fused=None`` takes the compiled path; the final parameters."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(7))]
    target = torch.randn(64, 80)
    optimizer = IMEXAdam(params, lr=1e-2, fused=fused)

    def closure():
        optimizer.zero_grad()
        loss = (params[0] - target).square().sum() + 3 * params[1].square().sum()
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return [p.detach() for p in params]


def fresh_backend() -> CBackend:
    """A C backend that has loaded nothing yet, made the one CPU tensors use."""
    backend = CBackend()
    if backend.compiler() is None:
        pytest.skip("no C compiler")
    kernel._BACKENDS = {"cpu": backend}
    return backend


@pytest.fixture
def backend(monkeypatch) -> CBackend:
    monkeypatch.setattr(kernel, "_BACKENDS", None)  # restored after the test
    return fresh_backend()


@pytest.fixture(scope="module")
def eager() -> list[torch.Tensor]:
    return train(fused=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache that a fused run filled: the libraries' names and good content."""
    root = tmp_path_factory.mktemp("built") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(root))
        patch.setattr(kernel, "_BACKENDS", None)
        fresh_backend()
        train(fused=True)
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[bytes, Path]:
    """A library whose loading creates a marker file, and that marker's path."""
    work = tmp_path_factory.mktemp("planted")
    marker = work / "marker"
    (work / "planted.c").write_text(MARKER_LIBRARY % marker)
    compiler = CBackend().compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    subprocess.run([compiler, "-shared", "-fPIC", "planted.c", "-o", "planted.so"], cwd=work, check=True)
    return (work / "planted.so").read_bytes(), marker


def libraries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "cpu").glob("*.so"))


def plant(directory: Path, names: list[str], data: bytes) -> None:
    """``data`` under every name, with the digest that matches it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(data)
        (directory / (name + cache.DIGEST_SUFFIX)).write_text(hashlib.sha256(data).hexdigest() + "\n")


def kernel_cache_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "kernel cache" in str(w.message)]


def train_and_count_warnings(backend: CBackend) -> tuple[list[torch.Tensor], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = train(fused=None)
    assert any(k is not toolkit.PROBE_KERNEL for k, _ in backend._functions), "the compiled path must have run"
    return params, kernel_cache_warnings(caught)


@pytest.mark.parametrize("where, mode, owner", [
    ("cpu", 0o777, None), ("root", 0o770, None), ("root", 0o755, OTHER_UID)],
    ids=["world-writable", "group-writable", "another-users"])
def test_library_planted_in_an_unsafe_directory_is_not_loaded(where, mode, owner, built, planted, eager, backend,
                                                              tmp_path, monkeypatch):
    root = tmp_path / "cache"
    data, marker = planted
    plant(root / "cpu", libraries(built), data)
    unsafe = root if where == "root" else root / "cpu"
    unsafe.chmod(mode)
    if owner is not None:
        os.chown(unsafe, owner, owner)
    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(root))
    params, messages = train_and_count_warnings(backend)
    assert not marker.exists()
    assert_close(params, eager, rtol=1e-6, atol=1e-7)
    assert len(messages) == 1 and f"not using {unsafe}" in messages[0] and "LIGHTNING_IMEX_CACHE_DIR" in messages[0]
    assert all((root / "cpu" / name).read_bytes() == data for name in libraries(built)), "nothing written there"


@pytest.mark.parametrize("change", ["another-users", "group-writable"])
def test_library_that_someone_else_could_write_is_rebuilt(change, built, planted, eager, backend, tmp_path,
                                                          monkeypatch):
    root = tmp_path / "cache"
    data, marker = planted
    root.mkdir(mode=0o700)
    plant(root / "cpu", libraries(built), data)
    for path in (root / "cpu").iterdir():
        if change == "another-users":
            os.chown(path, OTHER_UID, OTHER_UID)
        else:
            path.chmod(0o664)
    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(root))
    params, messages = train_and_count_warnings(backend)
    assert not marker.exists()
    assert_close(params, eager, rtol=1e-6, atol=1e-7)
    assert len(messages) == 1 and "it is rebuilt" in messages[0]
    for name in libraries(built):  # replaced by this user's builds
        assert (root / "cpu" / name).stat().st_uid == os.geteuid()
        assert cache.load_verified(root / "cpu" / name) not in (None, data)


DAMAGED_ROUNDS = """
import os, shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from torch.testing import assert_close
from test_kernel_cache import damage, fresh_backend, libraries, train
from lightning_imex.optim import cache
built, root = Path(sys.argv[2]), Path(sys.argv[3])
os.environ["LIGHTNING_IMEX_CACHE_DIR"] = str(root)
eager = train(fused=False)
for how, fused in [("truncated", None), ("garbage", True), ("empty", None), ("no digest", None)]:
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(built, root)
    for name in libraries(root):
        damage(root / "cpu" / name, how)
    fresh_backend()
    assert_close(train(fused=fused), eager, rtol=1e-6, atol=1e-7)
    assert all(cache.load_verified(root / "cpu" / name) for name in libraries(root)), how
print("rebuilt")
"""


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "no digest":  # as an older version left it
        Path(f"{path}{cache.DIGEST_SUFFIX}").unlink()
    else:
        path.write_bytes({"truncated": data[:len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[how])


def test_damaged_libraries_are_rebuilt(built, tmp_path):
    """Truncated (formerly SIGBUS in dlopen), garbage, empty, and without a digest: rebuilt
    and never loaded, with the default ``fused=None`` and with ``fused=True``. In a
    subprocess, so that a crash fails the test rather than ending pytest."""
    run = subprocess.run([sys.executable, "-c", DAMAGED_ROUNDS, str(Path(__file__).parent), str(built),
                          str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "rebuilt" in run.stdout, (run.returncode, run.stderr[-3000:])


def unwritable_location(tmp_path: Path, monkeypatch, how: str) -> None:
    if how == "read-only":  # mode 0500: root could write there, the cache must not
        root = tmp_path / "read-only"
        root.mkdir(mode=0o500)
        monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(root))
    else:  # a home directory that cannot hold ~/.cache, as a read-only one for a user
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("HOME", str(tmp_path / "file" / "home"))
        monkeypatch.delenv("LIGHTNING_IMEX_CACHE_DIR", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)


@pytest.mark.parametrize("how", ["read-only", "cannot-be-created"])
def test_unwritable_cache_trains_with_one_warning(how, eager, backend, tmp_path, monkeypatch):
    unwritable_location(tmp_path, monkeypatch, how)
    params, messages = train_and_count_warnings(backend)
    assert_close(params, eager, rtol=1e-6, atol=1e-7)
    assert len(messages) == 1 and ("read-only" if how == "read-only" else "cannot be created") in messages[0]
    if how == "read-only":
        assert not any((tmp_path / "read-only").iterdir())


def test_nowhere_to_build_falls_back_to_eager(eager, backend, tmp_path, monkeypatch):
    """No usable cache and no private directory either: the eager path, one warning for
    each of the two reasons."""
    unwritable_location(tmp_path, monkeypatch, "cannot-be-created")
    monkeypatch.setattr(cache, "_private", None)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "file" / "tmp"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = train(fused=None)
    assert_close(params, eager, rtol=0, atol=0)
    assert not backend._functions
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "kernel cache" in messages[0] and "using the eager path" in messages[1], messages


def test_store_and_load_verified(tmp_path, monkeypatch):
    """The rules on artifacts and directories, without a compiler."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LIGHTNING_IMEX_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    directory = cache.secure_dir("test")
    assert directory == tmp_path / ".cache" / "lightning_imex" / "test"
    for made in (directory, directory.parent, cache.private_dir()):  # made private
        assert made.stat().st_mode & 0o777 == 0o700 and made.stat().st_uid == os.geteuid()
    path = directory / "artifact"
    cache.store(path, b"code")
    assert cache.load_verified(path) == b"code"
    builds = []
    assert cache.cached("test", "artifact", lambda: builds.append(1) or b"other") == b"code" and not builds
    path.write_bytes(b"edoc")  # same size, other content
    assert cache.load_verified(path) is None
    assert cache.cached("test", "artifact", lambda: b"code") == b"code" and cache.load_verified(path) == b"code"
    elsewhere = tmp_path / "elsewhere"
    shutil.copy(path, elsewhere)
    path.unlink()
    path.symlink_to(elsewhere)  # a symbolic link to the right bytes is still not followed
    assert cache.load_verified(path) is None
    (directory / "cpu").symlink_to(tmp_path)  # nor is a link in place of a kind's directory
    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(directory))
    with pytest.warns(UserWarning, match="is a symbolic link"):
        assert cache.secure_dir("cpu") is None


def test_tampered_triton_source_is_not_imported(tmp_path, monkeypatch):
    """A changed cached source, or one that someone else could have written, is replaced
    by the generated one before it is imported."""
    pytest.importorskip("triton")
    from lightning_imex.optim.triton_backend import _import_kernel, triton_source

    monkeypatch.setenv("LIGHTNING_IMEX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    source = triton_source(toolkit.PROBE_KERNEL, torch.float32)
    _import_kernel(source)
    (path,) = (tmp_path / "cache" / "triton").glob("*.py")
    marker = tmp_path / "marker"
    tampered = source + f"\nopen({str(marker)!r}, 'w').close()\n"
    path.write_text(tampered)  # its digest no longer matches
    assert "def imex_kernel(" in _import_kernel(source).src
    assert not marker.exists() and path.read_text() == source
    plant(path.parent, [path.name], tampered.encode())  # matching digest, another user's file
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.warns(UserWarning, match=f"owned by uid {OTHER_UID}"):
        _import_kernel(source)
    assert not marker.exists() and path.read_text() == source


def test_private_directories_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """A private directory left by a killed process goes once it is a day old; a live
    process's, a recent one, one with another mode, and names not ours stay."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(cache, "_private", None)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    day = cache.STALE_PRIVATE_SECONDS

    def made(name: str, mode: int = 0o700, age: float = 2 * day) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "imex_x.so").write_bytes(b"x")
        path.chmod(mode)
        old = path.stat().st_mtime - age
        os.utime(path, (old, old))
        return path

    stale = made(f"lightning_imex-{dead}-abc")
    kept = [made(f"lightning_imex-{os.getpid()}-live"), made(f"lightning_imex-{dead}-recent", age=day / 2),
            made(f"lightning_imex-{dead}-shared", mode=0o755), made(f"lightning_imex-x{dead}-odd"),
            made(f"other-{dead}-abc")]
    mine = cache.private_dir()
    assert not stale.exists()
    assert all(path.is_dir() for path in kept)
    assert mine.parent == tmp_path and mine.name.startswith(f"lightning_imex-{os.getpid()}-")
