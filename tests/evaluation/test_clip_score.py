"""CLIP similarity: a tiny random CLIP against transformers' PyTorch CLIPModel and CLIPProcessor."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.models.test_text import _write_tokenizer_files
from vf3d_jax.evaluation import clip_score

jax.config.update("jax_default_matmul_precision", "highest")

PROMPTS = ["a red chair", "Hello, world!", "", " ".join(["chair"] * 100)]  # the last is truncated
# Not OpenAI's, so that reading preprocessor_config.json is tested.
MEAN = (0.5, 0.45, 0.4)
STD = (0.2, 0.25, 0.3)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIDE = 32  # the tiny vision tower's image_size, the processor's resize and crop


def _images(rng, n, height, width):
  """uint8 ``[n, height, width, 3]``: smooth colour fields with a little noise, as renders."""
  coarse = rng.uniform(size=(n, height // 8 + 2, width // 8 + 2, 3))
  smooth = jax.image.resize(coarse, (n, height, width, 3), "cubic")
  noisy = np.asarray(smooth) + 0.05 * rng.normal(size=(n, height, width, 3))
  return np.round(255 * np.clip(noisy, 0, 1)).astype(np.uint8)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A CLIPModel.save_pretrained folder (safetensors) of a tiny random PyTorch CLIP."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder = os.path.join(tmp_path_factory.mktemp("clip"), "clip-tiny")
  vocab = _write_tokenizer_files(folder)
  end = vocab["<|endoftext|>"]  # the largest id, as in OpenAI's vocabulary
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                       bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, image_size=SIDE, patch_size=8),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorms away from the identity, so they are tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape))
  model.save_pretrained(folder, safe_serialization=True)
  transformers.CLIPImageProcessor(size={"shortest_edge": SIDE},
                                  crop_size={"height": SIDE, "width": SIDE}, image_mean=MEAN,
                                  image_std=STD).save_pretrained(folder)
  assert os.path.isfile(os.path.join(folder, "model.safetensors"))
  # The PyTorch-side reference: the PIL-based CLIPImageProcessor, the slow tokenizer.
  processor = transformers.CLIPProcessor(
      image_processor=transformers.CLIPImageProcessor.from_pretrained(folder),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(folder))
  return folder, model, processor


@pytest.fixture(scope="module")
def scorer(clip_folder):
  return clip_score.CLIPScorer.from_pretrained(clip_folder[0])


def _torch_image_embeddings(model, processor, images):
  """Unit ``get_image_features`` of uint8 images through the processor, and its pixels (NHWC)."""
  import torch  # pylint: disable=g-import-not-at-top
  pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    features = model.get_image_features(pixel_values=pixels)
  features = torch.nn.functional.normalize(features, dim=-1)
  return features.numpy(), pixels.numpy().transpose(0, 2, 3, 1)


def _torch_text_embeddings(model, processor, texts):
  import torch  # pylint: disable=g-import-not-at-top
  batch = processor(text=texts, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt")
  with torch.no_grad():
    features = model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"])
  return torch.nn.functional.normalize(features, dim=-1).numpy(), batch["input_ids"].numpy()


def test_loads_settings_and_name(clip_folder, scorer):
  assert scorer.name == "clip-tiny"  # the folder's name: config.json has no _name_or_path
  assert clip_score.CLIPScorer.from_pretrained(clip_folder[0], name="tiny").name == "tiny"
  assert scorer.dim == 16 and scorer.text_length == 77
  assert scorer.preprocess == clip_score.ImagePreprocess(resize=SIDE, crop=(SIDE, SIDE),
                                                         mean=MEAN, std=STD, method="bicubic")


@pytest.mark.parametrize("shape", [(SIDE, SIDE), (64, 64), (48, 40), (40, 70)])
def test_preprocess_matches_clip_image_processor(clip_folder, scorer, shape):
  _, _, processor = clip_folder
  images = _images(np.random.default_rng(0), 3, *shape)
  expected = processor(images=list(images), return_tensors="np")["pixel_values"]
  got = np.asarray(scorer.preprocess(images.astype(np.float32) / 255))
  assert got.shape == (3, SIDE, SIDE, 3)
  error = np.abs(got - expected.transpose(0, 2, 3, 1)) * np.asarray(STD)  # in [0, 1] units
  if shape == (SIDE, SIDE):  # no resize: rescale and normalise only
    assert error.max() < 1e-6
  else:
    # The same bicubic kernel (jax's agrees with PIL's float-mode resize to ~1e-5),
    # but PIL rounds and clips each of its two 8-bit passes: measured max
    # 1.5 / 3.2 / 1.8 (of 255) for the three shapes, mean 0.28-0.30.
    assert error.max() < 3.5 / 255 and error.mean() < 0.35 / 255
  np.testing.assert_array_equal(scorer.preprocess(images), got)  # uint8 input is / 255


def test_default_preprocess_matches_openai_processor_at_224(tmp_path):
  transformers = pytest.importorskip("transformers")
  # openai/clip-vit-large-patch14's preprocessor_config.json, in its older format.
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({
      "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
      "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_MEAN),
      "image_std": list(OPENAI_STD), "resample": 3, "size": 224}))
  processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
  preprocess = clip_score.ImagePreprocess()
  assert clip_score.ImagePreprocess.from_processor(processor) == preprocess
  assert clip_score.ImagePreprocess.from_processor(transformers.CLIPImageProcessor()) == preprocess
  rng = np.random.default_rng(1)
  for images in (_images(rng, 2, 512, 512), _images(rng, 1, 300, 400)):
    expected = processor(images=list(images), return_tensors="np")["pixel_values"]
    got = np.asarray(preprocess(images.astype(np.float32) / 255))
    assert got.shape == (len(images), 224, 224, 3)
    error = np.abs(got - expected.transpose(0, 2, 3, 1)) * np.asarray(OPENAI_STD)
    # PIL's 8-bit rounding and clipping, as above: measured max 2.7 / 255, mean 0.28-0.30 / 255.
    assert error.max() < 3.5 / 255 and error.mean() < 0.35 / 255


def test_embeddings_match_torch(clip_folder, scorer):
  _, model, processor = clip_folder
  images = _images(np.random.default_rng(2), 4, 64, 64)
  expected, pixels = _torch_image_embeddings(model, processor, images)

  # The model alone, on the processor's own pixels: float32 both sides.
  raw = clip_score.CLIPScorer(scorer.model, scorer.tokenizer,
                              clip_score.ImagePreprocess(None, None, None, None), name="raw")
  got = np.asarray(raw.image_embeddings(pixels))
  assert got.shape == (4, 16)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # measured 1.2e-7

  # End to end from float images: the preprocessing differs by PIL's uint8 rounding.
  got = np.asarray(scorer.image_embeddings(images.astype(np.float32) / 255))
  np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)  # measured 3.7e-4
  # ... far less than between the images (measured >= 0.056), so a wrong mean or
  # std, or none, would show here too.
  distinct = np.abs(expected[:, None] - expected[None]).max(-1)[~np.eye(4, dtype=bool)]
  assert distinct.min() > 0.03

  got = np.asarray(scorer.text_embeddings(PROMPTS))
  expected, ids = _torch_text_embeddings(model, processor, PROMPTS)
  np.testing.assert_array_equal(scorer.tokenize(PROMPTS)[0], ids)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # measured 3.3e-7
  with pytest.raises(TypeError, match="not one string"):
    scorer.text_embeddings("a red chair")


def test_similarities_match_torch_cosines(clip_folder, scorer):
  _, model, processor = clip_folder
  rng = np.random.default_rng(3)
  renders = _images(rng, 5, 64, 64)
  reference = _images(rng, 1, 48, 48)
  render_emb, _ = _torch_image_embeddings(model, processor, renders)
  reference_emb, _ = _torch_image_embeddings(model, processor, reference)
  text_emb, _ = _torch_text_embeddings(model, processor, ["a red chair"])
  image_cos = render_emb @ reference_emb[0]
  text_cos = render_emb @ text_emb[0]

  batched = clip_score.CLIPScorer(scorer.model, scorer.tokenizer, scorer.preprocess,
                                  name=scorer.name, batch_size=2)  # batches of 2, 2, 1
  renders = renders.astype(np.float32) / 255
  reference = reference[0].astype(np.float32) / 255
  per_view = batched.image_similarities(renders, reference)
  assert per_view.shape == (5,) and per_view.dtype == np.float32
  # Raw cosines, not x100: PIL's rounding moves them by ~1e-4 (measured max 6.3e-5,
  # 2.1e-4 for the text similarity).
  np.testing.assert_allclose(per_view, image_cos, atol=1e-3)
  assert abs(batched.image_similarity(renders, reference) - image_cos.mean()) < 1e-3
  np.testing.assert_allclose(scorer.image_similarities(renders, reference), per_view, atol=1e-6)

  per_view = batched.text_similarities(renders, "a red chair")
  np.testing.assert_allclose(per_view, text_cos, atol=1e-3)
  assert abs(batched.text_similarity(renders, "a red chair") - text_cos.mean()) < 1e-3
  assert np.ptp(text_cos) > 1e-2  # distinct views (measured spread 0.032)


def test_loads_flax_and_pytorch_weights(clip_folder, scorer, tmp_path):
  transformers = pytest.importorskip("transformers")
  folder, model, _ = clip_folder
  flax_dir, bin_dir = str(tmp_path / "flax"), str(tmp_path / "bin")
  transformers.FlaxCLIPModel.from_pretrained(folder).save_pretrained(flax_dir)
  model.save_pretrained(bin_dir, safe_serialization=False)
  # As in openai/clip-vit-large-patch14's config.json: the name reports state.
  with open(os.path.join(flax_dir, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(flax_dir, "config.json"), "w") as f:
    json.dump(dict(config, _name_or_path="clip-tiny-flax/"), f)
  prompts = PROMPTS[:2]
  expected = np.asarray(scorer.text_embeddings(prompts))
  for target, weights, name in ((flax_dir, "flax_model.msgpack", "clip-tiny-flax"),
                                (bin_dir, "pytorch_model.bin", "bin")):
    assert sorted(f for f in os.listdir(target) if "model" in f) == [weights]
    for file in ("vocab.json", "merges.txt", "tokenizer_config.json"):
      shutil.copy(os.path.join(folder, file), target)
    # No preprocessor_config.json: OpenAI's mean and std at the tower's image size.
    loaded = clip_score.CLIPScorer.from_pretrained(target)
    assert loaded.name == name
    assert loaded.preprocess == clip_score.ImagePreprocess(resize=SIDE, crop=(SIDE, SIDE))
    np.testing.assert_allclose(np.asarray(loaded.text_embeddings(prompts)), expected, atol=1e-6)


def test_missing_files_raise_one_line(clip_folder, tmp_path):
  folder, _, _ = clip_folder
  broken = tmp_path / "no-weights"
  broken.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), broken)
  no_merges = tmp_path / "no-merges"
  shutil.copytree(folder, no_merges)
  os.remove(no_merges / "merges.txt")
  for path, what in ((tmp_path / "absent", "no such folder"), (broken, "no weights"),
                     (no_merges, "no tokenizer merges.txt")):
    with pytest.raises(FileNotFoundError) as error:
      clip_score.CLIPScorer.from_pretrained(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: {what}")
    assert (f"huggingface-cli download openai/clip-vit-large-patch14 --include '*.json' '*.txt' "
            f"model.safetensors --local-dir {path}") in message
