"""tilesweep: run a model over every map tile of a country, on one machine."""

__version__ = "0.1.0"
