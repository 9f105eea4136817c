"""diffusers AutoencoderKL checkpoints: key names, legacy spellings, strictness, round trips."""

import json

import jax
import numpy as np
import pytest

from vf3d_jax.models import vae
from vf3d_jax.weights import rules, sd_vae
from vf3d_jax.weights.state_dict import CheckpointError, write_safetensors

ARCH = vae.VAEArch(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4)
SD15_PARAMS = 83_653_863  # diffusers' AutoencoderKL with SD 1.5's vae/config.json


@pytest.fixture(scope="module")
def state():
  """A current-spelling state dict of ARCH with random values."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        vae.param_shapes(ARCH))
  return sd_vae.vae_to_state_dict(params)


def _same(a, b) -> bool:
  fa, fb = rules.flat(a), rules.flat(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_sd15_keys_shapes_and_count_match_diffusers():
  torch = pytest.importorskip("torch")
  autoencoder_kl = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl")
  with torch.device("meta"):  # shapes only, no memory
    model = autoencoder_kl.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  shapes = vae.param_shapes(vae.VAEArch.sd15())
  ours = {}
  for path, spec in rules.flat(shapes).items():
    key, transform = sd_vae.checkpoint_key(path)
    ours[key] = transform.save(np.zeros(spec.shape, np.int8)).shape
  assert ours == theirs
  assert sum(p.numel() for p in model.parameters()) == SD15_PARAMS
  assert vae.count_params(shapes) == SD15_PARAMS
  zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in theirs.items()}
  assert sd_vae.infer_vae_arch(zeros) == vae.VAEArch.sd15()


def test_round_trip_is_exact(state):
  params = sd_vae.vae_from_state_dict(state, ARCH)
  back = sd_vae.vae_to_state_dict(params)
  assert back.keys() == state.keys()
  assert all(np.array_equal(back[k], state[k]) for k in state)
  assert params["decoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].shape == (16, 16)


def test_legacy_spelling_and_conv_shaped_attention_load_the_same(state):
  expected = sd_vae.vae_from_state_dict(state, ARCH)
  legacy = {}
  for key, value in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        if key.endswith(".weight"):
          value = value[:, :, None, None]  # CompVis 1x1-conv layout
    legacy[key] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert legacy["decoder.mid_block.attentions.0.query.weight"].shape == (16, 16, 1, 1)
  assert _same(sd_vae.vae_from_state_dict(legacy, ARCH), expected)
  assert sd_vae.infer_vae_arch(legacy, norm_num_groups=4) == ARCH
  both = dict(legacy, **{"encoder.mid_block.attentions.0.to_q.bias": np.zeros(16, np.float32)})
  with pytest.raises(CheckpointError, match="both encoder.mid_block.attentions.0.query.bias"):
    sd_vae.vae_from_state_dict(both, ARCH)


def test_strict_errors_name_the_key(state):
  missing = dict(state)
  del missing["decoder.up_blocks.1.resnets.2.conv2.weight"]
  with pytest.raises(CheckpointError,
                     match=r"missing: decoder\.up_blocks\.1\.resnets\.2\.conv2\.weight"):
    sd_vae.vae_from_state_dict(missing, ARCH)
  extra = dict(state, **{"encoder.mid_block.attentions.0.rel_pos": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError,
                     match=r"unexpected: encoder\.mid_block\.attentions\.0\.rel_pos"):
    sd_vae.vae_from_state_dict(extra, ARCH)
  wrong = dict(state, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
  with pytest.raises(CheckpointError,
                     match=r"wrong shape: quant_conv\.weight \(8, 8, 3, 3\) "
                           r"\(expected \(8, 8, 1, 1\)\)"):
    sd_vae.vae_from_state_dict(wrong, ARCH)


def test_infer_arch_and_load_from_folder_or_file(state, tmp_path):
  assert sd_vae.infer_vae_arch(state, norm_num_groups=4) == ARCH
  with pytest.raises(CheckpointError, match="multiples of norm_num_groups"):
    sd_vae.infer_vae_arch(state, norm_num_groups=32)  # 8 channels cannot hold 32 groups
  expected = sd_vae.vae_from_state_dict(state, ARCH)

  folder = tmp_path / "pipeline" / "vae"
  folder.mkdir(parents=True)
  write_safetensors(state, folder / "diffusion_pytorch_model.safetensors")
  config = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16, 16],
            "layers_per_block": 2, "norm_num_groups": 4, "latent_channels": 4,
            "scaling_factor": 0.13025, "act_fn": "silu"}
  (folder / "config.json").write_text(json.dumps(config))
  for path in (tmp_path / "pipeline", folder, folder / "diffusion_pytorch_model.safetensors"):
    arch, params = sd_vae.load_vae(path)
    assert arch == vae.VAEArch(block_out_channels=(8, 16, 16), norm_num_groups=4,
                               scaling_factor=0.13025)
    assert _same(params, expected)

  loose = tmp_path / "vae.safetensors"  # no config: groups must be given
  write_safetensors(state, loose)
  arch, params = sd_vae.load_vae(loose, ARCH)
  assert arch == ARCH and _same(params, expected)

  (folder / "config.json").write_text(json.dumps(dict(config, layers_per_block=1)))
  with pytest.raises(CheckpointError, match="config.json says"):
    sd_vae.load_vae(folder)
  with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
    sd_vae.load_vae(tmp_path)
