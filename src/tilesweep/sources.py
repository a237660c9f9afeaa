"""Tile sources: where tile bytes come from, as URL templates.

A :class:`Source` is a URL template plus the few things a tile server needs (subdomains,
tile size, request headers). Placeholders, filled per tile by :meth:`Source.url`:

==============  ==========================================================================
``{z}``         zoom
``{x}``         column, from the west
``{y}``         row, from the north (XYZ, "slippy map")
``{-y}``        row, from the south (TMS), ``2**z - 1 - y``
``{q}``         Bing quadkey (``{quadkey}`` is the same)
``{s}``         a subdomain from ``subdomains``, chosen per tile as ``(x + y) % n``
``${NAME}``     the environment variable ``NAME``, read at request time
==============  ==========================================================================

A *bbox template* asks for an area instead (a WMS ``GetMap`` or a static-image API):
``{bbox}`` (EPSG:3857 metres ``minx,miny,maxx,maxy``) or ``{bbox_4326}`` (degrees
``west,south,east,north``) with ``{width}`` and ``{height}`` (pixels). With
``supertile=n`` (2, 4, 8 or 16) one request asks for an n x n block of tiles aligned to
the n-multiple grid, cut into tiles by :mod:`tilesweep.supertile`; with ``supertile=1``
each tile is its own request.

Secrets stay out of the template: write ``?access_token=${MAPBOX_TOKEN}`` (or a header
``Authorization: Bearer ${TOKEN}``) and the token is read from the environment each time a
URL is built. The template, ``to_config()``, ``str()``, ``repr()`` and ``redacted()`` keep
the ``${NAME}`` form; ``redacted()`` also masks secrets pasted literally into the template
(``access_token=...``, ``key=...``, ``user:password@``).

Presets (``parse_source("esri-world-imagery")``) are in :data:`PRESETS`; docs/sources.md
lists them with their licence notes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from .errors import UsageError
from .tiles import Tile, quadkey

_TOKEN = re.compile(r"\$\{([^}]*)\}|\{([^{}]*)\}")
"""``${NAME}`` (group 1) or ``{placeholder}`` (group 2)."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

PLACEHOLDERS = ("z", "x", "y", "-y", "q", "quadkey", "s", "bbox", "bbox_4326", "width", "height")
"""Placeholders a template may use (``${NAME}`` aside): tile ones, or bbox ones."""

BBOX_PLACEHOLDERS = ("bbox", "bbox_4326", "width", "height")
"""The placeholders of a bbox (WMS / static-image) template."""

SUPERTILE_SIZES = (1, 2, 4, 8, 16)
"""Tiles on a side of one bbox request (``Source.supertile``, ``--super``)."""

_SECRET_PARAMS = re.compile(
    r"(?i)([?&;](?:access_token|accesstoken|token|api_key|apikey|key|secret|signature|sig|password|pass|auth|client_secret)=)([^&#]*)"
)

SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Source:
    """An XYZ / TMS / quadkey tile URL template and how to ask for it.

    ``template`` is kept unexpanded (``${NAME}`` tokens in place); ``headers`` values may
    also hold ``${NAME}``. ``tile_size`` is the pixel size the server returns (512 for
    ``@2x`` templates). ``name`` is a short label for logs and status (a preset name, or the
    template's host). ``supertile``: tiles on a side of one request of a bbox template
    (1, 2, 4, 8 or 16; only 1 for a tile template)."""

    template: str
    subdomains: tuple[str, ...] = ("a", "b", "c")
    tile_size: int = 256
    headers: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    supertile: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "subdomains", tuple(self.subdomains))
        object.__setattr__(self, "headers", dict(self.headers))
        if not self.name:
            host = urlsplit(self.template).hostname or "source"
            object.__setattr__(self, "name", host.replace("{s}.", "").replace("${", "").strip("{}$"))
        object.__setattr__(self, "_parts", _compile(self.template, self.subdomains))
        object.__setattr__(self, "_env", env_names(self))
        if self.supertile not in SUPERTILE_SIZES or isinstance(self.supertile, bool):
            raise UsageError(f"super-tile size {self.supertile!r} is not one of {', '.join(map(str, SUPERTILE_SIZES))} (tiles on a side)")
        if self.supertile > 1 and not self.is_bbox:
            raise UsageError(
                f"--super {self.supertile} needs a bbox template ({{bbox}} or {{bbox_4326}} with {{width}} and {{height}}: "
                f"a WMS GetMap or a static-image API); {redact_url(self.template)!r} asks for one tile per request"
            )

    def __hash__(self) -> int:
        return hash((self.template, self.subdomains, self.tile_size, tuple(sorted(self.headers.items())), self.name, self.supertile))

    @property
    def is_bbox(self) -> bool:
        """Whether the template asks for an area (``{bbox}``...) rather than one tile."""
        return any(k == 2 and t in BBOX_PLACEHOLDERS for k, t in self._parts)  # type: ignore[attr-defined]

    # --- filling -------------------------------------------------------------------------

    def url(self, tile: Tile) -> str:
        """The URL of ``tile``, environment tokens expanded now (``UsageError`` names an
        unset variable, never a value). Do not log the result: log :meth:`redacted`. A bbox
        template asks for the tile's own box, ``tile_size`` px each way."""
        return self.area_url(tile, 1)

    def area_url(self, tile: Tile, n: int = 1) -> str:
        """The URL of the ``n`` x ``n`` tiles whose north-west tile is ``tile`` (a bbox
        template: its box, ``n * tile_size`` px each way); ``n`` 1 for a tile template."""
        z, x, y = tile
        if n != 1 and not self.is_bbox:
            raise ValueError(f"a tile template asks for one tile per request, not {n} x {n}")
        out: list[str] = []
        for kind, text in self._parts:  # type: ignore[attr-defined]
            if kind == 0:
                out.append(text)
            elif kind == 1:
                out.append(_env(text))
            elif text == "z":
                out.append(str(z))
            elif text == "x":
                out.append(str(x))
            elif text == "y":
                out.append(str(y))
            elif text == "-y":
                out.append(str((1 << z) - 1 - y))
            elif text == "q":
                out.append(quadkey(Tile(z, x, y)))
            elif text == "s":
                out.append(self.subdomains[(x + y) % len(self.subdomains)])
            elif text in ("width", "height"):
                out.append(str(n * self.tile_size))
            elif text == "bbox":
                out.append(",".join(_num(v) for v in mercator_bbox(z, x, y, n)))
            else:  # "bbox_4326"
                out.append(",".join(_num(v) for v in lonlat_bbox(z, x, y, n)))
        return "".join(out)

    def request_headers(self) -> dict[str, str]:
        """Headers with ``${NAME}`` tokens expanded now (never log the result)."""
        return {k: _expand(v) for k, v in self.headers.items()}

    def check_env(self) -> None:
        """``UsageError`` naming the first environment variable the source needs that is
        not set (or is empty)."""
        for name in self._env:  # type: ignore[attr-defined]
            _env(name)

    # --- showing -------------------------------------------------------------------------

    def redacted(self) -> str:
        """The template with any literal secret masked: safe for logs and error messages.
        ``${NAME}`` tokens are shown as they are (they hold no secret)."""
        return redact_url(self.template)

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        hdrs = {k: ("***" if _secret_header(k, v) else v) for k, v in self.headers.items()}
        return (
            f"Source(name={self.name!r}, template={self.redacted()!r}, subdomains={self.subdomains!r}, "
            f"tile_size={self.tile_size}, headers={hdrs!r})"
        )

    # --- config --------------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """A plain dict (TOML/JSON-ready), environment tokens unexpanded (``supertile``
        only when it is not 1, so tile sources keep the config they always had)."""
        d: dict[str, Any] = {
            "name": self.name,
            "template": self.template,
            "subdomains": list(self.subdomains),
            "tile_size": self.tile_size,
            "headers": dict(self.headers),
        }
        if self.supertile != 1:
            d["supertile"] = self.supertile
        return d

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> "Source":
        """Inverse of :meth:`to_config`; validates like :func:`parse_source` but does not
        require the environment variables to be set yet."""
        if not isinstance(d, Mapping) or "template" not in d:
            raise UsageError(f"source config {d!r} has no 'template'")
        unknown = sorted(set(d) - {"name", "template", "subdomains", "tile_size", "headers", "supertile"})
        if unknown:
            raise UsageError(f"source config has unknown key {unknown[0]!r}")
        headers = d.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise UsageError("source config 'headers' must be a table of strings")
        for k in headers:
            if not _HEADER_NAME.match(k):
                raise UsageError(f"header name {k!r} is not a valid HTTP header name")
        subdomains = d.get("subdomains", ("a", "b", "c"))
        if isinstance(subdomains, str) or not all(isinstance(s, str) for s in subdomains):
            raise UsageError(f"source subdomains {subdomains!r} must be a list of strings")
        return _validated(
            cls(
                template=str(d["template"]),
                subdomains=tuple(subdomains),
                tile_size=_tile_size(d.get("tile_size", 256)),
                headers=dict(headers),
                name=str(d.get("name") or ""),
                supertile=d.get("supertile", 1),
            ),
            check_env=False,
        )


# --- parsing -----------------------------------------------------------------------------


def parse_source(
    spec: str,
    headers: list[str] | None = None,
    *,
    subdomains: tuple[str, ...] | None = None,
    tile_size: int | None = None,
    check_env: bool = True,
    supertile: int | None = None,
) -> Source:
    """A :class:`Source` from a preset name or a URL template, plus ``"Name: value"`` header
    strings (``--header`` on the CLI). ``UsageError`` names the bad value: an unknown
    preset, a scheme other than http(s), a template missing ``{z}``/``{x}``/``{y}`` (or
    ``{-y}``, or ``{q}``, or a bbox template's ``{bbox}`` with ``{width}`` and ``{height}``),
    an unknown ``{placeholder}``, a malformed header, a ``supertile`` (``--super``) other
    than 1, 2, 4, 8, 16 or with a tile template, or (with ``check_env``) an environment
    variable that is not set."""
    spec = spec.strip()
    if spec in PRESETS:
        base = PRESETS[spec]
    elif "://" not in spec and "{" not in spec:
        raise UsageError(f"source {spec!r} is neither a URL template nor a preset ({', '.join(PRESETS)})")
    else:
        base = Source(spec)  # a bad template raises UsageError here
    hdrs = dict(base.headers)
    for h in headers or ():
        name, value = parse_header(h)
        hdrs[name] = value
    src = Source(
        template=base.template,
        subdomains=tuple(subdomains) if subdomains is not None else base.subdomains,
        tile_size=_tile_size(tile_size) if tile_size is not None else base.tile_size,
        headers=hdrs,
        name=base.name,
        supertile=supertile if supertile is not None else base.supertile,
    )
    return _validated(src, check_env=check_env)


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` -> ``(name, value)``; ``UsageError`` names the header (not its
    value, which may be a secret)."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or not _HEADER_NAME.match(name):
        shown = text.split()[0] if text.split() else text
        raise UsageError(f"header {shown!r}... is not 'Name: value'")
    value = value.strip()
    if "\n" in value or "\r" in value:
        raise UsageError(f"header {name!r} has a line break in its value")
    return name, value


def redact_url(url: str) -> str:
    """``url`` with literal secrets masked: query parameters named like a key or token, and
    ``user:password@``. ``${NAME}`` tokens are left as they are."""
    out = _SECRET_PARAMS.sub(lambda m: m.group(1) + (m.group(2) if m.group(2).startswith("${") else "***"), url)
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", out)


def env_names(source: Source) -> tuple[str, ...]:
    """Environment variables a source reads, in order of first use."""
    names: list[str] = []
    for text in (source.template, *source.headers.values()):
        for m in _TOKEN.finditer(text):
            if m.group(1) is not None and m.group(1) not in names:
                names.append(m.group(1))
    return tuple(names)


# --- internals ---------------------------------------------------------------------------


def _compile(template: str, subdomains: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """Split a template into (0, literal) / (1, env name) / (2, placeholder) parts."""
    parts: list[tuple[int, str]] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        if m.start() > pos:
            parts.append((0, template[pos : m.start()]))
        env, ph = m.group(1), m.group(2)
        if env is not None:
            if not _ENV_NAME.match(env):
                raise UsageError(f"environment token ${{{env}}} in template {redact_url(template)!r} is not ${{NAME}}")
            parts.append((1, env))
        else:
            if ph not in PLACEHOLDERS:
                raise UsageError(
                    f"unknown placeholder {{{ph}}} in template {redact_url(template)!r} "
                    f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}, ${{ENV_VAR}})"
                )
            parts.append((2, "q" if ph == "quadkey" else ph))
        pos = m.end()
    if pos < len(template):
        parts.append((0, template[pos:]))
    literal = "".join(t for k, t in parts if k == 0)
    if "{" in literal or "}" in literal:
        raise UsageError(f"template {redact_url(template)!r} has an unbalanced brace")
    scheme = urlsplit(template).scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(f"template {redact_url(template)!r} is not an http:// or https:// URL")
    have = {t for k, t in parts if k == 2}
    if have & set(BBOX_PLACEHOLDERS):
        tile_kind = sorted(have & {"z", "x", "y", "-y", "q"})
        if tile_kind:
            raise UsageError(f"template {redact_url(template)!r} mixes {{{tile_kind[0]}}} with a bbox placeholder: use one kind")
        if not (have & {"bbox", "bbox_4326"} and {"width", "height"} <= have) or {"bbox", "bbox_4326"} <= have:
            raise UsageError(
                f"template {redact_url(template)!r} needs one of {{bbox}} (EPSG:3857) or {{bbox_4326}} (degrees), "
                "and {width} and {height}"
            )
    elif not ("q" in have or ({"z", "x"} <= have and have & {"y", "-y"})):
        raise UsageError(
            f"template {redact_url(template)!r} needs {{z}}, {{x}} and {{y}} (or {{-y}} for TMS), or {{q}} for a quadkey"
        )
    if "s" in have and not subdomains:
        raise UsageError(f"template {redact_url(template)!r} uses {{s}} but the source has no subdomains")
    return tuple(parts)


def _validated(src: Source, *, check_env: bool) -> Source:
    if src.tile_size not in (256, 512):
        raise UsageError(f"tile size {src.tile_size!r} is not 256 or 512")
    if any(not s for s in src.subdomains):
        raise UsageError(f"subdomains {src.subdomains!r} contain an empty name")
    for k, v in src.headers.items():
        for m in _TOKEN.finditer(v):
            if m.group(1) is not None and not _ENV_NAME.match(m.group(1)):
                raise UsageError(f"environment token ${{{m.group(1)}}} in header {k!r} is not ${{NAME}}")
    if check_env:
        src.check_env()
    return src


def _tile_size(v: Any) -> int:
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise UsageError(f"tile size {v!r} is not 256 or 512") from None
    if n not in (256, 512) or n != v:
        raise UsageError(f"tile size {v!r} is not 256 or 512")
    return n


def mercator_bbox(z: int, x: int, y: int, n: int = 1) -> tuple[float, float, float, float]:
    """EPSG:3857 ``(minx, miny, maxx, maxy)`` in metres of the ``n`` x ``n`` zoom-``z``
    tiles whose north-west tile is ``x, y``."""
    from .tiles import xy_bounds

    minx, _, _, maxy = xy_bounds(Tile(z, x, y))
    _, miny, maxx, _ = xy_bounds(Tile(z, x + n - 1, y + n - 1))
    return (minx, miny, maxx, maxy)


def lonlat_bbox(z: int, x: int, y: int, n: int = 1) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` in degrees of the same tiles as :func:`mercator_bbox`."""
    from .tiles import bounds

    w, _, _, north = bounds(Tile(z, x, y))
    _, s, e, _ = bounds(Tile(z, x + n - 1, y + n - 1))
    return (w, s, e, north)


def _num(v: float) -> str:
    """A coordinate with enough digits (1e-9 m / 1e-11 degrees) and no float noise."""
    return f"{v:.9f}".rstrip("0").rstrip(".")


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UsageError(f"environment variable {name} is not set (the source template needs ${{{name}}})")
    return value


def _expand(text: str) -> str:
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: _env(m.group(1)), text)


def _secret_header(name: str, value: str) -> bool:
    if "${" in value and re.fullmatch(r"[^$]*(\$\{[A-Za-z_][A-Za-z0-9_]*\}[^$]*)+", value):
        return False  # only env tokens: nothing secret to hide
    return name.lower() in ("authorization", "proxy-authorization", "cookie", "x-api-key", "api-key") or "token" in name.lower() or "key" in name.lower()


# --- presets -----------------------------------------------------------------------------

PRESETS: dict[str, Source] = {
    "esri-world-imagery": Source(
        "https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/{z}/{y}/{x}",
        subdomains=(),
        tile_size=256,
        name="esri-world-imagery",
    ),
    "mapbox-satellite": Source(
        "https://api.mapbox.com/v4/mapbox.satellite/{z}/{x}/{y}@2x.jpg90?access_token=${MAPBOX_TOKEN}",
        subdomains=(),
        tile_size=512,
        name="mapbox-satellite",
    ),
    "usgs-imagery": Source(
        "https://basemap.nationalmap.gov/arcgis/rest/services/USGSImageryOnly/MapServer/tile/{z}/{y}/{x}",
        subdomains=(),
        tile_size=256,
        name="usgs-imagery",
    ),
}
"""Named sources; see docs/sources.md for coverage and licence notes."""


__all__ = [
    "Source", "PRESETS", "PLACEHOLDERS", "BBOX_PLACEHOLDERS", "SUPERTILE_SIZES", "parse_source", "parse_header",
    "redact_url", "env_names", "mercator_bbox", "lonlat_bbox",
]
