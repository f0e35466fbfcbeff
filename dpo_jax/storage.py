"""Where a run's files live: a local folder, or an object store (``gs://``; ``s3://`` where s3fs
is installed), through one path type.

- ``path(s)``: a ``pathlib.Path`` for a local path (absolute, ``~`` expanded), an
  ``etils.epath.Path`` for a URL (orbax's own path type: the same code reads and writes both).
  A string that looks like a URL but is not one we serve (``gs:/x``, ``gcs://x``) is an error,
  never a local folder.
- ``check_access(url)``: before anything is written, that the bucket can be reached with the
  credentials at hand; one line naming the bucket and how to authenticate when not.
- An emulator: the standard ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (what
  google-cloud-storage and gcsfs read) is passed on to tensorstore, which writes orbax's arrays
  (``TENSORSTORE_GCS_HTTP_URL``, and a dummy token in place of Google credentials).
- ``Mirror``: an object store cannot append, and transformers / tensorboardX write local files.
  A run on a remote workdir writes its run files (metrics.jsonl, samples.jsonl, train.log,
  config.json, tokenizer/, TensorBoard events, the reference cache, hf/, adapter/,
  summary.json) into a local staging folder and the mirror copies what changed to the bucket:
  at start it pulls them back (a resume on another VM continues them), then it pushes them at
  every checkpoint, at most every ``PUSH_SECONDS`` at a logging step, and at the end. Each push
  replaces whole objects (atomic on GCS). Lines written after the last push are lost with a
  killed VM, as the steps after the last checkpoint are: the resume redoes and logs them once.
  Checkpoints go straight to the bucket through orbax.
- ``Lease``: the workdir's lock on an object store: an object created only if absent
  (a generation precondition), refreshed every ``LEASE_REFRESH`` seconds, deleted at exit.
  A second run stops naming the holder; a holder that stopped refreshing (killed) is taken over
  after ``LEASE_SECONDS``, at once when it was a dead process on this host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from dpo_jax.errors import DpoError

log = logging.getLogger(__name__)

SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}  # URL scheme -> the fsspec package that serves it
PUSH_SECONDS = 60.0
LEASE_SECONDS = 60.0
LEASE_REFRESH = 15.0
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)(.*)$")


def is_url(s) -> bool:
    return isinstance(s, str) and _URL.match(s) is not None and ":/" in s


def path(s, what: str = "--workdir"):
    """A local ``Path`` or an object-store ``epath.Path`` (see the module docstring)."""
    s = str(s)
    m = _URL.match(s)
    if m is None or not m.group(2):  # a local path (a name may hold a colon: "a:b")
        return Path(s).expanduser().absolute()
    scheme, slashes, rest = m.group(1).lower(), m.group(2), m.group(3)
    if scheme not in SCHEMES:
        raise DpoError(f"{what} {s}: {scheme}:// is not a storage this project serves "
                       f"(a local path, or {', '.join(k + '://' for k in SCHEMES)})")
    if slashes != "//" or not rest or rest.startswith("/"):
        raise DpoError(f"{what} {s}: not a {scheme}:// URL ({scheme}://BUCKET/PATH: two slashes, "
                       "then the bucket)")
    use_emulator()
    try:
        __import__(SCHEMES[scheme])
    except ImportError:
        raise DpoError(f"{what} {s}: {scheme}:// needs the {SCHEMES[scheme]} package "
                       f"(pip install {SCHEMES[scheme]})") from None
    from etils import epath
    return epath.Path(f"{scheme}://{rest.rstrip('/')}")


def is_remote(p) -> bool:
    return not isinstance(p, Path) and str(p).split("://")[0] in SCHEMES and "://" in str(p)


def bucket(p) -> str:
    scheme, rest = str(p).split("://", 1)
    return f"{scheme}://{rest.split('/')[0]}"


def use_emulator():
    """Passes ``STORAGE_EMULATOR_HOST`` on to tensorstore (orbax's array writer), which does
    not read it; quiets google-auth's fallback to no credentials (an emulator needs none)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if host.startswith("http") else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # gcsfs's hierarchical-namespace check calls the storage-control gRPC API, which an
    # emulator does not serve (it waits 60 s per bucket for it); the plain JSON API remains
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    logging.getLogger("gcsfs.core").setLevel(logging.ERROR)
    logging.getLogger("google.auth").setLevel(logging.ERROR)  # its fallback to no credentials


def move(src, dst):
    """Renames a file or folder: on an object store, a copy of every object, then a delete."""
    if not is_remote(src):
        Path(src).rename(dst)
        return
    fs = filesystem(src)
    a, b = (str(x).split("://", 1)[1] for x in (src, dst))
    fs.copy(a, b, recursive=True)
    fs.rm(a, recursive=True)
    fs.invalidate_cache()


def filesystem(p):
    """The fsspec filesystem of a URL (gcsfs / s3fs): the very instance epath (so orbax) uses,
    so both see one listing cache (two instances would each cache what the other changed)."""
    from etils.epath import backend
    return backend.fsspec_backend.fs(str(p))


def check_access(p, what: str = "--workdir"):
    """That ``p``'s bucket answers with this machine's credentials: one line naming the bucket
    and how to authenticate when not (rather than retries and a tensorstore error later)."""
    b = bucket(p)
    if b.startswith("gs://") and not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth
        try:
            google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError:
            raise DpoError(
                f"{what} {p}: no Google Cloud credentials for bucket {b[5:]} (run `gcloud auth "
                "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a service "
                "account key, or run on a GCP VM whose service account may write the bucket; "
                "for an emulator set STORAGE_EMULATOR_HOST)") from None
    try:
        fs = filesystem(p)
        fs.ls(b.split("://")[1], detail=False)
    except FileNotFoundError:
        raise DpoError(f"{what} {p}: bucket {b} does not exist (create it first: "
                       f"gcloud storage buckets create {b})") from None
    except Exception as e:
        raise DpoError(f"{what} {p}: bucket {b} cannot be reached "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                       ) from None


# =========================================================================== files

def fetch(url: str, what: str) -> Path:
    """A local copy of a remote file or folder (data, an adapter, a checkpoint's run files),
    cached by its URL and the objects' sizes and times: fetched again only when they change."""
    p = path(url, what)
    check_access(p, what)
    fs = filesystem(p)
    key = str(p).split("://", 1)[1]
    try:
        infos = fs.find(key, detail=True, withdirs=False) if fs.isdir(key) else \
            {key: fs.info(key)}
    except FileNotFoundError:
        infos = {}
    if not infos:
        raise DpoError(f"{what} {url}: no such object or folder")
    stamp = json.dumps(sorted((k, v.get("size"), str(v.get("updated") or v.get("mtime") or
                                                       v.get("generation"))) for k, v in
                              infos.items()))
    digest = hashlib.sha256((str(p) + stamp).encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / "dpo_jax_fetch" / digest / p.name
    if not local.exists():
        tmp = local.with_name(local.name + f".part{os.getpid()}")
        _remove(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if len(infos) == 1 and key in infos:
            fs.get(key, str(tmp))
        else:
            for k in infos:
                dest = tmp / os.path.relpath(k, key)
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get(k, str(dest))
        try:
            os.replace(tmp, local)
        except OSError:  # another process on this host fetched the same objects first
            if not local.exists():
                raise
            _remove(tmp)
    return local


def _remove(p: Path):
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


class Mirror:
    """A remote workdir's run files, staged in a local folder (see the module docstring)."""

    SKIP = ("checkpoints", "wandb")  # orbax writes checkpoints itself; wandb syncs its own

    def __init__(self, remote, staging: Path | None = None):
        self.remote = remote
        digest = hashlib.sha256(str(remote).encode()).hexdigest()[:12]
        self.local = staging or Path(tempfile.gettempdir()) / "dpo_jax_staging" / \
            f"{remote.name}-{digest}-{os.getpid()}"
        self.fs = filesystem(remote)
        self.key = str(remote).split("://", 1)[1]
        self.pushed: dict[str, tuple] = {}
        self.last_push = 0.0
        self.lease = None  # the workdir's Lease: a push checks it is still held

    def pull(self):
        """The remote run files into a fresh staging folder (a resume continues them)."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        try:
            found = self.fs.find(self.key, detail=True, withdirs=False)
        except FileNotFoundError:
            found = {}
        for k, info in found.items():
            rel = os.path.relpath(k, self.key)
            top = rel.split("/")[0]
            if top in self.SKIP or top.startswith("lock") or top in ("hf", "adapter"):
                continue
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(k, str(dest))
            st = dest.stat()
            self.pushed[rel] = (st.st_size, st.st_mtime_ns)
        return self.local

    def push(self, *, every: float = 0.0, strict: bool = False) -> int:
        """Copies the staged files that changed since the last push; returns how many. With
        ``every``, only when that many seconds have passed since the last such push. A failure is
        a warning (the next push retries) unless ``strict``."""
        if every:  # the logging steps' cadence (the other pushes do not delay it)
            if time.monotonic() - self.last_push < every:
                return 0
            self.last_push = time.monotonic()
        if self.lease is not None:
            self.lease.check()
        n = 0
        for f in sorted(self.local.rglob("*")):
            rel = f.relative_to(self.local).as_posix()
            top = rel.split("/")[0]
            if not f.is_file() or top in self.SKIP or rel.endswith((".tmp", ".part")):
                continue
            st = f.stat()
            if self.pushed.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            try:
                self.fs.put_file(str(f), f"{self.key}/{rel}")
            except Exception as e:
                message = f"copying {rel} to {self.remote}/{rel} failed ({type(e).__name__}: {e})"
                if strict:
                    raise DpoError(message) from None
                log.warning("%s; retried at the next push", message)
                continue
            self.pushed[rel] = (st.st_size, st.st_mtime_ns)
            n += 1
        return n

    def close(self):
        shutil.rmtree(self.local, ignore_errors=True)


# =========================================================================== lease

class Lease:
    """One writer per remote workdir (see the module docstring)."""

    def __init__(self, url: str):
        from google.cloud import storage as gcs
        self.url = url
        b, _, name = url.split("://", 1)[1].partition("/")
        client = (gcs.Client.create_anonymous_client() if os.environ.get("STORAGE_EMULATOR_HOST")
                  else gcs.Client())
        self.blob = client.bucket(b).blob(name)
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.generation = None
        self.lost = False
        self._stop = threading.Event()
        self._acquire()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="lease")
        self._thread.start()

    def _body(self) -> str:
        return json.dumps({"holder": self.holder, "pid": os.getpid(),
                           "host": socket.gethostname(), "refreshed": time.time(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")})

    def _write(self, generation: int):
        from google.api_core import exceptions as gexc
        try:
            self.blob.upload_from_string(self._body(), if_generation_match=generation)
        except gexc.PreconditionFailed:
            return False
        self.generation = self.blob.generation
        return True

    def _acquire(self):
        if self._write(0):
            return
        self.blob.reload()
        try:
            held = json.loads(self.blob.download_as_bytes(if_generation_match=self.blob.generation))
        except Exception:
            held = {}
        age = time.time() - float(held.get("refreshed", 0))
        dead_here = (held.get("host") == socket.gethostname() and held.get("pid")
                     and not _alive(int(held["pid"])))
        if age < LEASE_SECONDS and not dead_here:
            raise DpoError(f"{self.url.rsplit('/', 1)[0]} is in use by another run "
                           f"({held.get('holder', 'unknown')}, since {held.get('since', '?')}, "
                           f"refreshed {age:.0f} s ago); wait for it to end, or use another "
                           f"--workdir (a killed run's lease expires {LEASE_SECONDS:.0f} s "
                           "after its last refresh)")
        if not self._write(self.blob.generation):
            raise DpoError(f"{self.url}: another run took the workdir's lease at the same time")
        log.info("took over the lease of %s (%s)", held.get("holder", "unknown"),
                 "its process is gone" if dead_here else f"not refreshed for {age:.0f} s")

    def _refresh(self):
        while not self._stop.wait(LEASE_REFRESH):
            try:
                if not self._write(self.generation):
                    self.lost = True
                    log.error("%s: another run took this workdir's lease", self.url)
                    return
            except Exception as e:  # a transient storage fault: retried at the next refresh
                log.warning("refreshing %s failed (%s)", self.url, e)

    def check(self):
        if self.lost:
            raise DpoError(f"{self.url}: another run took this workdir's lease (this run was "
                           "taken for dead); stopping without writing more")

    def release(self):
        self._stop.set()
        self._thread.join(timeout=5)
        if self.generation is not None and not self.lost:
            try:
                self.blob.delete(if_generation_match=self.generation)
            except Exception as e:
                log.warning("releasing %s failed (%s); it expires on its own", self.url, e)
        self.generation = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
