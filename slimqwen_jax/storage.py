"""Paths of runs, models, statistics and data that may be local or a URL (`gs://bucket/dir`, or any
other scheme `etils.epath` reads through fsspec), one type for both: `etils.epath.Path`, the path type
orbax itself uses (its arrays go through tensorstore's own GCS driver).

Local paths stay `pathlib.Path`s and behave exactly as before. A URL's path is an `epath.Path`; the
few things an object store does differently are the helpers here: writes (an object appears whole
when its upload ends, so no temporary file and rename), appends (read and write again) and files
that a library can only open by local name (a temporary local copy). `url_problems` checks that
every URL of a run can be reached before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PROBE_SECONDS = 20  # how long `url_problems` waits for a bucket to answer


def is_url(value: str | os.PathLike) -> bool:
    """Whether `value` names a location through a URL scheme (`gs://...`) rather than a local path."""
    return bool(_URL.match(os.fspath(value)))


def path(value: str | os.PathLike) -> pathlib.Path | epath.Path:
    """`value` as a path object: `epath.Path` for a URL, `pathlib.Path` for a local path."""
    text = os.fspath(value)
    return epath.Path(text) if is_url(text) else pathlib.Path(text)


def absolute(value: str | os.PathLike) -> pathlib.Path | epath.Path:
    """`path(value)`, made absolute when local (a URL is absolute already)."""
    result = path(value)
    return result if is_url(result) else result.absolute()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `target` so that readers see the old file or the new one, never a part:
    locally a temporary file renamed over it; at a URL one upload (an object appears whole)."""
    target = path(target)
    if is_url(target):
        target.write_bytes(data)
        return
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)


def write_text(target: str | os.PathLike, text: str) -> None:
    """`write_bytes` of `text` (UTF-8)."""
    write_bytes(target, text.encode())


def append_text(target: str | os.PathLike, text: str) -> None:
    """Append `text` to `target` (created if absent). Object stores have no append: at a URL the
    object is read and written again whole (fine for the small logs we append to)."""
    target = path(target)
    if not is_url(target):
        with target.open("a") as f:
            f.write(text)
        return
    before = target.read_text() if target.exists() else ""
    target.write_text(before + text)


@contextlib.contextmanager
def local_copy(source: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local path holding the file `source`: `source` itself when local, else a temporary copy
    removed on exit. For libraries that open files by local name only."""
    source = path(source)
    if not is_url(source):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="slimqwen-jax-copy-") as scratch:
        target = pathlib.Path(scratch) / source.name
        with source.open("rb") as reader, target.open("wb") as writer:
            shutil.copyfileobj(reader, writer)
        yield target


def _bucket(url: str) -> str:
    """`scheme://bucket` of a URL."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _google_credentials() -> bool:
    """Whether Google's application default credentials can be found (raises ImportError without
    the client library)."""
    import google.auth

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return False
    return True


def _probe(url: str) -> str | None:
    """Why the bucket of `url` cannot be used (None if it answers): a missing client library,
    missing credentials, a missing bucket, or no answer within PROBE_SECONDS."""
    bucket = _bucket(url)
    try:
        import fsspec

        # Credentials first: without them gcsfs's client would try every way to find some (the
        # metadata server among them) for seconds before failing.
        if bucket.startswith("gs://") and not os.environ.get("STORAGE_EMULATOR_HOST") and not _google_credentials():
            return ("no Google credentials found (on a TPU VM the VM's service account provides them; elsewhere "
                    "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)")  # fmt: skip
        filesystem = fsspec.filesystem(url.split("://", 1)[0])
    except ImportError as error:
        return f"the client library for {bucket} is not installed ({error}); pip install gcsfs"
    answer: list[str | None] = []

    def ask() -> None:
        try:
            answer.append(None if filesystem.exists(bucket) else f"the bucket {bucket} does not exist")
        except Exception as error:  # noqa: BLE001  (whatever the client raises: the reason is the message)
            answer.append(f"{type(error).__name__}: {error}".splitlines()[0][:200])

    asking = threading.Thread(target=ask, daemon=True)  # a client retrying past the deadline must not hold the exit
    asking.start()
    asking.join(PROBE_SECONDS)
    return answer[0] if answer else f"{bucket} did not answer within {PROBE_SECONDS} s"


def url_problems(paths: Iterable[tuple[str, str]]) -> list[str]:
    """One line per URL in `paths` ((config field, value) pairs) whose bucket cannot be reached, each
    naming the field and the path; local paths and empty values are not looked at. Each bucket is
    asked once."""
    reasons: dict[str, str | None] = {}
    found = []
    for field, value in paths:
        if not value or not is_url(value):
            continue
        bucket = _bucket(value)
        if bucket not in reasons:
            reasons[bucket] = _probe(value)
        if reasons[bucket]:
            found.append(f"{field} {value} cannot be reached: {reasons[bucket]}")
    return found
