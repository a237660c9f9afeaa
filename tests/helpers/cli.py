"""Run the `tilesweep` command as a real subprocess, the way a user does."""

import json
import os
import subprocess
import sys

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def tilesweep(*args, check=True, timeout=300, env=None):
    res = subprocess.run(
        [sys.executable, "-m", "tilesweep", *map(str, args)],
        capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def popen(*args, **kwargs):
    """Start `tilesweep ARGS` in its own process group (so a test can kill the group);
    ``env``: variables added to the tests' environment."""
    env = {**ENV, **kwargs.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tilesweep", *map(str, args)], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def status_json(sweep):
    return json.loads(tilesweep("status", sweep, "--json", check=False).stdout)
