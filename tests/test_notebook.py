"""docs/notebooks/results.ipynb runs from top to bottom (nbclient, a real kernel), so the
notebook a newcomer opens cannot rot: it builds a small sweep from the simulator, queries
it, draws the detections and counts them per district."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "docs" / "notebooks" / "results.ipynb"


def test_results_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the detections map and the per-district chart"
    assert (tmp_path / "detections.geojson").is_file() and (tmp_path / "per-district.csv").is_file()
    text = "".join(o.get("text", "") for o in outputs)
    assert "detections of demo" in text and "wrote 4 rows" in text
