"""The README's two-minute tour runs as written (issue 16), so it cannot drift again.

The tour's ```sh block is extracted from README.md and run by bash, line after line with
``set -e``, in a fresh folder holding what a clone has (the venv and examples/). What is
changed: the simulator's port (8080 is taken by whatever else runs here) becomes a free
one everywhere in the block; after a line backgrounded with ``&`` that names ``--port N``,
the script waits for that port to listen; every background job is stopped at the end.
Steps that others add later (query, view, ...) run the same way: a long-running command
must be backgrounded with ``&`` in the README, as a user would type it.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def tour_block(text: str, heading: str = "A two-minute tour") -> str:
    """The first ```sh block after the heading '## {heading}'."""
    head = re.search(rf"^## {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert head, f"README.md has no '## {heading}' heading"
    block = re.search(r"^```sh\n(.*?)^```\s*$", text[head.end():], re.MULTILINE | re.DOTALL)
    assert block, f"the section {heading!r} has no ```sh block"
    return block.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tour_script(block: str, port: int | None = None) -> str:
    """The bash script that runs the block as written (see the module doc): every port a
    line names with ``--port N`` becomes a free one (``port`` for the first, in tests)."""
    for i, n in enumerate(dict.fromkeys(re.findall(r"--port[ =](\d+)", block))):
        block = re.sub(rf"\b{n}\b", str(port if port is not None and i == 0 else free_port()), block)
    lines = []
    logical = ""
    for raw in block.splitlines():
        logical += raw
        if raw.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        line, logical = logical, ""
        lines.append(line)
        background = re.search(r"&\s*(#.*)?$", line) and not re.search(r"&&\s*(#.*)?$", line)
        ports = re.findall(r"--port[ =](\d+)", line)
        if background and ports:
            lines.append(f"_tour_wait_port {ports[0]}")
    prelude = """set -euo pipefail
trap 'jobs -p | xargs -r kill 2>/dev/null; wait 2>/dev/null || true' EXIT
_tour_wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1 after 30 s" >&2; return 1
}
"""
    return prelude + "\n".join(lines) + "\n"


def test_the_extraction_keeps_commands_and_waits_for_servers():
    block = ("source x\n# a comment\ntilesweep sim serve --port 8080 &\ntilesweep fetch s \\\n  --source 'http://127.0.0.1:8080/{z}'\n"
             "tilesweep view s --port 8765 &  # http://127.0.0.1:8765/\n")
    script = tour_script(block, 9999)
    assert "tilesweep sim serve --port 9999 &\n_tour_wait_port 9999\n" in script
    assert "tilesweep fetch s    --source 'http://127.0.0.1:9999/{z}'" in script
    assert "8080" not in script and "8765" not in script
    view = re.search(r"tilesweep view s --port (\d+) &  # http://127.0.0.1:(\d+)/\n_tour_wait_port (\d+)\n", script)
    assert view and len(set(view.groups())) == 1, script


TOUR_TIMEOUT_S = 840  # about a minute on an idle 2-core machine; much more when it is shared
HAS_VENV = (ROOT / ".venv" / "bin" / "activate").is_file() or (Path(sys.prefix) / "bin" / "activate").is_file()


def run_block(script: str, folder: Path, env_extra: dict[str, str] | None = None) -> tuple[str, str]:
    """Run ``script`` with bash -x in ``folder`` (given the venv and examples/ of a clone);
    fail on a non-zero exit, a traceback or the timeout. Returns stdout, stderr."""
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "activate").is_file() else Path(sys.prefix)
    if not (folder / ".venv").exists():
        (folder / ".venv").symlink_to(venv)
    if (ROOT / "examples").is_dir() and not (folder / "examples").exists():
        shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / "tour.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "PS4": "+ [$SECONDS s] "}, **(env_extra or {}))
    # its own process group: on a timeout the servers it started go too
    proc = subprocess.Popen(["bash", "-x", "tour.sh"], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TOUR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the block ran past {TOUR_TIMEOUT_S} s\nstdout: {stdout[-4000:]}\nstderr: {stderr[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"the block stopped (exit {proc.returncode})\nstdout: {stdout[-4000:]}\nstderr: {stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    return stdout, stderr


@pytest.mark.timeout(TOUR_TIMEOUT_S + 60)
@pytest.mark.skipif(not HAS_VENV, reason="the tour sources .venv/bin/activate: no virtual environment to link")
def test_the_readme_tour_runs_as_written(tmp_path):
    run_block(tour_script(tour_block(README.read_text(encoding="utf-8"))), tmp_path)
    # what the tour says it makes
    assert (tmp_path / "t.jpg").read_bytes()[:3] == b"\xff\xd8\xff", "tiles get wrote a JPEG"
    assert (tmp_path / "bern.pmtiles").read_bytes()[:7] == b"PMTiles"
    assert (tmp_path / "sample" / "queue.sqlite").is_file()
    assert list((tmp_path / "bern" / "predictions").rglob("part-*.parquet"))
    assert list((tmp_path / "bern2" / "predictions").rglob("part-*.parquet"))



@pytest.mark.timeout(TOUR_TIMEOUT_S + 60)
@pytest.mark.skipif(not HAS_VENV, reason="the block sources .venv/bin/activate: no virtual environment to link")
def test_the_readme_many_machines_section_runs_as_written(tmp_path, s3_server, pg_server, monkeypatch):
    """The "Many machines" block, after the tour's `source .venv/bin/activate`, with SWEEP and
    QUEUE set as it tells a reader to: a bucket of the session's SeaweedFS, a database of the
    session's PostgreSQL (its password in PGPASSWORD)."""
    pytest.importorskip("distributed", reason="the dask extra (distributed) is not installed")
    import uuid

    from helpers import seaweed

    sweep = f"s3://{seaweed.BUCKET}/readme-{uuid.uuid4().hex[:8]}"
    script = tour_script("source .venv/bin/activate\n" + tour_block(README.read_text(encoding="utf-8"), "Many machines"))
    env = s3_server.env(SWEEP=sweep, QUEUE=pg_server.url(), PGPASSWORD=os.environ["PGPASSWORD"],
                        TILESWEEP_STATE_DIR=str(tmp_path / "state"))
    stdout, _ = run_block(script, tmp_path, env)
    assert list((tmp_path / "bern-dask" / "predictions").rglob("part-*.parquet"))
    assert "machine " in stdout
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    from tilesweep.storage import open_storage

    keys = [o.key for o in open_storage(sweep).list()]
    assert "sweep.toml" in keys and any(k.startswith("predictions/") and k.endswith(".parquet") for k in keys), keys
