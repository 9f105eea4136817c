"""Text encoders: CLIPText against transformers' PyTorch CLIPTextModel, WordText tokenization."""

import json
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.models import text

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["a red chair", "Hello, world!", ""]
MAX_LENGTH = 77

# Runs in a fresh interpreter in which torch cannot be found (as on a machine
# without it), loads the folder and writes tokens and embeddings.
_NO_TORCH_SCRIPT = textwrap.dedent("""
    import json, sys

    class _HideTorch:
      def __init__(self, inner):
        self.inner = inner
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
          return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None
      def __getattr__(self, name):  # find_distributions, invalidate_caches, ...
        return getattr(self.inner, name)
    sys.meta_path[:] = [_HideTorch(f) for f in sys.meta_path]

    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from vf3d_jax.models import text

    folder, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    encoder = text.CLIPText.from_pretrained(folder)
    assert isinstance(encoder, text.TextEncoder)
    tokens = encoder.tokenize(prompts)
    params = encoder.init(jax.random.key(0))
    hidden = jax.jit(encoder.apply)(params, tokens)
    null = text.encode_prompts(encoder, params, [""])
    assert "torch" not in sys.modules, "torch was imported"
    np.savez(out, tokens=tokens, hidden=np.asarray(hidden), null=np.asarray(null),
             max_length=encoder.max_length, width=encoder.width)
""")


def _write_tokenizer_files(folder):
  """A handmade byte-level BPE vocabulary in CLIP's format (a few merges), ~530 tokens."""
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  chars = list(bytes_to_unicode().values())
  merges = ["r e", "re d</w>", "c h", "ch a", "cha i", "chai r</w>", "h e", "l l", "he ll",
            "o</w>", "hell o</w>", "a</w>"]
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
  os.makedirs(folder)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}, f)
  return vocab


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """An SD-style folder with a tiny random PyTorch CLIPTextModel saved as safetensors."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("sd")
  vocab = _write_tokenizer_files(os.path.join(root, "tokenizer"))
  config = transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"])
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # LayerNorms away from the identity, so they are tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape))
  model.save_pretrained(os.path.join(root, "text_encoder"), safe_serialization=True)
  assert os.path.exists(os.path.join(root, "text_encoder", "model.safetensors"))
  return root, model, vocab


def test_clip_text_matches_torch_and_needs_no_torch(clip_folder, tmp_path):
  torch = pytest.importorskip("torch")
  root, model, vocab = clip_folder
  out = tmp_path / "out.npz"
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO, XLA_FLAGS="")
  run = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(root), json.dumps(PROMPTS),
                        str(out)], env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  result = np.load(out)
  assert int(result["max_length"]) == MAX_LENGTH and int(result["width"]) == 32

  tokens = result["tokens"]
  start, end = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  assert tokens.shape == (3, MAX_LENGTH) and tokens.dtype == np.int32
  # BPE by hand: "a</w>", "red</w>", then "chair</w>" via c-h-a-i-r merges.
  np.testing.assert_array_equal(tokens[0, :5], [start, vocab["a</w>"], vocab["red</w>"],
                                                vocab["chair</w>"], end])
  np.testing.assert_array_equal(tokens[0, 5:], end)  # SD 1.5 pads with <|endoftext|>
  np.testing.assert_array_equal(tokens[2], [start] + [end] * (MAX_LENGTH - 1))

  with torch.no_grad():
    expected = model(torch.from_numpy(tokens.astype(np.int64))).last_hidden_state.numpy()
  # float32 both sides; differences are summation order only (measured 1.3e-6 on
  # outputs of magnitude ~3).
  np.testing.assert_allclose(result["hidden"], expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(result["null"], expected[2:], atol=1e-5, rtol=0)


# Computed once from the definition (START_ID=1, 2 + crc32(word) % (4096 - 2)) and
# written out, so a change of hash, salt or word splitting shows up here.
HARD_CODED = {
    "A red chair": [1, 2271, 4005, 1923],
    "": [1],
}


def test_word_text_tokens_are_stable_and_padded():
  encoder = text.WordText(vocab_size=4096, max_length=16, width=32, heads=2, mlp_dim=64)
  assert isinstance(encoder, text.TextEncoder)
  tokens = encoder.tokenize(list(HARD_CODED) + ["RED, chair!! a", " ".join(["w"] * 40)])
  assert tokens.shape == (4, 16) and tokens.dtype == np.int32
  for row, ids in zip(tokens, HARD_CODED.values()):
    np.testing.assert_array_equal(row, ids + [0] * (16 - len(ids)))
  # Independently of the library: CRC-32 of the lower-cased words.
  red, chair, a = (2 + zlib.crc32(w.encode()) % 4094 for w in ("red", "chair", "a"))
  np.testing.assert_array_equal(tokens[2, :4], [1, red, chair, a])
  np.testing.assert_array_equal(tokens[3], [1] + [2 + zlib.crc32(b"w") % 4094] * 15)  # truncated
  np.testing.assert_array_equal(text.null_tokens(encoder, 2), np.tile(tokens[1], (2, 1)))
  assert np.all(tokens < encoder.vocab_size)


def test_word_text_apply_is_jittable_and_ignores_padding():
  encoder = text.WordText(vocab_size=64, max_length=8, width=32, heads=2, mlp_dim=64)
  params = encoder.init(jax.random.key(0))
  assert set(params) == {"token_embedding", "position_embedding", "ln_1", "attn", "ln_2", "fc1",
                         "fc2", "final_norm"}
  tokens = encoder.tokenize(["red chair", "", "blue table by the window"])
  apply = jax.jit(encoder.apply)
  out = apply(params, tokens)
  assert out.shape == (3, 8, 32) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  # Real tokens do not attend to padding: a shorter pad tail leaves them unchanged.
  np.testing.assert_allclose(apply(params, tokens[:1, :4])[0, :3], out[0, :3], atol=1e-5)
  # Different prompts give different contexts; the empty prompt is a valid input.
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3
