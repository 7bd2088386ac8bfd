"""Block variants: parity of `pre` with torchtitan's llama3, the one-line formulas of post/peri/
GeoNorm, parameter names, initialization, config validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchtitan.config import ConfigManager
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import Transformer

from titan_geonorm.models.args import BlockVariant, VariantModelArgs
from titan_geonorm.models.model import VariantTransformer
from titan_geonorm.titan.preflight import check_sections

SHAPE = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, multiple_of=16)
VARIANTS = [v.value for v in BlockVariant]
NORMS = ["rmsnorm", "layernorm"]


def build(block: str, norm_type: str = "rmsnorm", seed: int = 0, **kwargs) -> VariantTransformer:
    torch.manual_seed(seed)
    model = VariantTransformer(VariantModelArgs(**SHAPE, block=block, norm_type=norm_type, **kwargs))
    with torch.no_grad():
        model.init_weights()
    return model


def perturb_gains(model: torch.nn.Module) -> None:
    """Move every 1-D parameter off its init so the tests see gains, biases and steps act."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))


def tokens(seed: int = 1, length: int = SHAPE["max_seq_len"]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (2, length), generator=generator)


def direct_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """RMSNorm or LayerNorm written out from their formulas."""
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    return out if getattr(norm, "bias", None) is None else out + norm.bias


def test_pre_gives_torchtitan_llama3_logits():
    torch.manual_seed(0)
    ref = Transformer(TransformerModelArgs(**SHAPE))
    with torch.no_grad():
        ref.init_weights()
    perturb_gains(ref)
    model = VariantTransformer(VariantModelArgs(**SHAPE, block="pre"))
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    x = tokens()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm_type", NORMS)
def test_post_block_formula(norm_type):
    model = build("post", norm_type, norm_bias=True)
    perturb_gains(model)
    block, x = model.layers["1"], torch.randn(2, 16, SHAPE["dim"])
    fc = model.freqs_cis
    h = direct_norm(x + block.attention(x, fc, None), block.attention_norm)
    expected = direct_norm(h + block.feed_forward(h), block.ffn_norm)
    torch.testing.assert_close(block(x, fc, None), expected)
    assert model.norm is None


@pytest.mark.parametrize("norm_type", NORMS)
def test_peri_block_formula(norm_type):
    model = build("peri", norm_type, norm_bias=True)
    perturb_gains(model)
    block, x = model.layers["1"], torch.randn(2, 16, SHAPE["dim"])
    fc = model.freqs_cis
    h = x + direct_norm(block.attention(direct_norm(x, block.attention_norm), fc, None), block.attention_out_norm)
    expected = h + direct_norm(block.feed_forward(direct_norm(h, block.ffn_norm)), block.ffn_out_norm)
    torch.testing.assert_close(block(x, fc, None), expected)


def direct_geodesic(h: torch.Tensor, u: torch.Tensor, c: torch.Tensor, theta_max: float) -> torch.Tensor:
    r = h.norm(dim=-1, keepdim=True)
    v = u - (h * u).sum(-1, keepdim=True) / r**2 * h
    theta = torch.clamp(c * v.norm(dim=-1, keepdim=True) / r, max=theta_max)
    return torch.cos(theta) * h + torch.sin(theta) * r * v / v.norm(dim=-1, keepdim=True)


def test_geonorm_block_formula():
    model = build("geonorm", geonorm=_geonorm_cfg(attn_decay="sqrt", ffn_decay="linear"))
    perturb_gains(model)
    i = 1
    block = model.layers[str(i)]
    x = torch.nn.functional.normalize(torch.randn(2, 16, SHAPE["dim"]), dim=-1) * math.sqrt(SHAPE["dim"])
    fc, K = model.freqs_cis, 2 * SHAPE["n_layers"]
    s_attn, s_ffn = 1 / math.sqrt(2 * i + 1), (K - (2 * i + 1)) / K
    h = direct_geodesic(
        x, block.attention(block.attention_norm.weight * x, fc, None), block.attention_step.step * s_attn, math.pi / 2
    )
    expected = direct_geodesic(
        h, block.feed_forward(block.ffn_norm.weight * h), block.ffn_step.step * s_ffn, math.pi / 2
    )
    torch.testing.assert_close(block(x, fc, None), expected)


def test_geonorm_default_block_formula():
    """The shipped default: Pre-LN's norm ||h + u||, the direction turned by
    theta = clamp(s(l) (a min(|v|/|h|, pi/4) + b), pi/4) with s(l) = 1/(l+1) for both sublayers.
    In float64: the bias turns the state by a finite angle towards v/|v| however small v is, and
    fp32 rounding of v then shows at ~1e-5."""
    model = build("geonorm")
    perturb_gains(model)
    for p in model.parameters():
        p.data = p.data.double()
    i = 1
    block, x = model.layers[str(i)], 3.0 * torch.randn(2, 16, SHAPE["dim"], dtype=torch.float64)
    fc, s = model.freqs_cis, 1 / (i + 1)

    def step(h, u, sub):
        v = u - (h * u).sum(-1, keepdim=True) / h.pow(2).sum(-1, keepdim=True) * h
        base = (v.norm(dim=-1, keepdim=True) / h.norm(dim=-1, keepdim=True)).clamp(max=math.pi / 4)
        theta = (s * (sub.step * base + sub.bias)).clamp(-math.pi / 4, math.pi / 4)
        unit = torch.cos(theta) * h / h.norm(dim=-1, keepdim=True) + torch.sin(theta) * v / v.norm(dim=-1, keepdim=True)
        return (h + u).norm(dim=-1, keepdim=True) * unit

    h = step(x, block.attention(direct_norm(x, block.attention_norm), fc, None), block.attention_step)
    expected = step(h, block.feed_forward(direct_norm(h, block.ffn_norm)), block.ffn_step)
    torch.testing.assert_close(block(x, fc, None), expected)


# DESIGN.md's first reconstruction (states on the sphere of radius sqrt(d)), which the formulas
# above write out; the shipped defaults are the Pre-Norm radius with the paper's decay.
SPHERE = dict(
    radius="sphere",
    attn_decay="none",
    ffn_decay="none",
    decay_index="sublayer",
    learnable_bias=False,
    theta_base_max=math.inf,
    theta_max=math.pi / 2,
)


def _geonorm_cfg(**kwargs):
    from titan_geonorm.models.config import GeoNormConfig

    return GeoNormConfig(**{**SPHERE, **kwargs})


@pytest.mark.parametrize("norm_type", NORMS)
def test_geonorm_states_stay_on_the_sphere(norm_type):
    model = build("geonorm", norm_type, norm_bias=True, geonorm=_geonorm_cfg())
    perturb_gains(model)
    states = []
    for layer in model.layers.values():
        layer.register_forward_hook(lambda m, args, out: states.append(out.detach()))
    model(tokens())
    r = math.sqrt(SHAPE["dim"])
    for h in states:
        assert (h.norm(dim=-1) / r - 1).abs().max() < 1e-5
        if norm_type == "layernorm":  # LayerNorm's geometry: the mean-zero sphere
            assert h.mean(-1).abs().max() < 1e-5
    emb = model.tok_embeddings.weight
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((SHAPE["vocab_size"],), r))


EXTRA_NAMES = {
    "pre": set(),
    "post": set(),
    "peri": {"layers.0.attention_out_norm.weight", "layers.0.ffn_out_norm.weight", "emb_norm.weight"},
    "geonorm": {
        "layers.0.attention_step.step",
        "layers.0.ffn_step.step",
        "layers.0.attention_step.bias",
        "layers.0.ffn_step.bias",
    },
    "ngpt": {
        f"layers.0.{n}"
        for n in (
            "attention.wq.scale",
            "attention.wk.scale",
            "attention_update.alpha",
            "feed_forward.w1.scale",
            "feed_forward.w3.scale",
            "ffn_update.alpha",
        )
    },
}
# nGPT normalizes without norm layers; its `norm` is the logit scale s_z.
MISSING_NAMES = {
    "post": {"norm.weight"},
    "ngpt": {"norm.weight", *(f"layers.{i}.{n}_norm.weight" for i in range(3) for n in ("attention", "ffn"))},
}


@pytest.mark.parametrize("block", VARIANTS)
def test_parameter_names(block):
    names = {n for n, _ in build(block, embedding_norm=True).named_parameters()}
    llama = {n for n, _ in Transformer(TransformerModelArgs(**SHAPE)).named_parameters()}
    assert llama - names == MISSING_NAMES.get(block, set())
    assert {n for n in names - llama if n.startswith(("emb_norm", "layers.0."))} == EXTRA_NAMES[block]
    fixed = build(block, geonorm=_geonorm_cfg(learnable_step=False))
    assert not any(n.endswith("_step.step") for n, _ in fixed.named_parameters())


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("block", VARIANTS)
def test_variant_trains(block, norm_type):
    """A few AdamW steps on one batch: finite gradients everywhere, falling loss."""
    model = build(block, norm_type, norm_bias=True, embedding_norm=block == "peri")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens()
    losses = []
    for _ in range(8):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_meta_device_init_like_torchtitan():
    """torchtitan builds on meta, materializes with to_empty, then calls init_weights."""
    args = VariantModelArgs(**SHAPE, block="geonorm")
    with torch.device("meta"):
        model = VariantTransformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    ref = VariantTransformer(args)
    torch.manual_seed(0)
    with torch.no_grad():
        ref.init_weights()
    torch.testing.assert_close(model(tokens()), ref(tokens()), rtol=0, atol=0)
    for i, layer in model.layers.items():
        assert layer.weight_init_std == pytest.approx(0.02 / math.sqrt(2 * (int(i) + 1)))
        assert layer.attention_step.step.item() == 1.0


def test_step_decays_by_sublayer_and_by_block():
    args = VariantModelArgs(**SHAPE, block="geonorm", geonorm=_geonorm_cfg(attn_decay="harmonic", ffn_decay="harmonic"))
    assert args.step_decays(1) == (pytest.approx(1 / 3), pytest.approx(1 / 4))
    args.geonorm.decay_index = "block"
    assert args.step_decays(1) == (pytest.approx(1 / 2), pytest.approx(1 / 2))


def parse(*overrides: str):
    return ConfigManager().parse_args(
        ["--job.custom_config_module", "titan_geonorm.config", "--training.seq_len", "16", *overrides]
    )


def test_update_from_config_reads_the_toml_sections():
    args = VariantModelArgs(**SHAPE, block="geonorm")
    args.update_from_config(
        parse(
            "--model.norm_type",
            "layernorm",
            "--model.norm_bias",
            "--geonorm.radius",
            "sphere",
            "--geonorm.ffn_decay",
            "sqrt",
            "--geonorm.decay_index",
            "block",
            "--geonorm.step_init",
            "0.5",
            "--geonorm.theta_max",
            "1.0",
            "--peri_ln.embedding_norm",
        )
    )
    assert (args.norm_type, args.norm_bias, args.embedding_norm) == ("layernorm", True, True)
    assert (args.geonorm.ffn_decay, args.geonorm.decay_index) == ("sqrt", "block")
    assert (args.geonorm.step_init, args.geonorm.theta_max) == (0.5, 1.0)
    model = VariantTransformer(args)
    assert model.layers["2"].ffn_step.decay == pytest.approx(1 / math.sqrt(3))
    assert model.layers["2"].ffn_step.center and model.norm.bias is not None


@pytest.mark.parametrize(
    "override, key",
    [
        (("--model.norm_type", "batchnorm"), "model.norm_type"),
        (("--geonorm.attn_decay", "cosine"), "geonorm.attn_decay"),
        (("--geonorm.ffn_decay", "exp"), "geonorm.ffn_decay"),
        (("--geonorm.decay_index", "layer"), "geonorm.decay_index"),
        (("--geonorm.theta_max", "4.0"), "geonorm.theta_max"),
        (("--geonorm.theta_max", "0"), "geonorm.theta_max"),
        (("--geonorm.step_init", "inf"), "geonorm.step_init"),
    ],
)
def test_bad_values_name_the_key(override, key):
    # Each section validates itself once, in preflight (update_from_config no longer re-checks).
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_sections(parse(*override))
