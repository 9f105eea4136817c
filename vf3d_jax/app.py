r"""The web app: image -> 3D, text -> 3D and the data engine's labelling page (Gradio).

  python -m vf3d_jax.app --config configs/infer.py:demo
  python -m vf3d_jax.app --checkpoint model.safetensors --config configs/infer.py:fast \
      --config.render.num_views=80 --port 7860 --host 0.0.0.0
  python -m vf3d_jax.app --config configs/infer.py:demo --labels_dir runs/engine \
      --labels_file runs/engine/labels.csv

It needs the ``app`` extra (``pip install -e '.[app]'``: gradio 5). Tabs:

* **Image → 3D**: an uploaded image goes through ``pipeline.Reconstructor``
  (the same preprocessing, model, turntable and mesh as ``vf3d_jax.infer``);
  the page shows the model input and the matte it was cut with, the
  turntable, the mesh in an interactive viewer, the files to download and the
  summary line.
* **Text → 3D**: a prompt goes through ``text_to_3d.TextTo3D`` (first frame,
  orbit video, then the LRM), shown the same way, with the first frame and the
  orbit video.
* **Labelling** (with ``--labels_dir``, an engine workdir): the run's orbit
  videos one at a time, Good / Bad / Skip, into the labels file the quality
  filter trains from (``--labels_file``, default ``<labels_dir>/labels.csv``;
  skips in ``<labels_file>.skipped``: ``vf3d_jax/engine/labelling.py``). It
  resumes where the files leave off and shows how many are done.

Settings come from the inference config, as for ``vf3d_jax.infer``
(``--config configs/infer.py:<variant>`` and ``--config.<field>=<value>``);
the page shows them. The config, the checkpoint and the labels folder are
checked at start: a mistake is one ``error:`` line and exit code 1. Each
run's outputs go to ``--output/<time>-<name>/`` in ``vf3d_jax.infer``'s
layout; an image's renderer key is the one ``vf3d_jax.infer`` gives its first
image (``pipeline.image_key``), a prompt's that of its first prompt. Model
runs wait in one queue (a run at a time, for every user and both model tabs;
the page shows each waiting user their place). A bad upload (not an image, a
damaged or empty file, an image with no object) is one message on the page.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import tempfile
import time
import warnings
from typing import Any, Sequence

from absl import flags
import jax
import numpy as np

from vf3d_jax import cli
from vf3d_jax import pretrained
from vf3d_jax.engine import labelling
from vf3d_jax.inference import pipeline
from vf3d_jax.inference import preprocess
from vf3d_jax.inference import text_to_3d

try:
  import gradio as gr
except ImportError:  # the optional `app` extra
  gr = None

# What the library raises for a bad input (an upload, a prompt), shown as a message.
INPUT_ERRORS = (preprocess.ImageLoadError, preprocess.EmptyForegroundError,
                preprocess.ComplexBackgroundError, ValueError, OSError)
# The viewer's background (RGBA in [0, 1]); a light grey a mesh stands out from.
VIEWER_BACKGROUND = (0.94, 0.94, 0.94, 1.0)
PREVIEW_SIDE = 256  # small images and videos are enlarged (nearest) to at least this side
_RUNS = itertools.count()


# --------------------------------------------------------------------------
# The work behind the pages, without Gradio.

@dataclasses.dataclass
class Outcome:
  """What one model run shows: images as uint8 arrays, files as paths."""

  error: str | None = None
  summary: str = ""
  model_input: np.ndarray | None = None  # [S, S, 3]
  matte: np.ndarray | None = None  # [H', W']
  turntable: str | None = None
  mesh: str | None = None
  files: list[str] = dataclasses.field(default_factory=list)
  first_frame: np.ndarray | None = None  # text -> 3D only
  orbit: str | None = None


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Float ``[0, 1]`` -> uint8, rounded."""
  return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def enlarge(images: np.ndarray, side: int = PREVIEW_SIDE, axes: tuple[int, int] = (0, 1)
            ) -> np.ndarray:
  """Repeats pixels along ``axes`` (rows, columns) by the smallest whole factor that brings
  the shorter of them to ``side`` (unchanged when already that large)."""
  factor = max(1, math.ceil(side / min(images.shape[axes[0]], images.shape[axes[1]])))
  return np.repeat(np.repeat(images, factor, axis=axes[0]), factor, axis=axes[1])


def upload_message(error: BaseException, path: str | None) -> str:
  """One line for a failed upload, naming the file by its own name, not the server's path."""
  message = cli.one_line(error)
  if path:
    message = message.replace(os.fspath(path), os.path.basename(path))
  return message


def run_folder(output: str, name: str) -> str:
  """A new folder name under ``output`` for one run: ``<YYYYmmdd-HHMMSS>-<n>-<name>``."""
  return os.path.join(output, f"{time.strftime('%Y%m%d-%H%M%S')}-{next(_RUNS)}-{name}")


def _find(files: Sequence[str], prefix: str) -> str | None:
  return next((f for f in files if os.path.basename(f).startswith(prefix)), None)


def outcome_of(result: pipeline.Reconstruction, files: list[str]) -> Outcome:
  """The page's view of a reconstruction and the files written for it."""
  summary = pipeline.summary(result)
  if result.matte_warning:
    summary += f"\nwarning: {result.matte_warning}"
  if result.mesh_error:
    summary += f"\nno mesh: {result.mesh_error}"
  return Outcome(summary=summary, model_input=enlarge(to_uint8(result.image)),
                 matte=None if result.alpha is None else to_uint8(result.alpha),
                 turntable=_find(files, "turntable."), mesh=_find(files, "mesh."), files=files)


def _written(folder: str, written: Sequence[str]) -> list[str]:
  """The paths ``pipeline.write_folder`` wrote into its temporary folder, in ``folder``."""
  return [os.path.join(folder, os.path.basename(p)) for p in written]


class Models:
  """The LRM of one config (loaded at once) and the text -> 3D models (on first use)."""

  def __init__(self, config, checkpoint: str):
    self.config, self.checkpoint = config, checkpoint
    arch, params = pretrained.load_lrm(checkpoint, pos_resize=config.model.pos_resize)
    self.reconstructor = pipeline.Reconstructor(arch, params, config)
    try:
      text_to_3d.check_text_config(config)
      self.text_error = None
    except (ValueError, FileNotFoundError) as e:
      self.text_error = cli.one_line(e)
    self._text = None

  def text(self) -> text_to_3d.TextTo3D:
    if self._text is None:
      self._text = text_to_3d.TextTo3D.load(self.config, self.checkpoint, self.reconstructor)
    return self._text


def reconstruct_image(models: Models, output: str, path: str | None,
                      deterministic: bool = False, progress: bool | None = None) -> Outcome:
  """Image -> 3D of one uploaded file, written to a new folder under ``output``."""
  if not path:
    return Outcome(error="upload an image first")
  config = models.config
  try:
    with jax.default_matmul_precision(config.get("precision", "highest")):
      result = models.reconstructor(path, pipeline.image_key(config, 0, deterministic), progress)
    folder = run_folder(output, pipeline.output_names([path])[0])
    written = pipeline.write_folder(folder, functools.partial(
        pipeline.save_reconstruction, result, config=config, save_arrays=False))
  except INPUT_ERRORS as e:
    return Outcome(error=upload_message(e, path))
  return outcome_of(result, _written(folder, written))


def prompt_to_3d(models: Models, output: str, prompt: str | None, deterministic: bool = False,
                 progress: bool | None = None) -> Outcome:
  """Text -> 3D of one prompt, written to a new folder under ``output``."""
  prompt = (prompt or "").strip()
  if not prompt:
    return Outcome(error="type a prompt first")
  if models.text_error:
    return Outcome(error=f"text -> 3D is not set up: {models.text_error}")
  config = models.config
  try:
    with jax.default_matmul_precision(config.get("precision", "highest")):
      sample_key, render_key = text_to_3d.prompt_keys(config, 0, deterministic)
      frame, orbit, result = models.text()(prompt, sample_key, render_key, progress)
    folder = run_folder(output, text_to_3d.prompt_names([prompt])[0])
    written = pipeline.write_folder(folder, functools.partial(
        text_to_3d.save_outputs, prompt=prompt, frame=frame, orbit=orbit, result=result,
        config=config, save_arrays=False))
  except INPUT_ERRORS as e:
    return Outcome(error=cli.one_line(e))
  outcome = outcome_of(result, _written(folder, written))
  outcome.first_frame = enlarge(to_uint8(frame))
  outcome.orbit = _find(outcome.files, "orbit.")
  return outcome


def display_frames(frames: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
  """``[F, H, W, 3] uint8`` -> float ``[0, 1]`` for ``pipeline.write_video``, enlarged
  (``enlarge``) for the page; half a level up, so the writer's truncation gives the uint8
  values back."""
  return (enlarge(frames, side, axes=(1, 2)).astype(np.float32) + 0.5) / 255.0


@dataclasses.dataclass
class LabelView:
  """What the labelling page shows."""

  video_id: str | None  # None: nothing left to label
  video: str | None  # an mp4 of it
  caption: str
  progress: str


class Labeller:
  """The labelling page's state: an engine run, its labels file and a cache of mp4s."""

  def __init__(self, workdir: str, labels_file: str, fps: int, cache: str | None = None):
    self.workdir, self.labels_file, self.fps = workdir, labels_file, int(fps)
    labelling.list_videos(workdir)  # fails now for a folder without videos
    labelling.read_done(labels_file)  # and for a labels file read_labels refuses
    self.cache = cache or tempfile.mkdtemp(prefix="vf3d_jax_labels_")
    # The last shard read: the next video is usually in it (shards are written once).
    self._shard = functools.lru_cache(maxsize=1)(labelling.load_videos)

  def _mp4(self, video: labelling.Video) -> str:
    name = os.path.splitext(os.path.basename(video.shard))[0]
    path = os.path.join(self.cache, f"{name}-{video.index:05d}.mp4")
    if not os.path.isfile(path):
      frames = self._shard(video.shard)[video.index]
      pipeline.write_video(display_frames(frames), path, self.fps)
    return path

  def view(self) -> LabelView:
    """The next video neither labelled nor skipped, and the progress."""
    videos = labelling.list_videos(self.workdir)
    labels, skipped = labelling.read_done(self.labels_file)
    done = labelling.progress(videos, labels, skipped)
    video = labelling.next_video(videos, labels, skipped)
    if video is None:
      return LabelView(None, None, "Every video of this run is labelled or skipped.", done)
    caption = f"**{video.id}**: {video.prompt}" if video.prompt else f"**{video.id}**"
    return LabelView(video.id, self._mp4(video), caption, done)

  def mark(self, video_id: str | None, verdict: str) -> LabelView:
    """Records ``verdict`` (good, bad or skip) for ``video_id``, then the next view.

    A video someone else labelled meanwhile keeps its first label.
    """
    if video_id:
      if verdict == "skip":
        labelling.add_skip(self.labels_file, video_id)
      else:
        labelling.add_label(self.labels_file, video_id, verdict == "good")
    return self.view()


# --------------------------------------------------------------------------
# The pages.

def _require_gradio():
  if gr is None:
    raise cli.UserError("the web app needs gradio 5: pip install -e '.[app]'")


@functools.cache
def _image_upload_class():
  """``gr.Image`` whose upload reaches the handler even when Pillow cannot open it, so a
  bad file gets the library's message instead of Gradio's generic error."""

  class ImageUpload(gr.Image):
    is_template = True  # drawn by the frontend's Image component

    def preprocess(self, payload):
      try:
        return super().preprocess(payload)
      except Exception:  # pylint: disable=broad-except; Pillow raises many kinds
        return getattr(payload, "path", None)

  return ImageUpload


def settings_text(config, checkpoint: str, output: str) -> str:
  """The settings the app runs with, as JSON-like text."""
  return (f"# checkpoint: {checkpoint}\n# outputs: {os.path.abspath(output)}\n"
          f"# change with --config.<field>=<value> when starting the app\n"
          + config.to_json(indent=1))


def _shown(outcome: Outcome, text: bool) -> list[Any]:
  """The values of a model tab's output components, in ``_result_components``' order."""
  if outcome.error:
    gr.Warning(outcome.error)
  values = [f"error: {outcome.error}" if outcome.error else outcome.summary,
            outcome.model_input, outcome.matte, outcome.turntable, outcome.mesh,
            outcome.files or None]
  if text:
    values += [outcome.first_frame, outcome.orbit]
  return values


def _result_components(prefix: str) -> list[Any]:
  status = gr.Textbox(label="Summary", interactive=False, lines=2, elem_id=f"{prefix}-summary")
  with gr.Row():
    model_input = gr.Image(label="Model input", interactive=False, height=256,
                           elem_id=f"{prefix}-input")
    matte = gr.Image(label="Matte", interactive=False, height=256, image_mode="L",
                     elem_id=f"{prefix}-matte")
  with gr.Row():
    turntable = gr.Video(label="Turntable", autoplay=True, loop=True, interactive=False,
                         height=320, elem_id=f"{prefix}-turntable")
    mesh = gr.Model3D(label="Mesh", clear_color=VIEWER_BACKGROUND, height=320,
                      elem_id=f"{prefix}-mesh")
  files = gr.File(label="Downloads", file_count="multiple", interactive=False,
                  elem_id=f"{prefix}-files")
  return [status, model_input, matte, turntable, mesh, files]


def _image_tab(models: Models, output: str, deterministic: bool) -> None:
  with gr.Row():
    with gr.Column():
      image = _image_upload_class()(label="Image", type="filepath", image_mode=None,
                                    sources=["upload", "clipboard"], height=320,
                                    elem_id="image-upload")
      button = gr.Button("Reconstruct", variant="primary", elem_id="image-run")
    with gr.Column():
      gr.Examples(examples=[[p] for p in pipeline.list_images(pipeline.DEMO_IMAGES)],
                  inputs=[image], label="Examples")
  outputs = _result_components("image")

  def run(path, progress=gr.Progress(track_tqdm=True)):
    del progress  # the library's tqdm bars drive it
    return _shown(reconstruct_image(models, output, path, deterministic, progress=True), False)

  button.click(run, [image], outputs, api_name="reconstruct", concurrency_id="model",
               concurrency_limit=1, show_progress="full")


def _text_tab(models: Models, output: str, deterministic: bool) -> None:
  if models.text_error:
    gr.Markdown(f"Text → 3D is off: {models.text_error}")
  with gr.Row():
    prompt = gr.Textbox(label="Prompt", placeholder="a red cone on a blue box", scale=4,
                        elem_id="text-prompt")
    button = gr.Button("Generate", variant="primary", scale=1, elem_id="text-run",
                       interactive=models.text_error is None)
  with gr.Row():
    first_frame = gr.Image(label="First frame", interactive=False, height=256,
                           elem_id="text-first-frame")
    orbit = gr.Video(label="Orbit video", autoplay=True, loop=True, interactive=False,
                     height=256, elem_id="text-orbit")
  outputs = _result_components("text") + [first_frame, orbit]

  def run(text, progress=gr.Progress(track_tqdm=True)):
    del progress
    return _shown(prompt_to_3d(models, output, text, deterministic, progress=True), True)

  button.click(run, [prompt], outputs, api_name="text_to_3d", concurrency_id="model",
               concurrency_limit=1, show_progress="full")
  prompt.submit(run, [prompt], outputs, concurrency_id="model", concurrency_limit=1,
                show_progress="full")


def _labelling_tab(labeller: Labeller | None) -> Any:
  """The labelling page; returns its load event's (function, outputs), or None."""
  if labeller is None:
    gr.Markdown("Start the app with `--labels_dir <engine workdir>` (and `--labels_file`) "
                "to label that run's orbit videos for the quality filter.")
    return None
  gr.Markdown(f"Videos of `{labeller.workdir}`; labels into `{labeller.labels_file}` "
              f"(skips into `{labelling.skipped_path(labeller.labels_file)}`).")
  done = gr.Markdown(elem_id="label-progress")
  current = gr.State(None)
  video = gr.Video(label="Orbit video", autoplay=True, loop=True, interactive=False,
                   height=320, elem_id="label-video")
  caption = gr.Markdown(elem_id="label-caption")
  with gr.Row():
    good = gr.Button("Good", variant="primary", elem_id="label-good")
    bad = gr.Button("Bad", variant="stop", elem_id="label-bad")
    skip = gr.Button("Skip", elem_id="label-skip")
  outputs = [current, video, caption, done]

  def show(video_id=None, verdict=None):
    try:
      view = labeller.mark(video_id, verdict) if verdict else labeller.view()
    except (ValueError, OSError) as e:  # e.g. a labels file someone broke meanwhile
      raise gr.Error(cli.one_line(e)) from None
    return [view.video_id, view.video, view.caption, view.progress]

  for button, verdict in ((good, "good"), (bad, "bad"), (skip, "skip")):
    button.click(functools.partial(show, verdict=verdict), [current], outputs,
                 concurrency_id="labels", concurrency_limit=1, api_name=f"label_{verdict}")
  return show, outputs


def build_app(config, checkpoint: str = pipeline.DEMO_CHECKPOINT, output: str = "outputs/app",
              labels_dir: str = "", labels_file: str = "", deterministic: bool = False):
  """The app's ``gr.Blocks``, its queue set up (one model run at a time).

  Args:
    config: ``configs/infer.py``'s config.
    checkpoint: the LRM (anything ``pretrained.load_lrm`` reads).
    output: where each run's folder is written.
    labels_dir: an engine workdir whose videos the labelling tab shows ("" hides it).
    labels_file: the labels file (default ``<labels_dir>/labels.csv``).
    deterministic: no randomness in the renderer (as ``vf3d_jax.infer --deterministic``).

  Raises:
    CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError:
      a bad config, checkpoint, output folder, labels folder or labels file.
  """
  _require_gradio()
  pipeline.validate_config(config)
  pipeline.check_output(output)
  labeller = None
  if labels_dir:
    labeller = Labeller(labels_dir, labels_file or os.path.join(labels_dir, "labels.csv"),
                        fps=int(config.text.fps))
  models = Models(config, checkpoint)
  # Local fonts: the default theme would fetch Google's, which an offline machine cannot.
  theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                            font_mono=["ui-monospace", "monospace"])
  with warnings.catch_warnings():  # gradio 5 warns that gradio 6 moves `theme` to launch()
    warnings.filterwarnings("ignore", message=".*theme.*", category=DeprecationWarning)
    blocks = gr.Blocks(title="vf3d_jax", theme=theme, analytics_enabled=False)
  with blocks:
    gr.Markdown("# vf3d_jax: VFusion3D in JAX\nOne image or a prompt to a 3D object. "
                "Runs wait in one queue, a run at a time; a waiting run shows its place.")
    with gr.Tab("Image → 3D", id="image"):
      _image_tab(models, output, deterministic)
    with gr.Tab("Text → 3D", id="text"):
      _text_tab(models, output, deterministic)
    with gr.Tab("Labelling", id="labelling"):
      load = _labelling_tab(labeller)
    with gr.Accordion("Settings", open=False):
      gr.Code(settings_text(config, checkpoint, output), language="json", interactive=False)
    if load is not None:
      blocks.load(load[0], None, load[1], concurrency_id="labels", concurrency_limit=1)
  blocks.queue(default_concurrency_limit=1)
  return blocks


def serve(blocks, output: str, host: str = "127.0.0.1", port: int = 7860,
          block: bool = True):
  """Starts the server (``block=False``: returns at once, the server in a thread)."""
  return blocks.launch(server_name=host, server_port=port, allowed_paths=[os.path.abspath(output)],
                       prevent_thread_lock=not block, show_error=False, quiet=not block)


# --------------------------------------------------------------------------
# The command line (its flags are defined only when run, so the module imports anywhere).

def define_flags() -> dict[str, Any]:
  """The app's flags (``--config`` and its overrides as for ``vf3d_jax.infer``)."""
  return {
      "config": cli.define_config(
          "config", os.path.join(pipeline.REPO, "configs", "infer.py"), "Inference config."),
      "checkpoint": flags.DEFINE_string(
          "checkpoint", "", "model.safetensors, a PyTorch pickle or a converted directory "
          "(default: the embedded tiny demo model)."),
      "output": flags.DEFINE_string("output", "outputs/app", "Where each run's folder is written."),
      "labels_dir": flags.DEFINE_string(
          "labels_dir", "", "An engine workdir whose orbit videos the labelling tab shows."),
      "labels_file": flags.DEFINE_string(
          "labels_file", "", "The labels file the labelling tab writes "
          "(default: <labels_dir>/labels.csv)."),
      "host": flags.DEFINE_string("host", "127.0.0.1",
                                  "Address to serve on (0.0.0.0: every interface)."),
      "port": flags.DEFINE_integer("port", 7860, "Port to serve on."),
      "deterministic": flags.DEFINE_bool(
          "deterministic", False,
          "No randomness: zero jitter, fixed importance samples, no orbit offset."),
  }


def main(argv, given: dict[str, Any]):
  del argv
  value = {name: holder.value for name, holder in given.items()}
  logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up requests
  if value["labels_file"] and not value["labels_dir"]:
    raise cli.UserError("--labels_file needs --labels_dir (the engine workdir to label)")
  blocks = build_app(value["config"], value["checkpoint"] or pipeline.DEMO_CHECKPOINT,
                     value["output"], value["labels_dir"], value["labels_file"],
                     value["deterministic"])
  serve(blocks, value["output"], value["host"], value["port"])


if __name__ == "__main__":
  cli.run(functools.partial(main, given=define_flags()))
