"""URL templates: filling, presets, environment tokens, redaction, config round trips, errors.
No network."""

from __future__ import annotations

import pytest

from tilesweep import tiles as T
from tilesweep.errors import UsageError
from tilesweep.sources import PRESETS, Source, env_names, parse_header, parse_source, redact_url

TILE = T.Tile(18, 137316, 91872)
SECRET = "pk.s3cr3t-value-1234567890"


def test_xyz_tms_quadkey_filling():
    src = parse_source("https://tiles.example.com/{z}/{x}/{y}.jpg")
    assert src.url(TILE) == "https://tiles.example.com/18/137316/91872.jpg"
    tms = parse_source("http://h/tms/{z}/{x}/{-y}.png")
    assert tms.url(TILE) == f"http://h/tms/18/137316/{(1 << 18) - 1 - 91872}.png"
    assert tms.url(TILE) == f"http://h/tms/18/137316/{T.tms_y(TILE)}.png"
    assert tms.url(T.Tile(0, 0, 0)) == "http://h/tms/0/0/0.png"
    q = parse_source("https://ecn.t0.tiles.virtualearth.net/tiles/a{q}.jpeg?g=1")
    assert q.url(TILE) == f"https://ecn.t0.tiles.virtualearth.net/tiles/a{T.quadkey(TILE)}.jpeg?g=1"
    assert q.url(T.Tile(3, 3, 5)) == "https://ecn.t0.tiles.virtualearth.net/tiles/a213.jpeg?g=1"
    # {quadkey} is the same placeholder (the simulator's templates use it)
    assert parse_source("http://h/q/{quadkey}.jpg").url(TILE) == f"http://h/q/{T.quadkey(TILE)}.jpg"
    # ESRI order z/y/x
    esri = parse_source("esri-world-imagery")
    assert esri.url(TILE).endswith("/tile/18/91872/137316")


def test_subdomains_are_deterministic_per_tile():
    src = parse_source("https://{s}.tile.example.org/{z}/{x}/{y}.png")
    assert src.subdomains == ("a", "b", "c")
    assert src.url(T.Tile(5, 0, 0)).startswith("https://a.")
    assert src.url(T.Tile(5, 1, 0)).startswith("https://b.")
    assert src.url(T.Tile(5, 1, 1)).startswith("https://c.")
    assert src.url(T.Tile(5, 2, 1)).startswith("https://a.")
    assert src.url(TILE) == src.url(TILE)
    custom = parse_source("https://mt{s}.example.com/{z}/{x}/{y}", subdomains=("0", "1", "2", "3"))
    hosts = {custom.url(T.Tile(10, x, 7)).split(".")[0] for x in range(8)}
    assert hosts == {"https://mt0", "https://mt1", "https://mt2", "https://mt3"}
    with pytest.raises(UsageError, match=r"\{s\}"):
        parse_source("https://{s}.example.com/{z}/{x}/{y}", subdomains=())


def test_env_tokens_expand_at_request_time_and_never_show(monkeypatch):
    monkeypatch.setenv("MAPBOX_TOKEN", SECRET)
    src = parse_source("mapbox-satellite")
    assert src.tile_size == 512 and src.name == "mapbox-satellite"
    assert src.url(TILE) == f"https://api.mapbox.com/v4/mapbox.satellite/18/137316/91872@2x.jpg90?access_token={SECRET}"
    # stored unexpanded, shown unexpanded
    for shown in (src.template, str(src), repr(src), src.redacted(), str(src.to_config())):
        assert SECRET not in shown
        assert "${MAPBOX_TOKEN}" in shown
    # read at request time, not at parse time
    monkeypatch.setenv("MAPBOX_TOKEN", "other")
    assert src.url(TILE).endswith("access_token=other")
    monkeypatch.delenv("MAPBOX_TOKEN")
    with pytest.raises(UsageError, match="MAPBOX_TOKEN") as e:
        src.url(TILE)
    assert "other" not in str(e.value)
    assert env_names(src) == ("MAPBOX_TOKEN",)


def test_env_var_not_set_is_named_not_valued(monkeypatch):
    monkeypatch.delenv("TS_TEST_KEY", raising=False)
    with pytest.raises(UsageError, match="environment variable TS_TEST_KEY is not set"):
        parse_source("https://h/{z}/{x}/{y}.png?key=${TS_TEST_KEY}")
    # configs may be loaded before the environment is ready
    src = parse_source("https://h/{z}/{x}/{y}.png?key=${TS_TEST_KEY}", check_env=False)
    with pytest.raises(UsageError, match="TS_TEST_KEY"):
        src.check_env()
    monkeypatch.setenv("TS_TEST_KEY", "")
    with pytest.raises(UsageError, match="TS_TEST_KEY"):
        src.check_env()


def test_headers_parse_expand_and_redact(monkeypatch):
    monkeypatch.setenv("TS_TEST_TOKEN", SECRET)
    src = parse_source(
        "https://h/{z}/{x}/{y}.png",
        ["Authorization: Bearer ${TS_TEST_TOKEN}", "Referer:  https://example.org/ ", "X-Api-Key: literal-secret"],
    )
    assert src.headers["Referer"] == "https://example.org/"
    assert src.request_headers()["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(src) and "literal-secret" not in repr(src)
    assert parse_header("Accept: image/*") == ("Accept", "image/*")
    for bad in ("no colon here", ": value", "Bad Name: x", "X-Token"):
        with pytest.raises(UsageError, match="Name: value"):
            parse_header(bad)
    with pytest.raises(UsageError, match="Name: value") as e:
        parse_source("https://h/{z}/{x}/{y}.png", ["Authorization Bearer abcdef123"])
    assert "abcdef123" not in str(e.value)


def test_redaction_of_literal_secrets():
    tpl = f"https://user:pw@h.example/{{z}}/{{x}}/{{y}}.png?api_key={SECRET}&style=sat&access_token=${{TOK}}"
    src = parse_source(tpl, check_env=False)
    shown = src.redacted()
    assert SECRET not in shown and "pw" not in shown
    assert "api_key=***" in shown and "style=sat" in shown and "access_token=${TOK}" in shown
    assert str(src) == shown
    assert redact_url("https://h/x.png?token=abc#f") == "https://h/x.png?token=***#f"


def test_config_round_trip(monkeypatch):
    monkeypatch.delenv("MAPBOX_TOKEN", raising=False)
    src = parse_source("mapbox-satellite", ["Referer: https://me.example"], check_env=False)
    cfg = src.to_config()
    assert cfg["template"] == PRESETS["mapbox-satellite"].template
    assert cfg["headers"] == {"Referer": "https://me.example"}
    back = Source.from_config(cfg)  # env not needed to load a config
    assert back == src and hash(back) == hash(src)
    s2 = parse_source("https://{s}.h/{z}/{x}/{y}.png", subdomains=("x", "y"), tile_size=512)
    assert Source.from_config(s2.to_config()) == s2
    with pytest.raises(UsageError, match="template"):
        Source.from_config({"name": "x"})
    with pytest.raises(UsageError, match="'subdomain'"):
        Source.from_config({"template": "https://h/{z}/{x}/{y}", "subdomain": ["a"]})
    with pytest.raises(UsageError, match="tile size 300"):
        Source.from_config({"template": "https://h/{z}/{x}/{y}", "tile_size": 300})


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ftp://h/{z}/{x}/{y}.png", "not an http"),
        ("file:///data/{z}/{x}/{y}.png", "not an http"),
        ("https://h/{z}/{x}.png", r"needs \{z\}, \{x\} and \{y\}"),
        ("https://h/{x}/{y}.png", r"needs \{z\}"),
        ("https://h/{z}/{x}/{y}/{foo}.png", r"unknown placeholder \{foo\}"),
        ("https://h/{z}/{x}/{Y}.png", r"unknown placeholder \{Y\}"),
        ("https://h/{z}/{x}/{y.png", "unbalanced brace"),
        ("https://h/{z}/{x}/{y}.png?k=${not valid}", r"\$\{not valid\}"),
        ("world-imagery", "neither a URL template nor a preset"),
    ],
)
def test_bad_templates_name_the_value(spec, match):
    with pytest.raises(UsageError, match=match) as e:
        parse_source(spec)
    assert "\n" not in str(e.value)


def test_bad_template_error_redacts_secrets():
    with pytest.raises(UsageError, match=r"\{foo\}") as e:
        parse_source(f"https://h/{{z}}/{{x}}/{{y}}/{{foo}}?key={SECRET}")
    assert SECRET not in str(e.value)


def test_presets_are_valid_and_named():
    for name, src in PRESETS.items():
        assert src.name == name
        assert Source.from_config(src.to_config()) == src
        assert src.template.startswith("https://")
    assert parse_source("esri-world-imagery").tile_size == 256
