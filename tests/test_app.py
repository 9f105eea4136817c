"""The web app (``vf3d_jax/app.py``) in a real browser, and its handlers without one.

The browser is Debian's headless Chromium (``/usr/bin/chromium``, installed by
``make setup``) driven by Playwright. The app runs in-process on a free port
with the demo model (``examples/lrm_tiny.safetensors``) at tiny sizes.
``VF3D_UPDATE_FIGURES=1`` saves the app's screenshot to docs/figures/app.png
(the README's figure); otherwise it goes to the test's temporary folder.
"""

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web app needs the app extra (gradio 5)")
# pylint: disable=g-import-not-at-top,wrong-import-position,protected-access

from configs import infer as infer_configs
from vf3d_jax import app as app_lib
from vf3d_jax.engine import engine
from vf3d_jax.engine import labelling
from vf3d_jax.engine import quality
from vf3d_jax.inference import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
EXAMPLE = os.path.join(REPO, "examples", "images", "checkered_cone_on_a_box.png")
FIGURE = os.path.join(REPO, "docs", "figures", "app.png")
# Headless Chromium has no GPU: WebGPU (what the viewer's Babylon.js picks in Chromium) on
# SwiftShader's Vulkan.
BROWSER_ARGS = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader",
                "--enable-features=Vulkan", "--use-vulkan=swiftshader",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
PROMPTS = ["a red box", "a green ball", "a blue cone"]


def _browser_missing() -> str | None:
  if not os.path.exists(CHROMIUM):
    return (f"no {CHROMIUM}: `make setup` installs Debian's chromium and chromium-driver "
            "(as root or with sudo)")
  try:
    import playwright.sync_api  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return "playwright is missing: `make setup` installs it (requirements.lock)"
  return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None,
                                   reason=_browser_missing() or "")


def _config():
  """The demo config at sizes that run in seconds on a CPU."""
  config = infer_configs.get_config("demo")
  config.render.update(num_views=6, resolution=48, num_coarse=16, num_fine=16, views_per_call=6)
  config.mesh.update(resolution=40, texture_size=64)
  return config


def _engine_run(root) -> list[str]:
  """An engine workdir with three 8-frame 16x16 orbit videos, laid out as the engine's videos
  stage writes them; returns their ids."""
  rows = [{"id": engine.prompt_id(p), "prompt": p} for p in PROMPTS]
  work = engine.Workdir(str(root))
  os.makedirs(work.root, exist_ok=True)
  with open(work.path(engine.PROMPTS), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  videos = np.full((3, 8, 16, 16, 3), 255, np.uint8)
  for i, colour in enumerate([(200, 30, 30), (30, 160, 60), (40, 60, 200)]):
    for t in range(8):
      videos[i, t, 4:12, 2 + t:8 + t] = colour  # a square moving right
  engine.save_npz(work.shard("videos", 0), ids=np.array([r["id"] for r in rows]), videos=videos)
  return [r["id"] for r in rows]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(root, **kwargs):
  blocks = app_lib.build_app(_config(), pipeline.DEMO_CHECKPOINT, str(root / "outputs"),
                             labels_dir=str(root / "engine"),
                             labels_file=str(root / "labels.csv"), **kwargs)
  port = _free_port()
  app_lib.serve(blocks, str(root / "outputs"), port=port, block=False)
  return blocks, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("app")
  ids = _engine_run(root / "engine")
  blocks, url = _start(root)
  yield root, ids, blocks, url
  blocks.close()


@pytest.fixture(scope="module")
def browser():
  if _browser_missing():
    pytest.skip(_browser_missing())
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  with sync_playwright() as p:
    chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
    yield chromium
    chromium.close()


def _object_fraction(png: bytes) -> float:
  """Of the viewer's canvas (its top strip of labels and buttons left out), the pixels that
  are not the viewer's background."""
  pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)[40:]
  background = np.asarray(app_lib.VIEWER_BACKGROUND[:3]) * 255
  return float(np.mean(np.abs(pixels - background).max(-1) > 24))


def _wait_text(page, selector: str, text: str, timeout_s: float = 30) -> str:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    shown = page.locator(selector).inner_text()
    if text in shown:
      return shown
    time.sleep(0.2)
  raise AssertionError(f"{selector} never showed {text!r}; it shows {shown!r}")


@needs_browser
def test_image_to_3d_shows_the_mesh_in_the_viewer(served, browser, tmp_path):
  root, _, _, url = served
  page = browser.new_page(viewport={"width": 1280, "height": 1400})
  page.goto(url)
  page.locator("#image-upload input[type=file]").set_input_files(EXAMPLE)
  page.locator("#image-upload img").first.wait_for(timeout=30_000)  # the upload's preview
  page.locator("#image-run").click()
  canvas = page.locator("#image-mesh canvas")
  canvas.wait_for(timeout=120_000)
  deadline, fraction = time.time() + 30, 0.0
  while time.time() < deadline and fraction < 0.05:  # until the viewer has drawn the mesh
    fraction = _object_fraction(canvas.screenshot())
    time.sleep(0.5)
  assert fraction > 0.05, f"the viewer shows {fraction:.1%} non-background pixels"
  summary = page.locator("#image-summary textarea").input_value()
  assert "matte image" in summary and "total" in summary, summary
  files = "".join(page.locator("#image-files").inner_text().split())
  assert "mesh.glb" in files and "turntable.mp4" in files, files
  folders = os.listdir(root / "outputs")
  assert len(folders) == 1 and folders[0].endswith("checkered_cone_on_a_box"), folders
  assert sorted(os.listdir(root / "outputs" / folders[0])) == [
      "input.png", "mesh.glb", "turntable.mp4"]
  page.locator("#image-turntable video").wait_for(timeout=30_000)
  time.sleep(1.0)  # the turntable's first frame and the matte preview
  figure = FIGURE if os.environ.get("VF3D_UPDATE_FIGURES") == "1" else str(tmp_path / "app.png")
  page.screenshot(path=figure, full_page=True)
  page.close()


@needs_browser
def test_labelling_records_good_and_bad_and_resumes(served, browser, tmp_path):
  root, ids, _, url = served
  page = browser.new_page(viewport={"width": 1280, "height": 1000})
  page.goto(url)
  page.get_by_role("tab", name="Labelling").click()
  _wait_text(page, "#label-caption", ids[0])
  _wait_text(page, "#label-progress", "0 of 3 labelled")
  page.locator("#label-video video").wait_for(timeout=30_000)
  page.locator("#label-good").click()
  _wait_text(page, "#label-caption", ids[1])
  page.locator("#label-bad").click()
  _wait_text(page, "#label-caption", ids[2])
  _wait_text(page, "#label-progress", "2 of 3 labelled (1 good, 1 bad)")
  assert quality.read_labels(root / "labels.csv") == {ids[0]: True, ids[1]: False}
  page.close()

  # A second app on the same files starts at the third video.
  blocks, second = _start(root)
  try:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(second)
    page.get_by_role("tab", name="Labelling").click()
    _wait_text(page, "#label-caption", ids[2])
    _wait_text(page, "#label-progress", "2 of 3 labelled")
    page.close()
  finally:
    blocks.close()


def test_runs_wait_in_one_queue(served, monkeypatch):
  """Two users at once: both runs finish, one after the other."""
  from gradio_client import Client, handle_file  # pylint: disable=g-import-not-at-top
  _, _, blocks, url = served
  assert blocks._queue.default_concurrency_limit == 1
  model_events = [f for f in blocks.fns.values() if f.api_name in ("reconstruct", "text_to_3d")]
  assert len(model_events) == 2
  assert {(f.concurrency_id, f.concurrency_limit) for f in model_events} == {("model", 1)}
  spans, lock = [], threading.Lock()
  call = pipeline.Reconstructor.__call__

  def timed(self, *args, **kwargs):
    start = time.perf_counter()
    try:
      return call(self, *args, **kwargs)
    finally:
      with lock:
        spans.append((start, time.perf_counter()))

  monkeypatch.setattr(pipeline.Reconstructor, "__call__", timed)
  client = Client(url, verbose=False)
  jobs = [client.submit(handle_file(EXAMPLE), api_name="/reconstruct") for _ in range(2)]
  results = [job.result(timeout=180) for job in jobs]
  assert all("total" in r[0] for r in results), [r[0] for r in results]
  (a0, a1), (b0, b1) = sorted(spans)
  assert b0 >= a1, f"the two runs overlapped: {spans}"


def test_bad_uploads_are_one_message(tmp_path):
  models = app_lib.Models(_config(), pipeline.DEMO_CHECKPOINT)
  text = tmp_path / "notes.png"
  text.write_text("not an image at all\n")
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(open(EXAMPLE, "rb").read()[:200])
  clear = tmp_path / "clear.png"
  Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(clear)
  out = tmp_path / "outputs"
  for path, words in ((text, "cannot read image notes.png"), (empty, "cannot read image empty.jpg"),
                      (truncated, "cannot read image truncated.png"),
                      (clear, "no foreground in clear.png"), (None, "upload an image first")):
    outcome = app_lib.reconstruct_image(models, str(out), None if path is None else str(path))
    assert outcome.error and words in outcome.error, (path, outcome.error)
    assert "\n" not in outcome.error and "Traceback" not in outcome.error
    assert str(tmp_path) not in outcome.error  # named by its own name, not the server's path
  assert not out.exists() or not os.listdir(out)
  # Gradio's own Image preprocessing cannot open the text file: the upload still reaches the
  # handler, which gives the message above instead of Gradio's generic error.
  from gradio.data_classes import ImageData  # pylint: disable=g-import-not-at-top
  upload = app_lib._image_upload_class()(type="filepath", image_mode=None)
  assert upload.preprocess(ImageData(path=str(text), orig_name="notes.png")) == str(text)
  assert app_lib.prompt_to_3d(models, str(out), "  ").error == "type a prompt first"


def test_labels_file_skips_and_resume(tmp_path):
  ids = _engine_run(tmp_path / "engine")
  labels = str(tmp_path / "labels.csv")
  labeller = app_lib.Labeller(str(tmp_path / "engine"), labels, fps=8)
  view = labeller.view()
  assert (view.video_id, view.progress) == (ids[0], "0 of 3 labelled (0 good, 0 bad), 0 skipped")
  frames = np.stack(imageio.mimread(view.video))
  assert frames.shape[:3] == (8, 256, 256)  # 16x16 enlarged 16 times
  view = labeller.mark(view.video_id, "skip")
  assert view.video_id == ids[1] and view.progress.endswith("1 skipped")
  assert not os.path.exists(labels)  # a skip is not a label: the side file holds it
  assert open(labelling.skipped_path(labels)).read() == ids[0] + "\n"
  view = labeller.mark(view.video_id, "bad")
  assert labeller.mark(ids[1], "good").video_id == ids[2]  # labelled already: kept as bad
  assert quality.read_labels(labels) == {ids[1]: False}
  assert open(labels).read() == f"video_id,label\n{ids[1]},bad\n"
  view = app_lib.Labeller(str(tmp_path / "engine"), labels, fps=8).mark(ids[2], "good")
  assert view.video_id is None and view.progress == "2 of 3 labelled (1 good, 1 bad), 1 skipped"
  # A JSONL labels file gets JSONL rows.
  jsonl = str(tmp_path / "labels.jsonl")
  assert labelling.add_label(jsonl, ids[0], True) and labelling.add_label(jsonl, ids[1], False)
  assert quality.read_labels(jsonl) == {ids[0]: True, ids[1]: False}
  with pytest.raises(FileNotFoundError, match="run the engine's videos stage"):
    app_lib.Labeller(str(tmp_path), labels, fps=8)


def test_command_line_mistakes_are_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "vf3d_jax.app", "--config", "configs/infer.py:demo",
       "--labels_dir", str(tmp_path), "--output", str(tmp_path / "outputs")],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert (done.returncode, done.stderr) == (
      1, f"error: {tmp_path}: no orbit videos (shards/videos/videos-*.npz); run the engine's "
      "videos stage there first\n")
