#!/usr/bin/env python3
"""Re-vendor the viewer's JavaScript (MapLibre GL JS, pmtiles) from npm, or check it.

The viewer ships these files inside the package (src/tilesweep/view/static/vendor/) so
that nothing is fetched at install or run time. This script is the only way they change:

    python scripts/vendor_web.py --maplibre 5.24.1 --pmtiles 4.5.0   # re-vendor (needs npm)
    python scripts/vendor_web.py --check                              # offline: hashes match

Re-vendoring runs ``npm pack NAME@VERSION`` (which checks the tarball against the
registry's integrity), verifies the tarball's sha512 against ``npm view ... dist.integrity``
once more, copies the built files and licence texts, and rewrites ``SHA256SUMS`` and
``VERSIONS``. ``--check`` recomputes every vendored file's sha256 against ``SHA256SUMS``
and exits 1 on any difference (the tests run it).

MapLibre 6.x is ESM-only (two .mjs files plus a worker); the viewer loads one classic
script, so it stays on the 5.x line, which still ships the single UMD ``maplibre-gl.js``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "src" / "tilesweep" / "view" / "static" / "vendor"

# npm package -> {file in the tarball: name in vendor/}
FILES = {
    "maplibre-gl": {
        "package/dist/maplibre-gl.js": "maplibre-gl.js",
        "package/dist/maplibre-gl.css": "maplibre-gl.css",
        "package/LICENSE.txt": "LICENSE.maplibre-gl.txt",
    },
    "pmtiles": {
        "package/dist/pmtiles.js": "pmtiles.js",
    },
}

# The pmtiles tarball carries no licence file; its package.json says BSD-3-Clause.
PMTILES_LICENSE = """BSD 3-Clause License

Copyright (c) 2021, Protomaps LLC
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(vendor: Path = VENDOR) -> list[str]:
    """Differences between the vendored files and SHA256SUMS (empty: all match)."""
    sums = vendor / "SHA256SUMS"
    if not sums.is_file():
        return [f"{sums} is missing"]
    problems = []
    listed = set()
    for line in sums.read_text().splitlines():
        digest, name = line.split(None, 1)
        name = name.lstrip("*")
        listed.add(name)
        f = vendor / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif sha256(f) != digest:
            problems.append(f"{name}: sha256 {sha256(f)} != {digest}")
    for f in vendor.iterdir():
        if f.name not in listed | {"SHA256SUMS"}:
            problems.append(f"{f.name}: not listed in SHA256SUMS")
    return problems


def fetch(package: str, version: str, workdir: Path) -> bytes:
    spec = f"{package}@{version}"
    out = subprocess.run(["npm", "pack", spec, "--json"], cwd=workdir, check=True, capture_output=True, text=True)
    info = json.loads(out.stdout)[0]
    data = (workdir / info["filename"]).read_bytes()
    integrity = subprocess.run(
        ["npm", "view", spec, "dist.integrity"], check=True, capture_output=True, text=True
    ).stdout.strip()
    algo, _, b64 = integrity.partition("-")
    if algo != "sha512" or base64.b64decode(b64) != hashlib.sha512(data).digest():
        raise SystemExit(f"{spec}: tarball does not match the registry's integrity {integrity}")
    return data


def vendor(versions: dict[str, str], dest: Path = VENDOR) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for package, version in versions.items():
            data = fetch(package, version, Path(tmp))
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                for member, name in FILES[package].items():
                    f = tar.extractfile(member)
                    if f is None:
                        raise SystemExit(f"{package}@{version}: {member} not in the tarball")
                    (dest / name).write_bytes(f.read())
            print(f"vendored {package}@{version}")
    (dest / "LICENSE.pmtiles.txt").write_text(PMTILES_LICENSE)
    (dest / "VERSIONS").write_text("".join(f"{p} {v}\n" for p, v in versions.items()))
    names = sorted(f.name for f in dest.iterdir() if f.name != "SHA256SUMS")
    (dest / "SHA256SUMS").write_text("".join(f"{sha256(dest / n)}  {n}\n" for n in names))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maplibre", help="maplibre-gl version (5.x: the single UMD file)")
    ap.add_argument("--pmtiles", help="pmtiles version")
    ap.add_argument("--check", action="store_true", help="only check the vendored files against SHA256SUMS")
    args = ap.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        print("vendored files match SHA256SUMS" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if not (args.maplibre and args.pmtiles):
        ap.error("give --maplibre and --pmtiles versions (or --check)")
    if not args.maplibre.startswith("5."):
        ap.error("maplibre-gl 6.x is ESM-only; the viewer loads the 5.x UMD build")
    vendor({"maplibre-gl": args.maplibre, "pmtiles": args.pmtiles})
    return 0


if __name__ == "__main__":
    sys.exit(main())
