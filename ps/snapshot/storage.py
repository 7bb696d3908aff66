"""Storage URIs -> pyarrow.fs: one code path for local disk, S3 and HDFS.

    open_uri("file:///data/snap")           -> (LocalFileSystem, "/data/snap")
    open_uri("/data/snap") or "rel/dir"     -> (LocalFileSystem, absolute path)
    open_uri("s3://bucket/prefix")          -> (S3FileSystem, "bucket/prefix")
    open_uri("hdfs://namenode:8020/snap")   -> (HadoopFileSystem, "/snap")

S3 settings come from a StorageConfig or, for each field left None, from the standard AWS
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL). HDFS needs a JVM and libhdfs on the host (JAVA_HOME,
HADOOP_HOME or ARROW_LIBHDFS_DIR, CLASSPATH); it is untested against a real NameNode.

Atomic publication (`write_bytes_atomic`): an S3 object appears whole or not at all, so S3 is
written in place; every other filesystem gets a temporary name and a rename. `write_bytes_new`
publishes a file that must not exist yet (a step's manifest): on local disk atomically (a hard
link, which fails where the name exists); on S3 and HDFS checked just before the write, which
pyarrow.fs offers no condition for.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from ps.errors import EmbpsError

_SCHEMES = ("file", "s3", "hdfs")
_DEFAULT_HDFS_PORT = 8020
MAX_STORAGE_TIMEOUT_S = 3600.0  # one S3 request; beyond it a dead endpoint would hang a round for hours


class StorageError(EmbpsError, OSError):
    """A storage URI or its configuration cannot be used (the message says which part and why)."""


class StorageUnavailableError(StorageError):
    """Storage failed a read or write (an S3 5xx or refused connection, a full disk, a timeout):
    a later try may succeed, so servers answer it UNAVAILABLE."""


class StorageDeniedError(StorageError):
    """Storage refused this process (credentials without the right, a missing bucket, a folder it
    may not write): another try would be refused the same, so servers answer it PERMISSION_DENIED
    and a snapshot round is skipped at once, not retried as if storage were down."""


# How S3 (AWS's SDK, as pyarrow words it) and S3-compatible servers say "refused" rather than "failed".
_DENIED_MARKS = (
    "ACCESS_DENIED", "AccessDenied", "NO_SUCH_BUCKET", "NoSuchBucket", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "HTTP status 403",
)


@contextlib.contextmanager
def unavailable_on_failure(what: str) -> Iterator[None]:
    """Turns what pyarrow.fs or the OS raises inside into StorageUnavailableError (or
    StorageDeniedError where storage refused this process), its message naming `what` ("writing
    s3://b/p/ctr/400"). Missing files and embps errors pass unchanged."""
    try:
        yield
    except (EmbpsError, FileNotFoundError):
        raise
    except (OSError, pa.ArrowException) as exc:
        denied = isinstance(exc, PermissionError) or any(mark in str(exc) for mark in _DENIED_MARKS)
        error = StorageDeniedError if denied else StorageUnavailableError
        raise error(f"{what}: {exc}") from exc


@dataclass(frozen=True)
class StorageConfig:
    """How to reach S3 (fields left None fall back to the AWS_* variables, see from_env).

    endpoint_override: "host:port" of an S3-compatible server (None: AWS itself).
    region: S3 region, e.g. "us-east-1".
    access_key, secret_key, session_token: credentials (None: pyarrow's default chain).
    scheme: "http" or "https" (default https; http only for servers on a trusted network).
    connect_timeout, request_timeout: seconds, so a dead or wrong endpoint fails instead of hanging.
    max_attempts: tries of each S3 request (pyarrow's retry strategy, with its own backoff of about
    a second); a training job's snapshot rounds are retried as a whole besides (`[snapshot] retries`).
    allow_bucket_creation: let a write create a missing bucket (default False: a typo in the
    bucket name should fail, not create a new bucket).
    """

    endpoint_override: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    scheme: str | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 60.0
    max_attempts: int = 3
    allow_bucket_creation: bool = False

    def validate(self, where: str = "storage") -> StorageConfig:
        """Raises ValueError naming the first bad field (under `where`, its path in the config
        file); returns self when valid."""
        if self.scheme is not None and self.scheme not in ("http", "https"):
            raise ValueError(f"{where}.scheme: must be 'http' or 'https', got {self.scheme!r}")
        if (self.access_key is None) != (self.secret_key is None):
            missing = "secret_key" if self.secret_key is None else "access_key"
            raise ValueError(f"{where}.{missing}: access_key and secret_key go together; only one is set")
        if self.endpoint_override is not None and ("://" in self.endpoint_override or not self.endpoint_override):
            raise ValueError(
                f"{where}.endpoint_override: must be host:port without a scheme (put the scheme in "
                f"{where}.scheme), got {self.endpoint_override!r}"
            )
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or not self.max_attempts >= 1:
            raise ValueError(f"{where}.max_attempts: must be an integer >= 1, got {self.max_attempts!r}")
        for name in ("connect_timeout", "request_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value <= MAX_STORAGE_TIMEOUT_S
            ):
                raise ValueError(
                    f"{where}.{name}: must be a number of seconds in (0, {MAX_STORAGE_TIMEOUT_S:g}], got {value!r}"
                )
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, base: StorageConfig | None = None) -> StorageConfig:
        """`base` (default: all None) with each None field filled from the AWS_* variables of `env`
        (default os.environ). AWS_ENDPOINT_URL "http://host:port" sets endpoint and scheme."""
        env = os.environ if env is None else env
        base = base if base is not None else cls()
        endpoint, scheme = base.endpoint_override, base.scheme
        url = env.get("AWS_ENDPOINT_URL")
        if endpoint is None and url:
            url = url if "://" in url else f"https://{url}"  # masked as read (without, "key:secret@host" was no URI)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"AWS_ENDPOINT_URL: must look like http[s]://host[:port], got {_shown(url)!r}")
            if "@" in parts.netloc:  # a user and password there became part of the endpoint's host
                raise ValueError(
                    f"AWS_ENDPOINT_URL: give credentials as AWS_* keys, not in the URL, got {_shown(url)!r}"
                )
            endpoint = parts.netloc
            scheme = scheme if scheme is not None else parts.scheme
        return replace(
            base,
            endpoint_override=endpoint,
            scheme=scheme,
            region=base.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=base.access_key if base.access_key is not None else env.get("AWS_ACCESS_KEY_ID"),
            secret_key=base.secret_key if base.secret_key is not None else env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=base.session_token if base.session_token is not None else env.get("AWS_SESSION_TOKEN"),
        ).validate()


def _shown(uri: str) -> str:
    """`uri` as an error may print it: no user or password before the host and no query or fragment,
    where pyarrow takes credentials (s3://bucket/path?access_key=...&secret_key=...): an error named
    the whole URI, secret included."""
    parts = urlsplit(uri)
    netloc = ("...@" if "@" in parts.netloc else "") + parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", "..." if parts.fragment else ""))


def check_uri(uri: object, where: str = "uri") -> None:
    """Raises ValueError naming `where` unless `uri` has a form open_uri takes (a local path, or a
    file://, s3:// or hdfs:// URI with what its scheme needs); opens nothing, so a config file's URI
    is checked when the file is read, not at the first snapshot."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"{where}: must be a non-empty string, got {uri!r}")
    if "://" not in uri:
        return
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"{where}: unsupported scheme {parts.scheme!r} in {_shown(uri)!r}; use one of {', '.join(_SCHEMES)}"
        )
    if parts.query or parts.fragment:
        raise ValueError(
            f"{where}: query and fragment are not read ({_shown(uri)!r}); put S3 options in StorageConfig or "
            "AWS_* variables"
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{where}: file URIs name no host (file:///abs/path), got {_shown(uri)!r}")
        if not parts.path.startswith("/"):
            raise ValueError(f"{where}: file URIs need an absolute path (file:///abs/path), got {_shown(uri)!r}")
    elif scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{where}: s3 URIs need a bucket (s3://bucket/prefix), got {_shown(uri)!r}")
        # Credentials or a port in the netloc became part of the bucket's name (and a secret was
        # printed in every error); an empty path component failed every write ("Empty path component").
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(
                f"{where}: an s3 URI names a bucket only (s3://bucket/prefix); put credentials and the "
                f"endpoint in AWS_* variables or [snapshot.storage], got bucket {parts.netloc.rsplit('@', 1)[-1]!r}"
            )
        if "//" in parts.path:
            raise ValueError(f"{where}: an empty path component ('//') in {_shown(uri)!r}")
    else:
        if not parts.hostname:
            raise ValueError(
                f"{where}: hdfs URIs need a NameNode host (hdfs://namenode:8020/path), got {_shown(uri)!r}"
            )
        try:
            valid_port = parts.port is None or 0 <= parts.port <= 65535  # urlsplit checks it when read
        except ValueError:
            valid_port = False
        if not valid_port:
            raise ValueError(f"{where}: the port of {_shown(uri)!r} must be an integer in [0, 65535]")


def open_uri(uri: str, config: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """uri -> (filesystem, base path inside it); see the module docstring for the forms.

    config: S3 settings; None reads them all from the environment (StorageConfig.from_env).
    Raises ValueError for a malformed URI (check_uri) and StorageError when the filesystem cannot
    be set up.
    """
    check_uri(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":  # percent-decoded, as pyarrow's from_uri does: file:///my%20snaps is "my snaps"
        return pafs.LocalFileSystem(), os.path.normpath(unquote(parts.path))
    if scheme == "s3":
        return _open_s3(uri, parts.netloc, parts.path, StorageConfig.from_env(base=config))
    return _open_hdfs(uri, parts)


def _open_s3(uri: str, bucket: str, path: str, config: StorageConfig) -> tuple[pafs.FileSystem, str]:
    kwargs: dict[str, object] = {
        "connect_timeout": float(config.connect_timeout),
        "request_timeout": float(config.request_timeout),
        "allow_bucket_creation": config.allow_bucket_creation,
        # A few tries, so a wrong endpoint fails within a few timeouts rather than after minutes.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=config.max_attempts),
    }
    for name in ("endpoint_override", "region", "access_key", "secret_key", "session_token", "scheme"):
        value = getattr(config, name)
        if value is not None:
            kwargs[name] = value
    if config.endpoint_override is not None and config.region is None:
        kwargs["region"] = "us-east-1"  # S3-compatible servers ignore it; skips pyarrow's region lookup
    try:
        fs = pafs.S3FileSystem(**kwargs)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise StorageError(f"uri {_shown(uri)!r}: cannot set up S3 ({e})") from e
    return fs, f"{bucket}{path.rstrip('/')}"


def _open_hdfs(uri: str, parts) -> tuple[pafs.FileSystem, str]:
    port = parts.port if parts.port is not None else _DEFAULT_HDFS_PORT
    try:
        fs = pafs.HadoopFileSystem(parts.hostname, port, user=parts.username)
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"uri {_shown(uri)!r}: cannot open HDFS: {_hdfs_hint(str(e))}") from e
    return fs, parts.path.rstrip("/") or "/"


def _hdfs_hint(message: str) -> str:
    """pyarrow's libhdfs errors list dozens of dlopen attempts; say what is missing instead."""
    first = message.strip().splitlines()[0] if message.strip() else message
    if "libjvm" in message:
        return (
            "no Java VM found (libjvm.so): install a JDK and set JAVA_HOME to it; libhdfs also needs "
            f"HADOOP_HOME or ARROW_LIBHDFS_DIR and CLASSPATH=$(hadoop classpath --glob) [{first}]"
        )
    if "libhdfs" in message:
        return (
            "libhdfs not found (or it failed to load before): set HADOOP_HOME or ARROW_LIBHDFS_DIR to the "
            f"folder of libhdfs.so, JAVA_HOME to a JDK, and CLASSPATH=$(hadoop classpath --glob) [{first}]"
        )
    return first


def same_folder(a: tuple[pafs.FileSystem, str], b: tuple[pafs.FileSystem, str]) -> bool:
    """Whether two (filesystem, base) of open_uri name one folder: local ones after resolving links."""
    (fs_a, base_a), (fs_b, base_b) = a, b
    if type(fs_a) is not type(fs_b):
        return False
    if isinstance(fs_a, pafs.LocalFileSystem):
        return os.path.realpath(base_a) == os.path.realpath(base_b)
    return base_a.rstrip("/") == base_b.rstrip("/")


def same_place(uri: str, other: str) -> bool:
    """Whether two URIs (forms check_uri takes) name one folder: local ones (paths, file://) as
    same_folder compares them; remote ones as written, less a trailing '/' (opening them would set up
    their filesystems, an HDFS one connecting, before any check is done)."""
    if _local(uri) and _local(other):
        return same_folder(open_uri(uri), open_uri(other))
    return uri.rstrip("/") == other.rstrip("/")


def shown(uri: str) -> str:
    """`uri` as an error may print it: without credentials, query or fragment (see _shown)."""
    return _shown(uri)


def _local(uri: str) -> bool:
    return "://" not in uri or urlsplit(uri).scheme.lower() == "file"


def folder_within(inner: tuple[pafs.FileSystem, str], outer: tuple[pafs.FileSystem, str]) -> bool:
    """Whether folder `inner` is `outer` or lies under it ((filesystem, path) as same_folder takes)."""
    (fs_in, path_in), (fs_out, path_out) = inner, outer
    if type(fs_in) is not type(fs_out):
        return False
    if isinstance(fs_in, pafs.LocalFileSystem):
        path_in, path_out = os.path.realpath(path_in), os.path.realpath(path_out)
        return os.path.commonpath([path_in, path_out]) == path_out
    path_in, path_out = path_in.rstrip("/"), path_out.rstrip("/")
    return path_in == path_out or path_in.startswith(path_out + "/")


def file_in_the_way(fs: pafs.FileSystem, path: str) -> str | None:
    """The file that keeps folder `path` from being made on local disk: `path` itself, or the nearest
    path above it that exists, when that is not a folder; None when nothing is in the way (a folder,
    one above it that `path` can be made under), on remote storage (it has no such files), or when the
    OS does not say (a folder this process may not search: the write says what it is)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    place = os.path.abspath(path)
    try:
        while not os.path.exists(place) and place != os.path.dirname(place):  # under a file: "absent" too
            place = os.path.dirname(place)
        return None if os.path.isdir(place) else place
    except OSError:
        return None


def join(base: str, *parts: str) -> str:
    """base/part/part..., with '/' separators whatever the filesystem."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_s3(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.S3FileSystem)


_READ_CHUNK_BYTES = 16 << 20


def read_bytes(fs: pafs.FileSystem, path: str, on_bytes: Callable[[int], None] | None = None) -> bytes | bytearray:
    """The whole file at `path` (FileNotFoundError if absent); with on_bytes, read in chunks and
    on_bytes(n) called after each (progress of a long read). StorageUnavailableError when the
    storage fails otherwise (an S3 endpoint out of reach raised pyarrow's OSError past every caller)."""
    with unavailable_on_failure(f"reading {path}"), fs.open_input_stream(path, compression=None) as f:
        if on_bytes is None:
            return f.read()
        data = bytearray()
        while chunk := f.read(_READ_CHUNK_BYTES):
            data += chunk
            on_bytes(len(chunk))
        return data


def sync(fs: pafs.FileSystem, path: str) -> None:
    """Makes a local file, or a folder's entries, durable (fsync): on local disk nothing was synced,
    so after a power loss or a kernel crash a committed manifest could name files that were never
    written out (a review's strace of a snapshot round: no sync call at all). Nothing to do for S3
    and HDFS, whose writes are durable once closed."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems refuse fsync on a folder (as PostgreSQL's fsync_fname allows for): a
        # snapshot round must not fail for good there. A file's refusal is an error.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Writes `data` so that readers see either the old file or the whole new one, durably on
    local disk (the file before its rename, then its folder's entry)."""
    if is_s3(fs):
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)
        return
    tmp = _write_beside(fs, path, data)
    try:
        fs.move(tmp, path)
        sync(fs, path.rsplit("/", 1)[0])
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def _write_beside(fs: pafs.FileSystem, path: str, data: bytes) -> str:
    """Writes `data` durably to a temporary file beside `path` (its folder made), and returns its path."""
    make_parent_dir(fs, path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp, compression=None) as f:
            f.write(data)
        sync(fs, tmp)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise
    return tmp


def write_bytes_new(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """write_bytes_atomic of a file that must not exist: FileExistsError where it does (another
    writer published it first), and the file is left as that writer published it. A local
    filesystem without hard links (some network and FUSE mounts) gets the check before the write."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _write_beside(fs, path, data)
        try:
            os.link(tmp, path)  # EEXIST where another writer's file is: never replaced
            sync(fs, path.rsplit("/", 1)[0])
            return
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
        finally:
            _delete_quietly(fs, tmp)
    if exists(fs, path):
        raise FileExistsError(errno.EEXIST, "already written by another writer", path)
    write_bytes_atomic(fs, path, data)


def make_parent_dir(fs: pafs.FileSystem, path: str) -> None:
    """Creates the folder that will hold `path` (S3 has no folders: nothing to do there)."""
    if not is_s3(fs):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dir_names(fs: pafs.FileSystem, path: str) -> list[str]:
    """Names of the directories directly under `path` ([] when `path` does not exist);
    StorageUnavailableError when the storage fails."""
    with unavailable_on_failure(f"listing {path}"):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory]


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    """Removes `path` and everything under it: nothing if absent, or removed meanwhile (another gc
    of the job deleting the same steps)."""
    if not exists(fs, path):
        return
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        if exists(fs, path):  # the other deleter removed entries under this walk: the rest
            fs.delete_dir(path)


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, pa.ArrowException):
        pass
