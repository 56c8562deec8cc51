"""The ViT against an outside reference: `transformers` CLIPVisionModel with random weights,
converted by our interop functions; position-embedding interpolation against HF's; the strict
converter's errors; the parameter count against `mm1_moe.info`'s formula."""

import os

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.info import vision_params
from mm1_moe.interop import InteropError, clip_vision_config, load_clip_vision_, vit_from_clip
from mm1_moe.models.vision import VisionTransformer, interpolate_positions, vision_transformer_config
from mm1_moe.runtime import initialize, shutdown

from _reference_models import loads_every_parameter, perturbed  # noqa: E402

transformers = pytest.importorskip("transformers")


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


@pytest.fixture(scope="module")
def started():
    """One single-process runtime for the module (Megatron's parallel layers need its groups)."""
    initialize(load_config(os.path.join(CONFIGS, "tiny-dense.yaml")))
    yield
    shutdown()


def _config(configs_dir, activation="gelu"):
    # tiny-dense's ViT: image 56, patch 14 (4 x 4 = 16 patches), width 32, depth 2, 2 heads, MLP 64
    return load_config(os.path.join(configs_dir, "tiny-dense.yaml"),
                       [f"model.vision.activation={activation}"])


def _random_clip(config, seed=0):
    torch.manual_seed(seed)
    return perturbed(transformers.CLIPVisionModel(clip_vision_config(config)))


def _loaded_vit(config, hf):
    vit = VisionTransformer(config, vision_transformer_config(config, use_cpu_initialization=True))
    loaded = loads_every_parameter(vit, lambda: load_clip_vision_(vit, hf.state_dict(), config))
    assert loaded == 5 + 12 * config.model.vision.depth
    return vit.eval()


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_last_hidden_states_match_transformers_clip(started, configs_dir, activation):
    config = _config(configs_dir, activation)
    hf = _random_clip(config)
    vit = _loaded_vit(config, hf)
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = hf(pixel_values=images).last_hidden_state[:, 1:]  # MM1 reads no CLS
        got = vit(images)
    assert got.shape == (3, 16, 32)
    # fp32 end to end; measured max error 1.2e-7 on hidden states of magnitude ~1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_other_resolutions_interpolate_positions_as_transformers(started, configs_dir):
    config = _config(configs_dir)
    hf = _random_clip(config, seed=1)
    vit = _loaded_vit(config, hf)
    images = torch.randn(2, 3, 70, 84)  # a 5 x 6 grid instead of the configured 4 x 4
    with torch.no_grad():
        expected = hf(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        got = vit(images)
    assert got.shape == (2, 30, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_interpolation_shape_and_identity_at_native_size():
    table = torch.randn(1 + 27 * 27, 8)
    assert interpolate_positions(table, 36, 36).shape == (1 + 36 * 36, 8)
    assert interpolate_positions(table, 20, 31).shape == (1 + 20 * 31, 8)
    assert torch.equal(interpolate_positions(table, 36, 36)[0], table[0])  # CLS kept as is
    # bicubic, align_corners=False, at scale 1 samples the grid points themselves
    torch.testing.assert_close(interpolate_positions(table, 27, 27), table, rtol=0, atol=1e-6)


def test_converter_accepts_file_names_and_transformers_names(configs_dir):
    config = _config(configs_dir)
    hf = dict(_random_clip(config).state_dict())  # transformers >= 5: no vision_model. prefix
    prefixed = {f"vision_model.{k}": v for k, v in hf.items()}
    prefixed["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old files
    a, b = vit_from_clip(hf, config), vit_from_clip(prefixed, config)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_extra_and_misshaped_tensors_are_named(configs_dir):
    config = _config(configs_dir)
    hf = dict(_random_clip(config).state_dict())
    missing = {k: v for k, v in hf.items() if k != "encoder.layers.1.self_attn.v_proj.bias"}
    with pytest.raises(InteropError, match=r"missing.*encoder\.layers\.1\.self_attn\.v_proj\.bias"):
        vit_from_clip(missing, config)
    no_post_ln = {k: v for k, v in hf.items() if not k.startswith("post_layernorm")}
    with pytest.raises(InteropError, match=r"missing.*post_layernorm\.bias"):
        vit_from_clip(no_post_ln, config)
    extra = dict(hf, **{"encoder.layers.2.mlp.fc1.weight": torch.zeros(1)})
    with pytest.raises(InteropError, match=r"unexpected.*encoder\.layers\.2\.mlp\.fc1\.weight"):
        vit_from_clip(extra, config)
    bad = dict(hf, **{"embeddings.position_embedding.weight": torch.zeros(50, 32)})
    with pytest.raises(InteropError, match=r"embeddings\.position_embedding\.weight: shape \(50, 32\), expected \(17, 32\)"):
        vit_from_clip(bad, config)
    both = dict(hf, **{"vision_model.pre_layrnorm.bias": hf["pre_layrnorm.bias"]})
    with pytest.raises(InteropError, match=r"pre_layrnorm\.bias appears both"):
        vit_from_clip(both, config)


def test_parameter_count_matches_info_formula(started, configs_dir):
    config = _config(configs_dir)
    vit = VisionTransformer(config, vision_transformer_config(config, use_cpu_initialization=True))
    hf = transformers.CLIPVisionModel(clip_vision_config(config))
    counted = sum(p.numel() for p in vit.parameters())
    width = config.model.vision.width
    # CLIP's post_layernorm (2 W) normalises the pooled CLS vector only; MM1 has no use for it.
    assert counted == sum(p.numel() for p in hf.parameters()) - 2 * width
    assert counted == vision_params(config.model.vision)
