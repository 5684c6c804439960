"""The walkthrough notebook runs top to bottom (its code cells, in one namespace, as Jupyter would)."""
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_walkthrough_notebook_runs(tmp_path, monkeypatch):
    notebook = json.loads((ROOT / "notebooks" / "walkthrough.ipynb").read_text())
    monkeypatch.chdir(ROOT / "notebooks")
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "walkthrough.ipynb", "exec"), namespace)
    assert namespace["metrics"] and namespace["samples"]
    assert os.getcwd() == str(ROOT)
