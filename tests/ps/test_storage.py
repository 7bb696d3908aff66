"""URIs -> pyarrow.fs (ps/snapshot/storage.py): local forms, S3 settings from config and AWS_* variables,
HDFS configuration errors (no NameNode can run here), atomic writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ps.snapshot import storage
from ps.snapshot.storage import StorageConfig, StorageError, open_uri


def test_local_forms_give_local_filesystem_and_absolute_path(tmp_path, monkeypatch):
    fs, base = open_uri(f"file://{tmp_path}/snaps")
    assert isinstance(fs, pafs.LocalFileSystem) and base == f"{tmp_path}/snaps"
    fs, base = open_uri(f"file://{tmp_path}/my%20snaps")  # percent-decoded, as pyarrow's from_uri
    assert base == f"{tmp_path}/my snaps"
    fs, base = open_uri(str(tmp_path / "plain"))
    assert isinstance(fs, pafs.LocalFileSystem) and base == str(tmp_path / "plain")
    monkeypatch.chdir(tmp_path)
    _, base = open_uri("relative/dir")
    assert base == os.path.join(str(tmp_path), "relative/dir")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "non-empty"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("file://host/x", "file URIs name no host"),
        ("s3:///prefix", "need a bucket"),
        ("s3://bucket/p?endpoint_override=x", "query and fragment are not read"),
        ("hdfs:///path", "need a NameNode host"),
        ("hdfs://namenode:notaport/path", "port"),
        # Credentials or a port became part of the bucket (the secret printed in every error), and
        # an empty path component failed every write of every snapshot round.
        ("s3://AKIAEXAMPLE:topsecret@snaps/x", "names a bucket only .* got bucket 'snaps'"),
        ("s3://snaps:9000/x", "names a bucket only"),
        ("s3://snaps//x", "an empty path component"),
    ],
)
def test_bad_uris_name_the_problem(uri, message):
    with pytest.raises(ValueError, match=message):
        open_uri(uri)


def test_s3_settings_from_config_and_environment():
    env = {
        "AWS_ACCESS_KEY_ID": "ak",
        "AWS_SECRET_ACCESS_KEY": "sk",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    c = StorageConfig.from_env(env)
    assert (c.access_key, c.secret_key, c.region) == ("ak", "sk", "eu-west-1")
    assert (c.endpoint_override, c.scheme) == ("127.0.0.1:9000", "http")
    explicit = StorageConfig(endpoint_override="h:1", scheme="https", region="r", access_key="a", secret_key="s")
    assert StorageConfig.from_env(env, base=explicit) == explicit
    assert StorageConfig.from_env({**env, "AWS_REGION": "us-west-2"}).region == "us-west-2"
    fs, base = open_uri("s3://bucket/a/b/", StorageConfig(endpoint_override="127.0.0.1:9", scheme="http"))
    assert isinstance(fs, pafs.S3FileSystem) and base == "bucket/a/b"
    assert fs.region == "us-east-1"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (StorageConfig(scheme="ftp"), "storage.scheme"),
        (StorageConfig(access_key="a"), "storage.secret_key"),
        (StorageConfig(endpoint_override="http://h:1"), "storage.endpoint_override"),
        (StorageConfig(request_timeout=0), "storage.request_timeout"),
    ],
)
def test_bad_storage_config_names_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        config.validate()


def test_bad_endpoint_variable_is_named():
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        StorageConfig.from_env({"AWS_ENDPOINT_URL": "ftp://x"})


@pytest.mark.parametrize(
    "refuse",
    [
        lambda: open_uri("s3://bucket/p?access_key=AKIAEXAMPLE&secret_key=TOPSECRET"),  # pyarrow's own form
        lambda: open_uri("hdfs://user:TOPSECRET@namenode:99999/p"),
        lambda: StorageConfig.from_env({"AWS_ENDPOINT_URL": "ftp://AKIAEXAMPLE:TOPSECRET@host:9000"}),
        lambda: StorageConfig.from_env({"AWS_ENDPOINT_URL": "http://AKIAEXAMPLE:TOPSECRET@host:9000"}),
        lambda: StorageConfig.from_env({"AWS_ENDPOINT_URL": "AKIAEXAMPLE:TOPSECRET@host:9000"}),  # no scheme
    ],
)
def test_a_secret_in_a_uri_is_not_echoed(refuse):
    """The errors named the whole URI: a secret in its query (where pyarrow's from_uri takes
    credentials), before its host, or in AWS_ENDPOINT_URL was printed (a review's repro)."""
    with pytest.raises(ValueError) as info:
        refuse()
    assert "TOPSECRET" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value), str(info.value)
    assert "TOPSECRET" not in repr(StorageConfig(access_key="AKIAEXAMPLE", secret_key="TOPSECRET", session_token="x"))


def test_hdfs_without_libhdfs_is_a_clear_error_not_a_crash(tmp_path, monkeypatch):
    # An empty JAVA_HOME / libhdfs folder: whatever this host has, loading must fail, and say why.
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    monkeypatch.setenv("ARROW_LIBHDFS_DIR", str(tmp_path))
    monkeypatch.delenv("HADOOP_HOME", raising=False)
    for _ in range(2):  # the second attempt meets pyarrow's cached failure: still a clear error
        with pytest.raises(StorageError, match="hdfs://namenode:8020/snaps") as info:
            open_uri("hdfs://namenode:8020/snaps")
        assert "JAVA_HOME" in str(info.value) and "libhdfs" in str(info.value)
        assert len(str(info.value)) < 600


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    fs, base = open_uri(str(tmp_path))
    path = storage.join(base, "job", "LATEST")
    storage.write_bytes_atomic(fs, path, b"10\n")
    storage.write_bytes_atomic(fs, path, b"20\n")
    assert storage.read_bytes(fs, path) == b"20\n"
    assert os.listdir(tmp_path / "job") == ["LATEST"]


def test_listing_and_deleting_folders(tmp_path):
    fs, base = open_uri(str(tmp_path))
    assert storage.list_dir_names(fs, storage.join(base, "missing")) == []
    for name in ("1", "2"):
        storage.write_bytes_atomic(fs, storage.join(base, name, "f"), b"x")
    assert sorted(storage.list_dir_names(fs, base)) == ["1", "2"]
    storage.delete_dir(fs, storage.join(base, "1"))
    storage.delete_dir(fs, storage.join(base, "absent"))
    assert storage.list_dir_names(fs, base) == ["2"]
    assert storage.exists(fs, storage.join(base, "2", "f")) and not storage.exists(fs, storage.join(base, "1"))


def test_a_folder_that_refuses_fsync_does_not_fail_the_write_and_a_file_that_does_does(tmp_path, monkeypatch):
    """Some filesystems refuse fsync on a folder (EINVAL): every local snapshot round failed there
    once folders were synced (the diff review's simulation). A file's refusal stays an error."""
    import errno

    import pyarrow.fs as pafs

    from ps.snapshot.storage import sync, write_bytes_atomic

    real_fsync = os.fsync

    def refuse_folders(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", refuse_folders)
    write_bytes_atomic(pafs.LocalFileSystem(), str(tmp_path / "a" / "LATEST"), b"7\n")
    assert (tmp_path / "a" / "LATEST").read_bytes() == b"7\n"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        sync(pafs.LocalFileSystem(), str(tmp_path / "a" / "LATEST"))


def test_a_file_that_must_be_new_is_never_replaced_with_or_without_hard_links(tmp_path, monkeypatch):
    """A step's manifest is published with a hard link, which never replaces a file; a local
    filesystem that refuses hard links (some network and FUSE mounts) gets the check before the
    write instead of failing every snapshot round. Neither leaves its temporary file behind."""
    fs = pafs.LocalFileSystem()
    for links in (True, False):
        folder = tmp_path / ("links" if links else "no-links")
        if not links:
            def refuse(*_args):
                raise PermissionError(errno.EPERM, "Operation not permitted")

            monkeypatch.setattr(os, "link", refuse)
        path = str(folder / "step" / "manifest.json")
        storage.write_bytes_new(fs, path, b"first")
        with pytest.raises(FileExistsError):
            storage.write_bytes_new(fs, path, b"second")
        assert Path(path).read_bytes() == b"first"
        assert [p.name for p in (folder / "step").iterdir()] == ["manifest.json"]
