"""The memory planner against measurement: the bytes autograd saves for backward
(``SavedBytes``: distinct storages, parameters left out) per dense decoder layer, per MoE layer,
for the embedding and loss, and for the ViT + connector, at 1,024-4,096 tokens with small
widths, for each ``train.recompute`` mode and dtype, against ``mm1_moe.activations`` (the
formulas ``mm1-moe info`` reports). Within 10%: where they disagree the formula changes.

The MoE runs our Triton kernels (the GPU path; interpreted here, forward only where the backward
is not needed); attention runs SDPA, whose saves equal our flash kernel's (q, k, v, o, lse)."""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from mm1_moe.activations import decoder_layer_bytes, decoder_stage_bytes, vision_bytes
from mm1_moe.config import load_config
from mm1_moe.info import memory_per_gpu
from mm1_moe.models.builder import build_model_chunks
from mm1_moe.models.saved_memory import OUTSIDE, SavedBytes, decoder_layer_scopes
from mm1_moe.runtime import initialize, shutdown

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "configs")
TOLERANCE = 0.10


def _config(name, *overrides):
    return load_config(os.path.join(CONFIGS, f"{name}.yaml"),
                       ["kernels.attention=sdpa", "kernels.moe=triton", "kernels.norm=triton",
                        *overrides])


def _decoder(seq, b, dtype, mode, backward=False, *extra):
    """(config, SavedBytes) of one forward of tiny-moe (layers 0, 2 dense; 1, 3 MoE)."""
    config = _config("tiny-moe", f"data.seq_length={seq}",
                     f"model.decoder.max_position_embeddings={seq}",
                     f"train.micro_batch_size={b}", f"train.dtype={dtype}",
                     f"train.recompute={mode}", *extra)
    initialize(config)
    try:
        (model,) = build_model_chunks(config, on_cpu=True)
        scopes = decoder_layer_scopes(model, config)
        tokens = torch.randint(5, 256, (b, seq), generator=torch.Generator().manual_seed(0))
        with SavedBytes(model, scopes) as saved:
            loss = model(tokens, torch.arange(seq).expand(b, -1), None, labels=tokens).mean()
            if backward:
                layers = sorted(scopes["dense"] + scopes["moe"], key=lambda m: m.layer_number)
                saved.backward(loss, layers[::config.train.recompute_num_layers])
        return config, saved
    finally:
        shutdown()


def _close(measured, planned, what):
    assert planned > 0 and abs(measured - planned) <= TOLERANCE * planned, \
        f"{what}: measured {measured:,.0f} bytes, planned {planned:,.0f} " \
        f"({measured / planned - 1:+.1%})"


@pytest.mark.parametrize("seq,b,dtype,mode,extra", [
    (1024, 1, "fp32", "none", ()), (1024, 1, "bf16", "none", ()),
    (1024, 1, "fp32", "selective", ()), (1024, 1, "bf16", "selective", ()),
    (4096, 1, "bf16", "none", ()),
    (1024, 2, "fp32", "none", ()), (1024, 1, "bf16", "none", ("kernels.norm=torch",)),
    (1024, 1, "fp32", "none", ("kernels.attention=local",)),
    (1024, 1, "bf16", "none", ("kernels.attention=local",)),
])
def test_decoder_layers_as_planned(seq, b, dtype, mode, extra):
    config, saved = _decoder(seq, b, dtype, mode, False, *extra)
    _close(saved.forward["dense"] / 2, decoder_layer_bytes(config, False).total, "dense layer")
    _close(saved.forward["moe"] / 2, decoder_layer_bytes(config, True).total, "MoE layer")
    edge = decoder_stage_bytes(config, range(4), True, True).embedding_and_loss
    _close(saved.forward[OUTSIDE], edge, "embedding and loss")


@pytest.mark.parametrize("dtype,group", [("fp32", 1), ("bf16", 2)])
def test_full_recompute_keeps_group_inputs_and_reruns_one_group(dtype, group):
    config, saved = _decoder(1024, 1, dtype, "full", True, f"train.recompute_num_layers={group}")
    plan = decoder_stage_bytes(config, range(4), True, True)
    assert saved.forward["dense"] == saved.forward["moe"] == 0  # layers run without grad
    _close(saved.total(), plan.layers + plan.embedding_and_loss, "kept")
    assert len(saved.rerun_groups) == 4 // group
    _close(saved.rerun_peak, plan.recompute_peak, "largest rerun group")


def test_selective_and_full_cut_what_is_kept():
    """The planner's per-mode ratio on one config, the figure the README quotes."""
    kept = {}
    for mode in ("none", "selective", "full"):
        config = _config("tiny-moe", "data.seq_length=4096", f"train.recompute={mode}",
                         "train.micro_batch_size=1", "model.decoder.max_position_embeddings=4096")
        plan = decoder_stage_bytes(config, range(4), True, True)
        kept[mode] = plan.layers + plan.recompute_peak
    assert kept["full"] < kept["selective"] < kept["none"]


def _vision(px, images, dtype, mode, *extra):
    config = _config("tiny-mm1-moe", f"model.vision.image_size={px}", "model.vision.width=32",
                     "model.vision.num_heads=2", "model.vision.mlp_dim=64",
                     "model.connector.hidden_size=48", f"train.dtype={dtype}",
                     f"train.recompute={mode}", *extra)
    initialize(config)
    try:
        (model,) = build_model_chunks(config, on_cpu=True)
        vit_layers = [m for m in model.vision_model.modules() if isinstance(m, TransformerLayer)]
        pixels = torch.randn(images, 3, px, px, generator=torch.Generator().manual_seed(0))
        with SavedBytes(model, {"vit": [model.vision_model], "connector": [model.connector]}) as s:
            out = model.image_embeddings(pixels)
            if mode == "full":
                s.backward(out.float().sum(), vit_layers)
        return config, s
    finally:
        shutdown()


@pytest.mark.parametrize("px,images,dtype,mode,extra", [
    (448, 2, "fp32", "none", ("model.connector.num_tokens=64",)),  # 1,025 tokens per image
    (448, 2, "bf16", "selective", ("model.connector.num_tokens=64",)),
    (448, 1, "bf16", "full", ("model.connector.num_tokens=144",)),
    (224, 3, "fp32", "none", ("model.connector.depth=2", "model.connector.num_tokens=16")),
    (224, 2, "bf16", "none", ("model.connector.type=attn_pool", "model.connector.num_tokens=16")),
    (224, 2, "fp32", "none", ("model.connector.type=avg_pool", "model.connector.num_tokens=16",
                              "model.vision.activation=gelu")),
])
def test_vit_and_connector_as_planned(px, images, dtype, mode, extra):
    config, saved = _vision(px, images, dtype, mode, *extra)
    plan = vision_bytes(config, images)
    _close(saved.forward["vit"] + saved.forward["connector"],
           plan.layers + plan.embedding_and_loss, "ViT + connector")
    if mode == "full":
        assert len(saved.rerun_groups) == config.model.vision.depth
        _close(saved.rerun_peak, plan.recompute_peak, "one ViT layer rerun")


def test_info_reports_recompute_and_dtype_terms():
    """``memory_per_gpu`` moves with train.recompute and train.dtype as the formulas do."""
    base = _config("mm1-7b-moe")
    out = {}
    for mode in ("none", "selective", "full"):
        for dtype in ("bf16", "fp32"):
            cfg = _config("mm1-7b-moe", f"train.recompute={mode}", f"train.dtype={dtype}")
            out[mode, dtype] = memory_per_gpu(cfg, tp=1, pp=1, ep=8, dp=8)
    assert base.train.dtype == "bf16"
    for mode in ("none", "selective"):
        assert out[mode, "fp32"].activations > out[mode, "bf16"].activations
    assert out["full", "bf16"].activations < out["selective", "bf16"].activations \
        < out["none", "bf16"].activations
    assert out["full", "bf16"].recompute_peak > 0 == out["none", "bf16"].recompute_peak
