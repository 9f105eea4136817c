r"""Writes the notebooks of ``notebooks/`` (outputs stripped) from the cells below.

  python -m tools.make_notebooks            # (re)write notebooks/*.ipynb
  python -m tools.make_notebooks --check    # exit 1 if a committed notebook differs from this script
  python -m tools.make_notebooks --repo_url=https://github.com/<owner>/vf3d_jax   # once the URL is known

Every notebook opens in Colab: its first code cell clones the repository and
installs the package from it there (with the ``lpips`` and ``notebooks``
extras, and the CUDA or TPU build of jax on such a runtime), elsewhere it
finds the installed package's source folder (``configs/`` and ``examples/``
sit beside the package); then it prints jax's backend and devices. The cell
tagged ``parameters`` reads every size from ``VF3D_<NAME>`` environment
variables, with real defaults, or tiny ones under ``VF3D_NOTEBOOK_TINY=1``
(``tests/test_notebooks.py`` runs them so). The work is done by the library
functions the command-line jobs call; ``vf3d_jax.display`` only shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
# This project's GitHub repository; a placeholder until it is published (--repo_url sets it).
REPO_URL = "https://github.com/<owner>/vf3d_jax"


def colab_link(name: str, repo_url: str = REPO_URL, branch: str = "main") -> str:
  """The "Open in Colab" address of ``notebooks/<name>``."""
  path = repo_url.split("github.com/", 1)[1]
  return f"https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{name}"


def _code(source: str, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
  cell = nbformat.v4.new_code_cell(textwrap.dedent(source).strip("\n"))
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def _markdown(source: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_markdown_cell(textwrap.dedent(source).strip("\n"))


def _install(repo_url: str) -> nbformat.NotebookNode:
  return _code(f'''
      # Set-up. In Colab: clone the repository and pip-install the package from it (a few
      # minutes), with the CUDA or TPU build of jax on a GPU or TPU runtime; should pip replace a
      # package Colab had already imported, restart the session and run the cells again (the
      # clone is kept). Elsewhere: nothing to install (`make setup`, or
      # `pip install -e ".[lpips,notebooks]"` in a clone: configs/ and examples/ come with it).
      import os
      import shutil
      import subprocess
      import sys

      REPO_URL = "{repo_url}"  # this project's GitHub repository
      IN_COLAB = "google.colab" in sys.modules
      if IN_COLAB:
          if "<owner>" in REPO_URL:
              raise ValueError("set REPO_URL (above) to the GitHub repository of vf3d_jax")
          SOURCE = "/content/vf3d_jax"
          if not os.path.isdir(SOURCE):
              subprocess.run(["git", "clone", "--depth", "1", REPO_URL, SOURCE], check=True)
          if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ:
              jax_build = ["jax[tpu]>=0.10.2,<0.12"]
          elif shutil.which("nvidia-smi"):
              jax_build = ["jax[cuda13]>=0.10.2,<0.12"]
          else:
              jax_build = []
          subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                          f"{{SOURCE}}[lpips,notebooks]", *jax_build], check=True)
      else:
          import vf3d_jax
          SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(vf3d_jax.__file__)))
      if not os.path.isdir(os.path.join(SOURCE, "configs")):
          raise FileNotFoundError(f"{{SOURCE}}: no configs/ here; install vf3d_jax from a clone "
                                  "(pip install -e .) so configs/ and examples/ come with it")
      sys.path.insert(0, SOURCE)  # the package (installed after this kernel started) and configs/

      import jax
      print(f"jax {{jax.__version__}}, backend {{jax.default_backend()}}: {{jax.devices()}}")
      ''')


_PARAM_HELPER = '''
    # Parameters: each is the environment variable VF3D_<NAME> when set, else its default, tiny
    # under VF3D_NOTEBOOK_TINY=1 (what the tests run). Edit the defaults here to change them.
    TINY = os.environ.get("VF3D_NOTEBOOK_TINY") == "1"


    def param(name, real, tiny):
        value = os.environ.get(f"VF3D_{name}")
        default = tiny if TINY else real
        return default if value is None else type(default)(value)


'''


def _join(*parts: str) -> str:
  """Source pieces, each dedented on its own, one after another."""
  return "\n".join(textwrap.dedent(part).strip("\n") for part in parts)


def _params(*body: str) -> nbformat.NotebookNode:
  return _code(textwrap.dedent(_PARAM_HELPER).strip("\n") + "\n\n\n" + _join(*body),
               tags=("parameters",))


_INFER_SIZES = '''
    # Inference sizes; 0 keeps the config variant's value.
    NUM_VIEWS = param("NUM_VIEWS", 0, 8)  # turntable views
    RESOLUTION = param("RESOLUTION", 0, 32)  # turntable side, pixels
    SAMPLES = param("SAMPLES", 0, 16)  # coarse and fine samples a ray
    MESH_RESOLUTION = param("MESH_RESOLUTION", 0, 32)  # marching-cubes grid
    TEXTURE_SIZE = param("TEXTURE_SIZE", 0, 64)  # texels a side of the mesh's texture
'''

_APPLY_SIZES = '''
    for field, value in (("render.num_views", NUM_VIEWS), ("render.resolution", RESOLUTION),
                         ("render.num_coarse", SAMPLES), ("render.num_fine", SAMPLES),
                         ("mesh.resolution", MESH_RESOLUTION), ("mesh.texture_size", TEXTURE_SIZE)):
        if value:
            section, name = field.split(".")
            config[section][name] = value
    config.render.format, config.mesh.format = "mp4", "glb"
'''


def image_to_3d(repo_url: str) -> list:
  return [
      _markdown(f'''
          # Image → 3D with VFusion3D

          [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_link("image_to_3d.ipynb", repo_url)})

          One image becomes a turntable video and a textured mesh: the image is matted and
          recentred, the LRM turns it into triplanes, the volume renderer renders an orbit and
          marching cubes extracts a UV-textured GLB. This is `python -m vf3d_jax.infer`
          (`vf3d_jax.inference.pipeline.run`), with its pictures shown here.

          The model is the released VFusion3D weights when they are found
          (`vf3d_jax.pretrained.find_released`: `$VF3D_RELEASED_WEIGHTS`, `checkpoints/vfusion3d`,
          `model.safetensors`, the Hugging Face cache, or a download of `facebook/vfusion3d`,
          1.8 GB), else the tiny demo model embedded in `examples/` (which renders blurry blobs:
          it only demonstrates the pipeline). On a GPU or TPU runtime the default settings are the
          released pipeline's (160 views at 384², a 512³ mesh grid); on a CPU the `demo` sizes.
          To use your own photo, upload it and set `IMAGE` below.
          '''),
      _install(repo_url),
      _params('''
          IMAGE = param("IMAGE", os.path.join(SOURCE, "examples", "images", "a_cyan_cube.png"),
                        os.path.join(SOURCE, "examples", "images", "a_cyan_cube.png"))
          CHECKPOINT = param("CHECKPOINT", "", "")  # a checkpoint to use instead of the search below
          RELEASED = param("RELEASED", 1, 0)  # look for the released weights (else the demo model)
          DOWNLOAD = param("DOWNLOAD", 1, 0)  # and download them from Hugging Face if not found
          # configs/infer.py variant: the released pipeline's sizes on an accelerator, demo on a CPU
          VARIANT = param("VARIANT", "demo" if jax.default_backend() == "cpu" else "vfusion3d", "demo")
          OUTPUT = param("OUTPUT", "outputs/notebooks/image_to_3d", "outputs/image_to_3d")
          ''', _INFER_SIZES),
      _markdown('''
          ## The model and the settings

          The inference config (`configs/infer.py`) with the sizes above, and the checkpoint:
          '''),
      _code(_join('''
          import time

          import numpy as np
          from IPython.display import display

          from configs import infer as infer_configs
          from vf3d_jax import display as vis
          from vf3d_jax import pretrained
          from vf3d_jax.inference import pipeline

          config = infer_configs.get_config(VARIANT)
          ''', _APPLY_SIZES, '''
          if CHECKPOINT:
              checkpoint, which = CHECKPOINT, "the checkpoint given"
          elif RELEASED:
              try:
                  checkpoint = pretrained.find_released(download=bool(DOWNLOAD))
                  which = "the released VFusion3D weights"
              except FileNotFoundError as e:  # offline, or no copy: the embedded demo model
                  checkpoint = pipeline.DEMO_CHECKPOINT
                  which = f"the embedded demo model (the released weights are not available: {e})"
          else:
              checkpoint, which = pipeline.DEMO_CHECKPOINT, "the embedded demo model"
          print(f"model: {which}\\n  {checkpoint}")
          print(f"settings: {VARIANT}; {config.render.num_views} views at {config.render.resolution}², "
                f"{config.render.num_coarse} + {config.render.num_fine} samples a ray, "
                f"{config.mesh.resolution}³ mesh grid")
          ''')),
      _markdown('''
          ## Reconstruct

          `pipeline.run` checks the config, loads the checkpoint, and for each image writes
          `input.png`, `turntable.mp4`, `mesh.glb` (and with `save_arrays`, `planes.npy` and
          `frames.npy`) into `OUTPUT/<image name>/`, printing a line with each stage's seconds. The
          first run of each function includes its compilation.
          '''),
      _code('''
          start = time.perf_counter()
          results = pipeline.run(config, checkpoint, IMAGE, OUTPUT, save_arrays=True)
          wall = time.perf_counter() - start
          done = {path: r for path, r in results.items() if "error" not in r}
          for path, r in results.items():
              if "error" in r:
                  print(f"{path}: {r['error']}")
          if not done:
              raise RuntimeError("no image was reconstructed")
          path, result = next(iter(done.items()))  # the first image (IMAGE may be a folder)
          folder = result["folder"]
          print(f"{len(done)} of {len(results)} images in {wall:.1f} s -> {OUTPUT}")
          '''),
      _markdown('''
          ## The preprocessed input

          What the model sees: the object matted (an RGBA image's alpha, else the matte of
          `preprocess.matting`), recentred to 0.8 of the frame, on white.
          '''),
      _code('''
          vis.show_image(os.path.join(folder, "input.png"), width=256)
          '''),
      _markdown('''
          ## The turntable

          Every few views of the orbit, then the video itself.
          '''),
      _code('''
          frames = np.load(os.path.join(folder, "frames.npy"))
          scale = max(1, 96 // frames.shape[1])  # small renders are enlarged, pixel for pixel
          display(vis.show_image(vis.strip(frames, 8), scale=scale))
          display(vis.show_video(os.path.join(folder, "turntable.mp4"), width=256))
          '''),
      _markdown('''
          ## The mesh

          An interactive view of `mesh.glb` (drag to turn, scroll to zoom); the viewer is embedded,
          so it needs no network.
          '''),
      _code('''
          mesh_path = os.path.join(folder, "mesh.glb")
          if os.path.isfile(mesh_path):
              print(f"{mesh_path}: {os.path.getsize(mesh_path) / 1e6:.2f} MB")
              display(vis.show_mesh(mesh_path, height=400))
          else:
              print(f"no mesh: {result['mesh_error']}")
          '''),
      _markdown('''
          ## Timings

          Seconds of each stage of the first image (compilation included on a first run), and the
          whole call.
          '''),
      _code('''
          print(vis.timings(result["seconds"]))
          print(f"pipeline.run, loading the model included: {wall:.2f} s")
          '''),
  ]


def text_to_3d(repo_url: str) -> list:
  return [
      _markdown(f'''
          # Text → 3D

          [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_link("text_to_3d.ipynb", repo_url)})

          A prompt becomes a 3D object as in VFusion3D's data engine: an image model samples a
          first frame from the prompt, the multi-view video model turns it into an orbit video,
          and the LRM reconstructs the object from the first frame (its turntable and mesh). This
          is `python -m vf3d_jax.infer --prompt ...` (`vf3d_jax.inference.text_to_3d.run`) with the
          toy models shipped in `examples/` (`configs/infer.py:demo`): a 32² pixel-space image
          model, its video model and the tiny demo LRM. They are toys trained on 2 CPU cores on
          procedural shapes (`examples/README.md`): expect rough, blurry objects.
          '''),
      _install(repo_url),
      _params('''
          # Prompts, separated by ";" (the toy models know procedural shapes, colours and patterns)
          PROMPTS = param("PROMPTS", "a red cone on a blue box;a yellow sphere",
                          "a red cone on a blue box").split(";")
          STEPS = param("STEPS", 0, 2)  # sampler steps of the image and video models; 0: the config's
          CHECKPOINT = param("CHECKPOINT", "", "")  # another LRM; "": the demo model
          OUTPUT = param("OUTPUT", "outputs/notebooks/text_to_3d", "outputs/text_to_3d")
          ''', _INFER_SIZES),
      _markdown('''
          ## The models and the settings
          '''),
      _code(_join('''
          import time

          import numpy as np
          from IPython.display import display

          from configs import infer as infer_configs
          from vf3d_jax import display as vis
          from vf3d_jax.inference import pipeline
          from vf3d_jax.inference import text_to_3d

          config = infer_configs.get_config("demo")  # names the shipped image and video models
          ''', _APPLY_SIZES, '''
          if STEPS:
              config.text.sample.num_steps = STEPS
          checkpoint = CHECKPOINT or pipeline.DEMO_CHECKPOINT
          print(f"image model: {config.text.image_model}\\nvideo model: {config.text.video_model}\\n"
                f"LRM: {checkpoint}")
          print(f"sampler: {config.text.sample.sampler}, {config.text.sample.num_steps} steps, guidance "
                f"image {config.text.sample.image_scale} / text {config.text.sample.text_scale}")
          ''')),
      _markdown('''
          ## Prompt → first frame → orbit video → LRM → mesh

          `text_to_3d.run` writes, per prompt, `first_frame.png`, `orbit.mp4` and `prompt.txt`
          beside what an image gets (`input.png`, `turntable.mp4`, `mesh.glb`), into
          `OUTPUT/<prompt>/`, and prints each stage's seconds.
          '''),
      _code('''
          start = time.perf_counter()
          results = text_to_3d.run(config, checkpoint, PROMPTS, OUTPUT, save_arrays=True)
          wall = time.perf_counter() - start
          for prompt, r in results.items():
              if "error" in r:
                  print(f"{prompt!r}: {r['error']}")
          done = {p: r for p, r in results.items() if "error" not in r}
          if not done:
              raise RuntimeError("no prompt made an object")
          print(f"{len(done)} of {len(results)} prompts in {wall:.1f} s -> {OUTPUT}")
          '''),
      _markdown('''
          ## What each prompt made

          The first frame, the orbit video (every other frame, then the video), the LRM's input
          (the first frame matted and recentred), its turntable, the mesh, and the seconds of each
          stage.
          '''),
      _code('''
          for prompt, r in done.items():
              folder = r["folder"]
              print(f"\\n{prompt!r} -> {folder}")
              display(vis.show_image(os.path.join(folder, "first_frame.png"), scale=4))
              orbit = vis.read_video(os.path.join(folder, "orbit.mp4"))
              display(vis.show_image(vis.strip(orbit, 8), scale=3))
              display(vis.show_video(os.path.join(folder, "orbit.mp4"), width=192))
              display(vis.show_image(os.path.join(folder, "input.png"), width=192))
              frames = np.load(os.path.join(folder, "frames.npy"))
              display(vis.show_image(vis.strip(frames, 8), scale=max(1, 96 // frames.shape[1])))
              mesh_path = os.path.join(folder, "mesh.glb")
              if os.path.isfile(mesh_path):
                  display(vis.show_mesh(mesh_path, height=320))
              else:
                  print(f"no mesh: {r['mesh_error']}")
              print(vis.timings(r["seconds"]))
          print(f"\\ntext_to_3d.run, loading the three models included: {wall:.2f} s")
          '''),
  ]


def train_lrm(repo_url: str) -> list:
  return [
      _markdown(f'''
          # Training the LRM

          [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_link("train_lrm.ipynb", repo_url)})

          The whole training path at toy scale: render multi-view records of seeded procedural
          objects (`tools.render_orbits`, `vf3d_jax.data.render_orbits.render_dataset`), train the
          tiny LRM (`configs/lrm.py:tiny`, 258,932 parameters) for a few hundred steps with the
          VFusion3D recipe (`python -m vf3d_jax.train_lrm`, `lrm_trainer.train_and_evaluate`), plot
          its loss and its held-out metrics from the workdir's `metrics.jsonl`, and look at its
          renders of held-out objects. At the defaults (64 objects, 300 steps) it took 155 s on
          2 busy CPU cores; the held-out PSNR rose from 9.2 to 12.2 dB and the input gain to 3.6 dB,
          and its renders are blurry blobs in roughly the objects' colours and sizes: a start, not
          a model. The README's "Training the LRM" has longer runs.
          '''),
      _install(repo_url),
      _params('''
          TRAIN_ASSETS = param("TRAIN_ASSETS", 64, 4)  # procedural training objects
          EVAL_ASSETS = param("EVAL_ASSETS", 8, 2)  # held-out objects (another seed)
          IMAGE_SIZE = param("IMAGE_SIZE", 64, 32)  # record views, pixels
          STEPS = param("STEPS", 300, 4)
          BATCH = param("BATCH", 8, 2)  # objects a step (rounded up to a multiple of the devices)
          RENDER = param("RENDER", 32, 16)  # supervision render resolution ...
          CROP = param("CROP", 16, 16)  # ... of which a random crop this size is rendered
          SAMPLES = param("SAMPLES", 16, 8)  # coarse and fine samples a ray
          EVAL_EVERY = param("EVAL_EVERY", 50, 2)  # steps between held-out evaluations
          EVAL_RESOLUTION = param("EVAL_RESOLUTION", 32, 16)
          DATA = param("DATA", "outputs/notebooks/train_lrm/data", "outputs/train_lrm/data")
          # A new run needs a new workdir (or the same settings: it then resumes)
          WORKDIR = param("WORKDIR", "outputs/notebooks/train_lrm/run", "outputs/train_lrm/run")
          '''),
      _markdown('''
          ## Render a small procedural set

          Each object is a seeded composition of up to 4 primitives with a caption, rendered by
          exact ray casting from 8 orbit and 2 random cameras (`configs/render.py:tiny`) at
          distance 2.0, into ArrayRecord shards; a rerun finds them done.
          '''),
      _code('''
          import json
          import time

          import grain
          import numpy as np
          from IPython.display import display
          import matplotlib.pyplot as plt

          from configs import lrm as lrm_configs
          from configs import render as render_configs
          from vf3d_jax import display as vis
          from vf3d_jax.data import pipeline as data_pipeline
          from vf3d_jax.data import records
          from vf3d_jax.data import render_orbits
          from vf3d_jax.training import lrm_trainer

          datasets = {}
          start = time.perf_counter()
          for name, count, seed in (("train", TRAIN_ASSETS, 0), ("eval", EVAL_ASSETS, 12345)):
              render = render_configs.get_config("tiny")
              render.output_dir, render.name, render.num_assets, render.seed = DATA, name, count, seed
              render.resolution, render.views.radius, render.progress = IMAGE_SIZE, 2.0, False
              datasets[name] = render_orbits.render_dataset(render)
          print(f"rendered {TRAIN_ASSETS} + {EVAL_ASSETS} objects in {time.perf_counter() - start:.1f} s: "
                f"{datasets}")
          '''),
      _markdown('''
          The views of the first training objects (one row each), read back from the shards:
          '''),
      _code('''
          source = grain.sources.ArrayRecordDataSource(data_pipeline.find_shards(datasets["train"]))
          rows = []
          for i in range(min(3, len(source))):
              record = records.parse(source[i])
              views = [records.decode_png(image) / 255.0 for image in record.images]  # RGBA
              on_white = [v[..., :3] * v[..., 3:] + 1 - v[..., 3:] for v in views]
              rows.append(vis.strip(on_white, len(on_white)))
              print(f"{record.asset_id}: {record.caption}")
          vis.show_image(np.concatenate(rows, axis=0), scale=max(1, 64 // IMAGE_SIZE))
          '''),
      _markdown('''
          ## Train

          The tiny config with the sizes above: one stage of `STEPS` steps, each object seen
          from a random view of its record and supervised by 2 others (MSE and opacity losses,
          camera noise on the source camera), held-out PSNR / SSIM / input gain every
          `EVAL_EVERY` steps. The log lines show the progress; `metrics.jsonl`, TensorBoard
          events, image grids and checkpoints go to `WORKDIR`.
          '''),
      _code('''
          config = lrm_configs.get_config("tiny")
          devices = jax.device_count()
          config.data.train, config.data.eval = datasets["train"], datasets["eval"]
          config.train.steps = STEPS
          config.train.stages = ((STEPS, RENDER, CROP, SAMPLES, SAMPLES),)
          config.train.batch_size = -(-BATCH // devices) * devices
          config.train.num_views = 2
          config.train.warmup_steps = min(config.train.warmup_steps, max(1, STEPS // 10))
          config.train.log_every = max(1, STEPS // 10)
          config.train.eval_every = EVAL_EVERY
          config.train.checkpoint_every = STEPS
          config.eval.num_objects = EVAL_ASSETS
          config.eval.render_resolution = EVAL_RESOLUTION
          config.eval.num_coarse = config.eval.num_fine = SAMPLES

          start = time.perf_counter()
          with vis.log_of("lrm_trainer"):  # the trainer's progress and evaluation lines
              state = lrm_trainer.train_and_evaluate(config, WORKDIR)
          train_seconds = time.perf_counter() - start
          print(f"{int(state.step)} steps of batch {config.train.batch_size} on {devices} device(s) in "
                f"{train_seconds:.1f} s (compilation and evaluations included)")
          '''),
      _markdown('''
          ## Loss and held-out metrics

          From `WORKDIR/metrics.jsonl`: a line per logged step (loss terms, training PSNR of the
          crops, learning rate) and per evaluation (`eval/psnr`, `eval/ssim`, and
          `eval/input_gain`: the PSNR over renders made from another held-out object's image,
          about 0 dB while the model ignores its input).
          '''),
      _code('''
          with open(os.path.join(WORKDIR, "metrics.jsonl")) as f:
              logged = [json.loads(line) for line in f if line.strip()]
          train = [m for m in logged if "loss" in m]
          held_out = [m for m in logged if "eval/psnr" in m]
          fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
          axes[0].plot([m["step"] for m in train], [m["loss"] for m in train], label="loss")
          for term in ("loss/mse", "loss/opacity"):
              if train and term in train[0]:
                  axes[0].plot([m["step"] for m in train], [m[term] for m in train], label=term)
          axes[0].set_yscale("log")
          axes[0].set_title("training loss")
          axes[1].plot([m["step"] for m in train], [m["train_psnr"] for m in train], label="train crops")
          axes[1].plot([m["step"] for m in held_out], [m["eval/psnr"] for m in held_out], "o-",
                       label="held-out views")
          axes[1].set_title("PSNR (dB)")
          axes[2].plot([m["step"] for m in held_out], [m["eval/ssim"] for m in held_out], "o-",
                       label="held-out SSIM")
          gain = axes[2].twinx()
          gain.plot([m["step"] for m in held_out], [m["eval/input_gain"] for m in held_out], "s--",
                    color="tab:red", label="input gain (dB, right)")
          axes[2].set_title("held-out SSIM and input gain")
          for ax in axes:
              ax.set_xlabel("step")
              ax.legend(loc="best", fontsize=8)
          gain.legend(loc="lower right", fontsize=8)
          plt.tight_layout()
          plt.show()
          for m in held_out:
              print(f"step {m['step']:5d}: " + ", ".join(
                  f"{k[5:]} {v:.3f}" for k, v in m.items() if k.startswith("eval/")))
          '''),
      _markdown('''
          ## Renders of held-out objects

          The evaluator's last grid (`WORKDIR/images/eval_<step>.png`): per object, its input view
          and the true held-out views on top, the model's renders of those views below.
          '''),
      _code('''
          grids = sorted(f for f in os.listdir(os.path.join(WORKDIR, "images")) if f.startswith("eval_"))
          print(f"{grids[0]} (before training) and {grids[-1]} (the last):")
          for name in (grids[0], grids[-1]):
              display(vis.show_image(os.path.join(WORKDIR, "images", name),
                                     scale=max(1, 64 // EVAL_RESOLUTION)))
          '''),
  ]


def data_engine(repo_url: str) -> list:
  return [
      _markdown(f'''
          # The data engine

          [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_link("data_engine.ipynb", repo_url)})

          VFusion3D's central idea at toy scale: a video model tuned on 3D orbits turns prompts
          into multi-view training data. Prompts → first frames → orbit videos → features →
          quality scores (an SVM on labelled videos) and elevations (an MLP fitted on 3D orbits) →
          the kept videos as synthetic orbit records, with a contact sheet. This is
          `python -m vf3d_jax.data_engine --config configs/engine.py:tiny`
          (`vf3d_jax.engine.engine.run`), run here a few stages at a time (`--stage=...`), with the
          toy video model shipped in `examples/video_model` (16 frames of 32²). The prompts are
          captions of seeded procedural objects, so their first frames are the objects' true first
          views and an automatic labeller (silhouettes against the true orbit) stands in for
          hand labels.
          '''),
      _install(repo_url),
      _params('''
          PROMPTS = param("PROMPTS", 16, 8)  # procedural prompts
          SHARD_SIZE = param("SHARD_SIZE", 8, 4)  # prompts per work shard (the unit of resumption)
          STEPS = param("STEPS", 20, 2)  # DDIM steps of the video model
          ORBITS = param("ORBITS", 32, 8)  # 3D orbit records the elevation MLP is fitted on
          ELEVATION_STEPS = param("ELEVATION_STEPS", 2000, 50)  # its training steps
          # Frame features: "random:0" (a tiny random network: the toy config's) or
          # "dinov2:<folder>" (a Hugging Face DINOv2, e.g. facebook/dinov2-base downloaded there)
          FEATURES = param("FEATURES", "random:0", "random:0")
          VIDEO_MODEL = param("VIDEO_MODEL", os.path.join(SOURCE, "examples", "video_model"),
                              os.path.join(SOURCE, "examples", "video_model"))
          # A rerun with the same settings redoes nothing; other settings need a new workdir
          WORKDIR = param("WORKDIR", "outputs/notebooks/data_engine/run", "outputs/data_engine/run")
          DATA = param("DATA", "outputs/notebooks/data_engine/data", "outputs/data_engine/data")
          '''),
      _markdown('''
          ## The settings, and 3D orbits for the elevation estimator

          The elevation MLP learns the camera elevation of a first frame from 3D orbit records with
          known elevations (the video model's tuning data); here a few freshly rendered ones, with
          the cameras of the engine's prompts (16 views at distance 2.4).
          '''),
      _code('''
          import time

          import grain
          import numpy as np
          from IPython.display import display

          from configs import engine as engine_configs
          from vf3d_jax import display as vis
          from vf3d_jax.data import pipeline as data_pipeline
          from vf3d_jax.data import records
          from vf3d_jax.data import render_orbits
          from vf3d_jax.engine import engine

          config = engine_configs.get_config("tiny")
          config.prompts.procedural.num_assets = PROMPTS
          config.shard_size = SHARD_SIZE
          config.video.model = VIDEO_MODEL
          config.video.num_steps = STEPS
          config.elevation.steps = ELEVATION_STEPS
          config.features.extractor = FEATURES

          orbits = config.prompts.procedural.copy_and_resolve_references()
          orbits.output_dir, orbits.name, orbits.num_assets, orbits.seed = DATA, "orbits", ORBITS, 11
          start = time.perf_counter()
          config.elevation.train = render_orbits.render_dataset(orbits)
          print(f"{ORBITS} 3D orbits in {time.perf_counter() - start:.1f} s: {config.elevation.train}")
          work = engine.Workdir(WORKDIR)
          seconds = {}


          def run(*stages):
              """engine.run on these stages (what --stage=... runs), timed."""
              start = time.perf_counter()
              reports = engine.run(config, WORKDIR, stages, progress=False)
              seconds[", ".join(stages)] = time.perf_counter() - start
              return reports
          '''),
      _markdown('''
          ## Prompts

          Deduplicated, each with a stable id (`p-` and 12 hex digits of its SHA-1); written to
          `WORKDIR/prompts.jsonl`.
          '''),
      _code('''
          run("prompts")
          prompts = engine.read_prompts(work)
          for row in prompts:
              print(f"{row['id']}  {row['prompt']}")
          '''),
      _markdown('''
          ## First frames → orbit videos

          Each shard of prompts is sampled with its own seed (`fold_in(key(seed), shard)`), so the
          videos depend on neither the batch size nor the number of processes. The first videos,
          every other frame:
          '''),
      _code('''
          run("frames", "videos")
          count = engine.num_shards(prompts, SHARD_SIZE)
          videos = np.concatenate([engine.load_npz(work.shard("videos", s))["videos"]
                                   for s in range(count)])
          print(f"{len(videos)} videos of {videos.shape[1]} frames, {videos.shape[2]}²")
          vis.show_image(np.concatenate([vis.strip(v, 8) for v in videos[:4]], axis=0), scale=3)
          '''),
      _markdown('''
          ## Features and labels

          Per frame, the feature extractor's CLS and mean patch tokens (`FEATURES`: a tiny random
          network in this toy config, so the filter's cross-validated accuracy stays near chance;
          `dinov2:<folder>` for real DINOv2 features); per
          video, the automatic label: the mean silhouette IoU of frames 1..F-1 against the
          prompt's true orbit, good from `labels.min_iou`. The SVM needs at least 2 videos of each
          kind; when the threshold leaves fewer, it moves to the median IoU (said below).
          '''),
      _code('''
          run("features", "labels")
          iou = np.concatenate([engine.load_npz(work.shard("labels", s))["iou"] for s in range(count)])
          good = iou >= config.labels.min_iou
          print("silhouette IoU per video:", np.round(iou, 2))
          if min(good.sum(), (~good).sum()) < 2:  # the SVM's cross-validation needs 2 of each
              print(f"{good.sum()} good and {(~good).sum()} bad at the configured labels.min_iou "
                    f"{config.labels.min_iou}: the median IoU instead")
              config.labels.min_iou = float(np.median(iou))
              good = iou >= config.labels.min_iou
          print(f"{good.sum()} good, {(~good).sum()} bad at labels.min_iou = {config.labels.min_iou:.3f}")
          '''),
      _markdown('''
          ## Scores → kept records

          The quality filter (an RBF SVM on the videos' mean features, with its cross-validated
          accuracy) scores every video; the elevation MLP estimates each first frame's elevation;
          every video scoring at least `filter.threshold` becomes a synthetic orbit record with
          cameras at that elevation; the index lists the record shards; the report draws the
          contact sheet.
          '''),
      _code('''
          reports = run("filter", "elevation", "records", "index", "report")
          f, e = reports["filter"], reports["elevation"]
          cv = f["cv"] or {}
          print(f"quality filter: fitted on {f['labelled']} labelled videos, cross-validated accuracy "
                f"{cv.get('accuracy_mean', float('nan')):.2f} ({cv.get('folds')} folds); kept "
                f"{f['kept']} of {f['videos']} videos (score >= {f['threshold']})")
          held_out = ("no held-out records" if e["val_mae_deg"] is None else
                      f"held-out mean error {e['val_mae_deg']:.1f}° (predicting the mean elevation: "
                      f"{e['val_mean_baseline_mae_deg']:.1f}°)")
          print(f"elevation MLP: fitted on {e['n_train']} 3D orbits, {held_out}")
          print("\\nkept  score  elevation  prompt")
          scored = [engine.load_npz(work.shard("records", s)) for s in range(count)]
          scores = np.concatenate([s["score"] for s in scored])
          elevations = np.degrees(np.concatenate([s["elevation"] for s in scored]))
          keep = np.concatenate([s["keep"] for s in scored])
          for row, score, elevation, kept in zip(prompts, scores, elevations, keep):
              print(f"{'yes' if kept else 'no ':4}  {score:+.2f}  {elevation:8.1f}°  {row['prompt']}")
          index = reports["index"]
          print(f"\\n{index['records']} records in {len(index['shards'])} shards: {index['directory']}")
          '''),
      _markdown('''
          ## The contact sheet

          `WORKDIR/report/sheet.png`: the best kept videos (green) and the worst rejected ones
          (red), each with its score, estimated elevation and prompt; then the histograms of the
          scores (the threshold in red) and of the kept videos' elevations.
          '''),
      _code('''
          display(vis.show_image(work.path("report", "sheet.png")))
          display(vis.show_image(work.path("report", "histograms.png")))
          '''),
      _markdown('''
          ## A kept record, read back

          What `train_lrm --config.data.train=WORKDIR/records:1,...` reads: the video's frames as
          RGBA views (alpha from the built-in matte) with cameras at the estimated elevation.
          '''),
      _code('''
          shards = data_pipeline.find_shards(work.path("records"))
          if shards:
              record = records.parse(grain.sources.ArrayRecordDataSource(shards)[0])
              views = [records.decode_png(image) for image in record.images]
              print(f"{record.asset_id} ({record.source}): {record.caption!r}, quality "
                    f"{record.quality:+.2f}, elevation {np.degrees(record.elevation_estimate):.1f}°, "
                    f"{record.num_views} views")
              display(vis.show_image(vis.strip([v[..., :3] for v in views], 8), scale=3))
          else:
              print("no video was kept")
          print(vis.timings(seconds))
          '''),
  ]


NOTEBOOK_CELLS = {
    "image_to_3d.ipynb": image_to_3d,
    "text_to_3d.ipynb": text_to_3d,
    "train_lrm.ipynb": train_lrm,
    "data_engine.ipynb": data_engine,
}


def build(name: str, repo_url: str = REPO_URL) -> nbformat.NotebookNode:
  """The notebook ``name`` of :data:`NOTEBOOK_CELLS`, without outputs."""
  notebook = nbformat.v4.new_notebook()
  notebook.cells = NOTEBOOK_CELLS[name](repo_url)
  for i, cell in enumerate(notebook.cells):
    cell["id"] = f"{os.path.splitext(name)[0].replace('_', '-')}-{i:02d}"  # stable ids: clean diffs
  notebook.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "accelerator": "GPU",
      "colab": {"provenance": [], "gpuType": "T4"},
  }
  nbformat.validate(notebook)
  return notebook


def text(notebook: nbformat.NotebookNode) -> str:
  return nbformat.writes(notebook, version=4) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="compare notebooks/ with this script instead of writing")
  parser.add_argument("--repo_url", default=REPO_URL, help="the GitHub repository Colab installs from")
  parser.add_argument("--output", default=NOTEBOOKS)
  args = parser.parse_args(argv)
  os.makedirs(args.output, exist_ok=True)
  stale = []
  for name in NOTEBOOK_CELLS:
    path = os.path.join(args.output, name)
    content = text(build(name, args.repo_url))
    if args.check:
      old = open(path).read() if os.path.isfile(path) else None
      if old != content:
        stale.append(path)
      continue
    with open(path, "w") as f:
      f.write(content)
    print(path)
  if stale:
    print(f"out of date (run python -m tools.make_notebooks): {', '.join(stale)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
