"""MM1Model on one process (PP=1): forward and backward with images, the splice order, the
placeholder-count error, text-only sequences, freezing, and coverage of every parameter by the
sharded state dict (layout-invariant init, CLIP loading). The PP=2 / TP=2 equivalence runs in
tests/distributed/test_mm1_pipeline.py."""

import copy
import os

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.config.megatron import decoder_transformer_config
from mm1_moe.info import param_counts
from mm1_moe.models.init import layout_invariant_init_
from mm1_moe.models.mm1 import MM1Model
from mm1_moe.runtime import initialize, shutdown

from _reference_models import loads_every_parameter

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
IMAGE_TOKEN = 255  # tiny vocab 256; text ids are drawn below it
V, S = 4, 24  # tiny-dense: connector num_tokens 4, images 56 x 56


@pytest.fixture(scope="module")
def config():
    config = load_config(os.path.join(CONFIGS, "tiny-dense.yaml"))
    initialize(config)
    yield config
    shutdown()


def _model(config, **freeze):
    config = copy.deepcopy(config)
    for part, frozen in freeze.items():
        getattr(config.model, part).freeze = frozen
    model = MM1Model(config, decoder_transformer_config(config, use_cpu_initialization=True),
                     image_token_id=IMAGE_TOKEN)
    layout_invariant_init_([model], config)
    return model


def _batch(images_per_sequence, seed=0):
    """Tokens [B, S] with each sequence's images as runs of V placeholders starting at 1,
    1 + (V + 2), ..."""
    g = torch.Generator().manual_seed(seed)
    B = len(images_per_sequence)
    tokens = torch.randint(0, IMAGE_TOKEN, (B, S), generator=g)
    for b, n in enumerate(images_per_sequence):
        for k in range(n):
            tokens[b, 1 + k * (V + 2):1 + k * (V + 2) + V] = IMAGE_TOKEN
    return dict(tokens=tokens, position_ids=torch.arange(S).expand(B, -1),
                labels=torch.randint(0, IMAGE_TOKEN, (B, S), generator=g),
                images=torch.randn(sum(images_per_sequence), 3, 56, 56, generator=g),
                images_per_sequence=torch.tensor(images_per_sequence))


def _loss(model, batch):
    loss_mask = (batch["tokens"] != IMAGE_TOKEN).float()  # the caller's mask: text tokens only
    per_token = model(batch["tokens"], batch["position_ids"], labels=batch["labels"],
                      images=batch["images"], images_per_sequence=batch["images_per_sequence"],
                      padding_mask=loss_mask > 0)
    assert per_token.shape == batch["tokens"].shape
    return (per_token * loss_mask).sum() / loss_mask.sum()


def _grads(model, prefix):
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]


def test_forward_backward_reaches_vit_connector_and_decoder(config):
    model = _model(config)
    _loss(model, _batch([2, 1])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {
        "vision_model", "connector", "language_model"}


@pytest.mark.parametrize("part, prefix", [("vision", "vision_model."), ("connector", "connector."),
                                          ("decoder", "language_model.")])
def test_frozen_part_gets_no_grads(config, part, prefix):
    model = _model(config, **{part: True})
    _loss(model, _batch([1, 1])).backward()
    for name, param in model.named_parameters():
        if name.startswith(prefix):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name


def test_images_land_on_their_placeholders_in_order(config):
    model = _model(config).eval()
    batch = _batch([1, 2])  # sequence 0 holds image 0; sequence 1 images 1 and 2
    with torch.no_grad():
        spliced_SBD = model.embed(batch["tokens"], batch["position_ids"], batch["images"],
                                  batch["images_per_sequence"])
        text_SBD = model.language_model.embedding(batch["tokens"], batch["position_ids"])
        image_IVD = model.project(model.encode_images(batch["images"]))
    assert image_IVD.shape == (3, V, 64)
    is_image = batch["tokens"] == IMAGE_TOKEN
    spliced, text = spliced_SBD.transpose(0, 1), text_SBD.transpose(0, 1)
    assert torch.equal(spliced[~is_image], text[~is_image])
    assert torch.equal(spliced[0, 1:1 + V], image_IVD[0])
    assert torch.equal(spliced[1, 1:1 + V], image_IVD[1])
    assert torch.equal(spliced[1, 1 + V + 2:1 + 2 * V + 2], image_IVD[2])


def test_text_only_sequences_and_batches(config):
    model = _model(config).eval()
    batch = _batch([0, 2])
    with torch.no_grad():
        assert torch.isfinite(_loss(model, batch))  # sequence 0 has no image
        text = _batch([0, 0], seed=1)
        no_images = model(text["tokens"], text["position_ids"], labels=text["labels"])
        plain = model.language_model(text["tokens"], text["position_ids"], None, labels=text["labels"])
    assert torch.equal(no_images, plain)


@pytest.mark.parametrize("change, message", [
    ("drop_one", r"sequence 1: 3 image placeholder tokens, expected 4 \(1 images x 4 tokens\)"),
    ("extra_run", r"sequence 0: 8 image placeholder tokens, expected 4 \(1 images x 4 tokens\)"),
    ("no_images", r"sequence 0: 4 image placeholder tokens, expected 0 \(0 images x 4 tokens\)"),
    ("bad_sum", r"images_per_sequence sums to 3 but 2 images are attached"),
])
def test_misaligned_placeholders_raise_naming_the_sequence(config, change, message):
    model = _model(config)
    batch = _batch([1, 1])
    if change == "drop_one":
        batch["tokens"][1, 1] = 7
    elif change == "extra_run":
        batch["tokens"][0, 10:10 + V] = IMAGE_TOKEN
    elif change == "no_images":
        batch["images"], batch["images_per_sequence"] = None, None
    else:
        batch["images_per_sequence"] = torch.tensor([2, 1])
    with pytest.raises(ValueError, match=message):
        _loss(model, batch)


def test_every_parameter_is_in_the_sharded_state_dict(config):
    """layout-invariant init and checkpoint loading write through sharded_state_dict: a
    parameter missing there would keep its NaN."""
    model = _model(config)
    loads_every_parameter(model, lambda: layout_invariant_init_([model], config))
    keys = model.sharded_state_dict().keys()
    assert "embedding.word_embeddings.weight" in keys  # decoder names as a GPTModel's
    assert "vision_model.embeddings.class_embedding" in keys
    assert "connector.pos_embed" in keys


def test_parameter_count_matches_info_formula(config):
    model = _model(config)
    counts = param_counts(config)
    by_part = {p: sum(t.numel() for n, t in model.named_parameters() if n.startswith(p))
               for p in ("vision_model.", "connector.", "language_model.")}
    assert by_part["connector."] == counts.connector
    assert by_part["language_model."] == counts.decoder_dense
    # info counts CLIP's post_layernorm (2 W), which MM1 does not hold (see models/vision.py)
    assert by_part["vision_model."] == counts.vision


def test_clip_weights_load_into_the_model_chunks(config):
    transformers = pytest.importorskip("transformers")
    from mm1_moe.interop import clip_vision_config, load_clip_vision_

    model = _model(config)
    hf = transformers.CLIPVisionModel(clip_vision_config(config)).eval()
    assert load_clip_vision_([model], hf.state_dict(), config) == 5 + 12 * config.model.vision.depth
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(images),
                                   hf(pixel_values=images).last_hidden_state[:, 1:],
                                   rtol=1e-5, atol=1e-5)


def test_layout_invariant_init_gives_the_connector_torch_default_scale(config):
    """The connector's convs and linears get torch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as a
    build without layout-invariant init leaves them; the decoder keeps Megatron's N(0, 0.02)."""
    model = _model(config)
    named = {name: p.detach() for name, p in model.named_parameters()}
    checked = 0
    for name, p in named.items():
        if not name.startswith("connector.") or p.dim() < 2 or name.endswith("pos_embed"):
            continue
        bound = 1.0 / p[0].numel() ** 0.5
        assert float(p.abs().max()) <= bound, name
        if p.numel() >= 1000:  # the std of U(-b, b) is b / sqrt(3)
            assert abs(float(p.std()) / (bound / 3 ** 0.5) - 1) < 0.1, name
        checked += 1
    assert checked >= 5
    assert abs(float(named["connector.pos_embed"].std()) - 0.02) < 0.005
    qkv = named["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert abs(float(qkv.std()) - config.model.decoder.init_std) < 0.003
