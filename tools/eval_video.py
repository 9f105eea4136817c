r"""Scores a video model's orbits against held-out renders, for several guidance settings.

  python -m tools.eval_video --model runs/video --data data/orbits_eval/1.0.0 --num_videos 16 \
      --guidance 1,1 --guidance 2,5 --output outputs/eval_video

For each held-out orbit (starting at its view 0, white background) the model
samples a clip from the first frame and the caption; scores are
``video_trainer.consistency_scores``: frame k of the sample against frame k of
the renders (``orbit_*``, k >= 1), the first true frame repeated
(``static_*``: a model that does not turn), whether the sample turns the way
the orbit goes (``direction_*_gain``, next to ``direction_iou_gain_max``, what
the renders themselves score; ``direction_accuracy``, the share of frames
whose two directions look different that the sample turns the right way, 0.5
for a static clip), with bootstrap 95% intervals over clips, and the sample's
own first frame against the true one (``first_psnr``: does it keep the object). Before sampling, the
direction test (``video_trainer.direction_losses``): the model's denoising
loss on each true orbit against the same orbit flown backwards, with a
bootstrap 95% interval of the mean gain over clips. Writes one
JSON line per setting (appended as each finishes; a rerun with the same ``--output`` skips
the settings already in its ``scores.jsonl``, so a killed run resumes), and per setting a grid (rows: renders, then samples) and
the sampled clips as ``samples_img<w>_txt<w>.npy``.
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import video as video_configs
from vf3d_jax import cli
from vf3d_jax.data import pipeline
from vf3d_jax.evaluation import metrics as metrics_lib
from vf3d_jax.training import video_trainer
from vf3d_jax.video import sampling
from vf3d_jax.video import model as model_lib

_MODEL = flags.DEFINE_string("model", None, "Export directory or finished workdir.", required=True)
_DATA = flags.DEFINE_string("data", None, "Held-out orbit records.", required=True)
_NUM = flags.DEFINE_integer("num_videos", 16, "Held-out orbits to sample.")
_GUIDANCE = flags.DEFINE_multi_string("guidance", ["2,5"], "image_scale,text_scale pairs.")
_STEPS = flags.DEFINE_integer("steps", 20, "Sampler steps.")
_SAMPLER = flags.DEFINE_string("sampler", "ddim", "ddim or dpm_solver_pp.")
_BATCH = flags.DEFINE_integer("batch", 8, "Clips per sampling call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi (0: none).")
_REPLACE = flags.DEFINE_bool("replace_first_frame", False,
                             "Hold the first frame in x_t at every step as well.")
_OUTPUT = flags.DEFINE_string("output", "", "Folder for the grids and scores.jsonl.")


def _done(output: str) -> list[dict]:
  """The lines an earlier run with this ``--output`` already wrote."""
  path = os.path.join(output, "scores.jsonl") if output else ""
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().startswith("{")]


def _setting_key(line: dict) -> tuple:
  return tuple(line.get(k) for k in ("test", "image_scale", "text_scale", "sampler", "steps",
                                     "guidance_rescale", "replace_first_frame", "num_videos"))


def main(argv):
  del argv
  done = {_setting_key(line) for line in _done(_OUTPUT.value)}
  model, params = model_lib.load_export(sampling.resolve_model_path(_MODEL.value))
  encoders = model.load_encoders()
  config = video_configs.get_config("tiny")
  config.data.update(eval=_DATA.value, num_frames=model.spec.num_frames,
                     frame_resolution=model.spec.resolution, num_workers=0)
  clips = video_trainer.load_eval_clips(config, _NUM.value)
  prompts = pipeline.decode_captions(clips["caption"])
  truth = clips["frames"]
  if _OUTPUT.value:
    os.makedirs(_OUTPUT.value, exist_ok=True)
  # The direction test needs no sampling: losses of true against mirrored orbits.
  if _setting_key({"test": "direction_losses", "num_videos": len(prompts)}) in done:
    print(f"direction_losses: already in {_OUTPUT.value}/scores.jsonl")
  else:
    _direction_test(model, params, encoders, truth, prompts)
  for setting in _GUIDANCE.value:
    image_scale, text_scale = (float(v) for v in setting.split(","))
    key = _setting_key({"image_scale": image_scale, "text_scale": text_scale,
                        "sampler": _SAMPLER.value, "steps": _STEPS.value,
                        "guidance_rescale": _RESCALE.value, "replace_first_frame": _REPLACE.value,
                        "num_videos": len(prompts)})
    if key in done:
      print(f"image_scale {image_scale:g}, text_scale {text_scale:g}: already in "
            f"{_OUTPUT.value}/scores.jsonl")
      continue
    _sample_setting(model, params, encoders, truth, prompts, image_scale, text_scale)


def _direction_test(model, params, encoders, truth, prompts):
  losses = video_trainer.direction_losses(model, params, encoders, truth, prompts,
                                          jax.random.key(_SEED.value + 11))
  gain = losses["mirrored"] - losses["forward"]
  rng = np.random.default_rng(0)
  boot = [rng.choice(gain, len(gain)).mean() for _ in range(2000)]
  line = {"test": "direction_losses", "num_videos": len(prompts),
          **video_trainer.direction_loss_scores(losses),
          "direction_loss_gain_ci95": [float(v) for v in np.percentile(boot, [2.5, 97.5])]}
  print(json.dumps(line))
  if _OUTPUT.value:
    np.savez(os.path.join(_OUTPUT.value, "direction_losses.npz"), **losses)
    with open(os.path.join(_OUTPUT.value, "scores.jsonl"), "a") as f:
      f.write(json.dumps(line) + "\n")


def _sample_setting(model, params, encoders, truth, prompts, image_scale, text_scale):
  rng = np.random.default_rng(0)  # bootstrap: the same intervals whichever settings ran before
  options = sampling.SampleOptions(sampler=_SAMPLER.value, num_steps=_STEPS.value,
                                   image_scale=image_scale, text_scale=text_scale,
                                   guidance_rescale=_RESCALE.value,
                                   replace_first_frame=_REPLACE.value)
  # A bar over the clips when stderr is a terminal (none in logs).
  samples = np.concatenate([clips for _, clips in sampling.sample_batches(
      model, params, encoders, prompts, seed=_SEED.value, batch_size=_BATCH.value,
      first_frames=truth[:, 0], options=options,
      desc=f"image_scale {image_scale:g}, text_scale {text_scale:g}")])
  scores = video_trainer.consistency_scores(samples, truth)
  gain, distinct = video_trainer.direction_frames(samples, truth)
  boot = [(video_trainer.direction_accuracy(gain[i], distinct[i]), gain[i].mean())
          for i in (rng.choice(len(gain), len(gain)) for _ in range(2000))]
  for name, values in zip(("direction_accuracy", "direction_iou_gain"), zip(*boot)):
    scores[f"{name}_ci95"] = [float(v) for v in np.percentile(values, [2.5, 97.5])]
  scores["first_psnr"] = float(jnp.mean(metrics_lib.psnr(jnp.asarray(samples[:, 0]),
                                                          jnp.asarray(truth[:, 0]))))
  line = {"image_scale": image_scale, "text_scale": text_scale, "sampler": _SAMPLER.value,
          "steps": _STEPS.value, "guidance_rescale": _RESCALE.value,
          "replace_first_frame": _REPLACE.value,
          "num_videos": len(prompts), **scores}
  print(json.dumps(line))
  if _OUTPUT.value:  # the pictures first: a setting is done once its line is written
    rows = [r for pair in zip(truth[:8], samples[:8]) for r in pair]
    grid = (np.clip(video_trainer.clip_grid(rows), 0, 1) * 255).round().astype(np.uint8)
    name = (f"img{image_scale:g}_txt{text_scale:g}"
            + (f"_rescale{_RESCALE.value:g}" if _RESCALE.value else "")
            + ("_replace" if _REPLACE.value else ""))
    Image.fromarray(grid).save(os.path.join(_OUTPUT.value, f"grid_{name}.png"))
    # The clips themselves, [B, F, R, R, 3] in [0, 1], for other scores.
    np.save(os.path.join(_OUTPUT.value, f"samples_{name}.npy"), samples.astype(np.float32))
    with open(os.path.join(_OUTPUT.value, "scores.jsonl"), "a") as f:
      f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
  cli.run(main)
