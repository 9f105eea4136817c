"""The notebooks of notebooks/ run top to bottom at tiny sizes and show pictures.

Each notebook is executed with nbclient in a kernel of this Python (a
kernelspec written to a temporary folder, so no other installed ``python3``
kernel is picked up), with ``VF3D_NOTEBOOK_TINY=1`` and its working directory
in ``tmp_path``, where its outputs go. An error in any cell fails the test
(nbclient raises ``CellExecutionError``); so does a notebook without a
picture. Each notebook's run time is printed (``-s``) and in ``--durations``.
"""

import ast
import base64
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = ["image_to_3d.ipynb", "text_to_3d.ipynb", "train_lrm.ipynb", "data_engine.ipynb"]
KERNEL = "vf3d-jax-test-python"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
  """A folder holding one kernelspec: this interpreter running ipykernel."""
  from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top
  prefix = tmp_path_factory.mktemp("kernel")
  kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
  data = prefix / "share" / "jupyter"
  with open(data / "kernels" / KERNEL / "kernel.json") as f:
    assert json.load(f)["argv"][0] == sys.executable
  return str(data)


def _pictures(notebook) -> list[str]:
  """The picture outputs: PNG images, and HTML with a video, an image or the mesh viewer."""
  found = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      data = output.get("data", {})
      if "image/png" in data:
        png = base64.b64decode(data["image/png"])
        assert png.startswith(b"\x89PNG"), "an image/png output that is not a PNG"
        found.append("image/png")
      html = data.get("text/html", "")
      html = "".join(html) if isinstance(html, list) else html
      for tag in ("<video", "<img", "<iframe"):
        if tag in html:
          found.append(tag)
  return found


# Per notebook: extra environment, text its outputs must hold, the kinds of pictures it shows.
EXPECT = {
    # Asked for the released weights, offline with an empty Hugging Face cache and no local
    # copy: it says so and falls back to the embedded demo model.
    "image_to_3d.ipynb": (
        {"VF3D_RELEASED": "1", "VF3D_DOWNLOAD": "1"},
        ["model: the embedded demo model (the released weights are not available: ",
         "8 views at 32²", "pipeline.run, loading the model included: "],
        {"image/png", "<video", "<iframe"}),
    "text_to_3d.ipynb": ({}, ["'a red cone on a blue box' -> ", "first frame", "orbit video"],
                         {"image/png", "<video", "<iframe"}),
    "train_lrm.ipynb": ({}, ["steps of batch 4 on 4 device(s)", "step     4: psnr "],
                        {"image/png"}),
    "data_engine.ipynb": ({}, ["quality filter: fitted on 8 labelled videos, cross-validated accuracy 0.",
                               "records in", "(synthetic): "], {"image/png"}),
}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_and_shows_pictures(name, jupyter_path, tmp_path, monkeypatch):
  monkeypatch.setenv("JUPYTER_PATH", jupyter_path)  # searched before the user's kernels
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
  assert "google.colab" in notebook.cells[1].source and "REPO_URL" in notebook.cells[1].source
  assert "parameters" in notebook.cells[2].metadata.get("tags", [])
  extra, texts, kinds = EXPECT[name]
  env = {k: v for k, v in os.environ.items() if not k.startswith("VF3D_")}
  env.update(VF3D_NOTEBOOK_TINY="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
             MPLBACKEND="module://matplotlib_inline.backend_inline", **extra)
  client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=600,
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError at the first failing cell
  seconds = time.perf_counter() - start
  print(f"\n{name}: {seconds:.1f} s at tiny sizes")
  errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
  pictures = _pictures(notebook)
  assert kinds <= set(pictures), f"{name}: pictures {pictures}, want {kinds}"
  text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
  for expected in texts:
    assert expected in text, f"{name}: {expected!r} not in its output:\n{text[-3000:]}"
  setup = "".join(o.get("text", "") for o in notebook.cells[1].outputs)
  assert "backend cpu" in setup, setup
  assert (tmp_path / "outputs").is_dir()  # it wrote where it was started, not into the repo


def test_committed_notebooks_are_the_generators_without_outputs():
  done = subprocess.run([sys.executable, "-m", "tools.make_notebooks", "--check"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  for name in NAMES:
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None
        ast.parse(cell.source)  # a code cell that does not parse fails here, not in Colab
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == sorted(NAMES)


def test_display_helpers():
  from vf3d_jax import display  # pylint: disable=g-import-not-at-top
  frames = np.random.default_rng(0).random((10, 6, 5, 3)).astype(np.float32)
  strip = display.strip(frames, 4, gap=1)
  assert strip.shape == (6, 4 * 5 + 3, 3) and strip.dtype == np.uint8
  np.testing.assert_array_equal(strip[:, :5], display.to_uint8(frames[0]))
  assert (strip[:, 5] == 255).all()
  image = display.show_image(frames[0], scale=3)
  assert image.data.startswith(b"\x89PNG")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  assert Image.open(io.BytesIO(image.data)).size == (15, 18)
  assert display.timings({"a": 1.0, "mesh": 0.5}).splitlines()[-1].split() == ["total", "1.50", "s"]
