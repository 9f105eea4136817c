"""pretrained.find_released: a local copy, the Hugging Face cache, a download, or one clear error."""

import huggingface_hub
import pytest

from vf3d_jax import pretrained


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
  """No named copy, an empty working directory, an empty cache, and no download."""
  monkeypatch.delenv(pretrained.RELEASED_ENV, raising=False)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)

  def offline(*args, **kwargs):
    raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
  return tmp_path


def test_a_local_copy_is_found_before_the_hub(nowhere, monkeypatch):
  monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                      lambda *a, **k: pytest.fail("downloaded although a copy is here"))
  (nowhere / "model.safetensors").write_bytes(b"x")
  assert pretrained.find_released() == "model.safetensors"
  converted = nowhere / "checkpoints" / "vfusion3d"
  converted.mkdir(parents=True)
  assert pretrained.find_released() == "model.safetensors"  # no arch.json: not a model dir
  (converted / pretrained.ARCH_FILE).write_text("{}")
  assert pretrained.find_released() == "checkpoints/vfusion3d"  # listed first
  (nowhere / "mine.safetensors").write_bytes(b"x")
  assert pretrained.find_released(search=["absent", "mine.safetensors"]) == "mine.safetensors"


def test_the_named_copy_wins_and_a_wrong_name_is_an_error(nowhere, monkeypatch):
  (nowhere / "model.safetensors").write_bytes(b"x")
  named = nowhere / "released.safetensors"
  named.write_bytes(b"x")
  monkeypatch.setenv(pretrained.RELEASED_ENV, str(named))
  assert pretrained.find_released() == str(named)
  monkeypatch.setenv(pretrained.RELEASED_ENV, str(nowhere / "missing.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"VF3D_RELEASED_WEIGHTS=.*missing.safetensors: no such"):
    pretrained.find_released()


def test_the_cache_then_a_download(nowhere, monkeypatch):
  cached = nowhere / "cache" / "model.safetensors"
  cached.parent.mkdir()
  cached.write_bytes(b"x")
  asked = []
  monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                      lambda repo, name, cache_dir=None: asked.append((repo, name)) or str(cached))
  assert pretrained.find_released(download=False) == str(cached)
  assert asked == [("facebook/vfusion3d", "model.safetensors")]
  monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                      lambda repo, name, cache_dir=None: str(cached))
  assert pretrained.find_released() == str(cached)


def test_offline_or_not_allowed_is_one_file_not_found_error(nowhere):
  with pytest.raises(FileNotFoundError, match=r"^cannot download facebook/vfusion3d/model.safetensors "
                                              r"\(LocalEntryNotFoundError: no connection\)$"):
    pretrained.find_released()
  with pytest.raises(FileNotFoundError, match=r"no local copy .* downloading is off"):
    pretrained.find_released(download=False)
