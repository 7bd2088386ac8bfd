import pytest
import torch
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.routing import PRESETS, assign_geometries, clean_name


@pytest.fixture(scope="module")
def model():
    return Transformer(TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_parameter_gets_exactly_one_geometry(model, preset):
    names = [n for n, _ in model.named_parameters()]
    assignment = assign_geometries(model.named_parameters(), preset)
    assert list(assignment) == names
    attn = {
        "hetero": "stiefel",
        "hetero_inv": "dgram",
        "all_stiefel": "stiefel",
        "all_dgram": "dgram",
        "muon": "muon",
        "paper": "stiefel",
    }
    mlp = {
        "hetero": "dgram",
        "hetero_inv": "stiefel",
        "all_stiefel": "stiefel",
        "all_dgram": "dgram",
        "muon": "muon",
        "paper": "dgram",
    }
    for name, geometry in assignment.items():
        if ".attention.w" in name:
            assert geometry == attn[preset], name
        elif ".feed_forward.w" in name:
            assert geometry == mlp[preset], name
        else:  # embeddings, head, norms
            assert geometry == "adamw", name


def test_embedding_and_head_by_name_not_shape():
    # A square head shaped like wq must still go to AdamW.
    params = [
        ("output.weight", torch.nn.Parameter(torch.zeros(64, 64))),
        ("layers.0.attention.wq.weight", torch.nn.Parameter(torch.zeros(64, 64))),
    ]
    expected = {"output.weight": "adamw", "layers.0.attention.wq.weight": "stiefel"}
    assert assign_geometries(params, "hetero") == expected


def test_wrapper_prefixes_are_removed():
    raw = "_orig_mod.layers.0._checkpoint_wrapped_module._fsdp_wrapped_module.feed_forward.w2.weight"
    assert clean_name(raw) == "layers.0.feed_forward.w2.weight"
    params = [(raw, torch.nn.Parameter(torch.zeros(4, 8)))]
    assert assign_geometries(params, "hetero") == {"layers.0.feed_forward.w2.weight": "dgram"}


def test_user_rules_first_match_wins(model):
    rules = [r"layers\.1\.attention\.wo=muon", r"attention=adamw", r"layers\.0\.feed_forward\.w2=stiefel"]
    a = assign_geometries(model.named_parameters(), "hetero", rules)
    assert a["layers.1.attention.wo.weight"] == "muon"
    assert a["layers.1.attention.wq.weight"] == "adamw"
    assert a["layers.0.feed_forward.w2.weight"] == "stiefel"
    assert a["layers.0.feed_forward.w1.weight"] == "dgram"


def test_refusals_name_the_culprit():
    gain = [("layers.0.attention_norm.weight", torch.nn.Parameter(torch.ones(8)))]
    with pytest.raises(ValueError, match=r"layers\.0\.attention_norm\.weight.*2-D"):
        assign_geometries(gain, "hetero", [r"norm=stiefel"])
    with pytest.raises(ValueError, match=r"preset.*'fancy'"):
        assign_geometries(gain, "fancy")
    with pytest.raises(ValueError, match=r"rules.*'wq=sphere'.*unknown geometry"):
        assign_geometries(gain, "hetero", ["wq=sphere"])
    with pytest.raises(ValueError, match=r"rules.*'nogeometry'.*regex=geometry"):
        assign_geometries(gain, "hetero", ["nogeometry"])
    with pytest.raises(ValueError, match=r"rules.*'\(unclosed=muon'.*invalid regex"):
        assign_geometries(gain, "hetero", ["(unclosed=muon"])


@pytest.mark.parametrize(
    "key,value",
    [
        ("preset", "x"),
        ("dual_alpha", 0.0),
        ("momentum", 1.0),
        ("msign_steps", 0),
        ("muon_scale", "rms"),
        ("msign_method", "svd"),
        ("dgram_retraction", "qr"),
        ("dual_tol", -1.0),
        ("msign_dtype", "fp8"),
        ("stiefel_solver", "newton"),
        ("dgram_solver", "exact"),
        ("momentum_style", "adam"),
        ("dual_iterate", "first"),
        ("dgram_init", "qr"),
        ("stiefel_retraction", "cayley"),
        ("closed_form_steps", 0),
        ("closed_form_scale", "spectral"),
        ("closed_form_lower", 1.0),
        ("closed_form_lower", -1e-3),
        ("warm_start", "yes"),
    ],
)
def test_config_validate_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf"optimizer\.manifold_muon\.{key}"):
        ManifoldMuonConfig(**{key: value}).validate()
