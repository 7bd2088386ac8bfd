"""Export to Hugging Face: every block variant x norm type loads in transformers and reproduces the
training model's logits and greedy decoding; checkpoints of any world size export identically."""

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import TINY_CONFIG, cli
from titan_geonorm.evaluate import dcp_model
from titan_geonorm.export import export_checkpoint, export_state_dict
from titan_geonorm.export.hf import read_weights
from titan_geonorm.export.load import build_model_args, load_checkpoint, load_job_config, model_shapes
from titan_geonorm.export.mapping import block_of
from titan_geonorm.models.config import GeoNormConfig

# The third-party reading of arXiv 2601.22095, spelled out so the case does not follow the defaults.
THIRD_PARTY = GeoNormConfig(
    radius="prenorm",
    update_map="exp",
    attn_decay="harmonic",
    ffn_decay="harmonic",
    decay_index="block",
    learnable_bias=True,
    theta_base_max=math.pi / 4,
    theta_max=math.pi / 4,
)

# (block, norm_type, extra args, expected HF class)
VARIANTS = [
    ("pre", "rmsnorm", {}, "LlamaForCausalLM"),
    ("pre", "layernorm", {"norm_bias": True}, "TitanGeoNormForCausalLM"),
    ("post", "rmsnorm", {}, "TitanGeoNormForCausalLM"),
    ("post", "layernorm", {}, "TitanGeoNormForCausalLM"),
    ("peri", "rmsnorm", {}, "Glm4ForCausalLM"),
    ("peri", "rmsnorm", {"embedding_norm": True}, "TitanGeoNormForCausalLM"),
    ("peri", "layernorm", {"norm_bias": True}, "TitanGeoNormForCausalLM"),
    (
        "geonorm",
        "rmsnorm",
        {"geonorm": GeoNormConfig(radius="sphere", attn_decay="sqrt", ffn_decay="linear")},
        "TitanGeoNormForCausalLM",
    ),
    (
        "geonorm",
        "layernorm",
        {
            "norm_bias": True,
            "geonorm": GeoNormConfig(
                radius="sphere", learnable_step=False, step_init=0.7, decay_index="block", ffn_decay="harmonic"
            ),
        },
        "TitanGeoNormForCausalLM",
    ),
    pytest.param(
        "geonorm",
        "rmsnorm",
        {
            "geonorm": GeoNormConfig(
                radius="prenorm",
                update_map="exp",
                attn_decay="sqrt",
                ffn_decay="sqrt",
                decay_index="sublayer",
                learnable_bias=False,
                theta_base_max=math.inf,
                theta_max=math.pi / 2,
            )
        },
        "TitanGeoNormForCausalLM",
        id="geonorm-rmsnorm-prenorm-exp-sqrt",
    ),
    pytest.param(
        "geonorm",
        "rmsnorm",
        {"geonorm": THIRD_PARTY},
        "TitanGeoNormForCausalLM",
        id="geonorm-rmsnorm-prenorm-third-party",
    ),
    pytest.param(
        "geonorm",
        "layernorm",
        {
            "norm_bias": True,
            "geonorm": GeoNormConfig(
                radius="prenorm",
                update_map="retraction",
                attn_decay="linear",
                ffn_decay="none",
                learnable_bias=True,
                theta_base_max=1.0,
                theta_max=math.pi / 3,
            ),
        },
        "TitanGeoNormForCausalLM",
        id="geonorm-layernorm-prenorm-retraction",
    ),
    ("ngpt", "rmsnorm", {}, "TitanGeoNormForCausalLM"),
]


def load_hf(folder: Path):
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()


def assert_greedy(model, generated: torch.Tensor, n_prompt: int, tol: float = 1e-4) -> None:
    """Every token `generate()` chose is the training model's argmax for the same prefix, up to
    ties within the logit tolerance (random tiny weights give near-ties, which the KV-cached and
    the full forward may break differently; an exact sequence match would test the tie-break)."""
    with torch.no_grad():
        logits = model(generated[:, :-1])[0]
    for t in range(n_prompt, generated.shape[1]):
        row = logits[t - 1]
        gap = (row.max() - row[generated[0, t]]).item()
        assert gap <= tol, f"token {t}: generate chose a token {gap:.3g} below the argmax"


@pytest.mark.parametrize(
    "block,norm_type,extra,hf_class",
    VARIANTS,
    ids=[f"{b}-{n}-{'-'.join(e) or 'plain'}" for b, n, e, _ in (getattr(v, "values", v) for v in VARIANTS)],
)
def test_variant_logits_and_generate_match(make_variant, tokenizer_dir, tmp_path, block, norm_type, extra, hf_class):
    model, args = make_variant(block, norm_type, **extra)
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == hf_class
    custom = hf_class == "TitanGeoNormForCausalLM"
    assert (tmp_path / "modeling_titan_geonorm.py").is_file() == custom
    assert ("auto_map" in json.loads((tmp_path / "config.json").read_text())) == custom

    tokens = torch.randint(2, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"max |dlogit| = {diff:.3g}"

    prompt = tokens[:1, :4]
    generated = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert_greedy(model, generated, prompt.shape[1])


@pytest.mark.parametrize(
    "geonorm, base_max",
    [(THIRD_PARTY, math.pi / 4), (GeoNormConfig(radius="sphere", theta_base_max=math.inf), None)],
    ids=["third-party", "sphere-unclamped"],
)
def test_config_json_carries_every_geonorm_key(make_variant, tokenizer_dir, tmp_path, geonorm, base_max):
    """Each `[geonorm]` key as `geonorm_<key>` (inf as null), and the modeling file builds what
    they say: real norms and no sphere projection for the Pre-Norm radius, gains on the sphere."""
    model, args = make_variant("geonorm", geonorm=geonorm)
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in (
        "radius",
        "update_map",
        "attn_decay",
        "ffn_decay",
        "decay_index",
        "learnable_bias",
        "learnable_step",
        "step_init",
        "theta_max",
    ):
        assert config[f"geonorm_{key}"] == getattr(geonorm, key), key
    assert config["geonorm_theta_base_max"] == base_max
    assert config["geonorm_step_decays"] == [list(args.step_decays(i)) for i in range(args.n_layers)]
    hf = load_hf(tmp_path)
    block = hf.model.layers[0]
    prenorm = geonorm.radius == "prenorm"
    assert isinstance(block.attention_norm, torch.nn.RMSNorm) == prenorm
    assert isinstance(hf.model.norm, torch.nn.RMSNorm) == prenorm
    assert (block.attention_step.bias is not None) == geonorm.learnable_bias
    torch.testing.assert_close(hf.model.layers[1].ffn_step.bias, model.layers["1"].ffn_step.bias)


@pytest.mark.parametrize("block", ["post", "geonorm", "ngpt"])
def test_kv_cache_steps_equal_full_forward(make_variant, tokenizer_dir, tmp_path, block):
    """Decoding token by token from the DynamicCache gives the logits of one full forward."""
    model, args = make_variant(block)
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir)
    hf = load_hf(tmp_path)
    tokens = torch.randint(2, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = hf(tokens, use_cache=False).logits
        out = hf(tokens[:, :8], use_cache=True)
        steps = [out.logits[:, -1]]
        for i in range(8, 12):
            out = hf(tokens[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    assert out.past_key_values.get_seq_length() == 12
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", ["peri", "geonorm"])
def test_generate_decodes_from_its_cache(make_variant, tokenizer_dir, tmp_path, block):
    """Each step's logits in `generate()` are the full forward's of the same prefix: the modeling
    file reads the cache under the name transformers passes it (`cache` from transformers 5 on)."""
    model, args = make_variant(block, embedding_norm=True)
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir)
    hf = load_hf(tmp_path)
    prompt = torch.randint(2, args.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    out = hf.generate(
        prompt,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        full = hf(out.sequences[:, :-1], use_cache=False).logits
    torch.testing.assert_close(torch.cat(out.logits), full[0, 3:], atol=1e-5, rtol=0)


def test_bfloat16_sharded_export(make_variant, tokenizer_dir, tmp_path):
    model, args = make_variant("geonorm")
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir, dtype="bfloat16", max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(read_weights(tmp_path))
    with safe_open(str(tmp_path / shards[0]), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    tokens = torch.randint(2, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, logits = model(tokens), hf(tokens).logits.float()
    # bf16 weights and activations: about 3 significant digits.
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()


def test_exported_tokenizer_is_the_training_tokenizer(make_variant, tokenizer_dir, tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    model, args = make_variant("peri")
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir)
    text = "def f(x):\n    return x ** 2  # squares, naïvely\n"
    trained = HuggingFaceTokenizer(str(tokenizer_dir))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf_tok.encode(text, add_special_tokens=False) == trained.encode(text, add_bos=False, add_eos=False)
    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (trained.bos_id, trained.eos_id)
    assert generation["eos_token_id"] == trained.eos_id


def test_refuses_unknown_variant_and_dtype(make_variant, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="sandwich"):
        block_of(SimpleNamespace(block="sandwich"))
    model, args = make_variant("pre")
    with pytest.raises(ValueError, match="--dtype"):
        export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir, dtype="float16")


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return cli("titan_geonorm.export", *args)


def test_trained_run_exports_with_matching_logits(trained, tmp_path):
    """CLI export of a checkpoint trained under torchrun reproduces the training model."""
    checkpoint = trained / "checkpoint" / "step-4"
    proc = export_cli("--config", str(TINY_CONFIG), "--checkpoint", str(checkpoint), "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = dcp_model(load_job_config(TINY_CONFIG), checkpoint)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(2, 2048, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4
    prompt = tokens[:1, :4]
    generated = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert_greedy(model, generated, prompt.shape[1])


def test_fsdp_checkpoint_exports_like_single_rank(seed, fsdp_seed_weights, tmp_path):
    """The seed's weights saved by 1 rank and re-saved sharded by FSDP on 2 ranks export to the
    same bytes."""
    sharded = fsdp_seed_weights / "checkpoint" / "step-1"
    metadata = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    assert len(metadata["layers.0.attention.wq.weight"].chunks) == 2, "not saved sharded"
    outputs = [tmp_path / "one", tmp_path / "two"]
    export_checkpoint(TINY_CONFIG, seed / "checkpoint" / "step-0", outputs[0])
    export_checkpoint(TINY_CONFIG, sharded, outputs[1])
    files = sorted(p.name for p in outputs[0].iterdir())
    assert files == sorted(p.name for p in outputs[1].iterdir())
    for name in files:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_cli_refuses_checkpoint_config_mismatch(seed, tmp_path):
    checkpoint = seed / "checkpoint" / "step-0"
    proc = export_cli(
        "--config",
        str(TINY_CONFIG),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "a"),
        "--model.flavor",
        "tiny12",
    )
    assert proc.returncode == 2
    assert "model.flavor = 'tiny12', but the checkpoint" in proc.stderr and "model.flavor = 'tiny'" in proc.stderr
    # A checkpoint without a run record (imported, model-only) is still checked by its shapes.
    model_cls, args = build_model_args(load_job_config(TINY_CONFIG, ["--model.flavor", "tiny12"]))
    with pytest.raises(ValueError, match="lacks weight 'layers.4."):
        load_checkpoint(checkpoint, model_shapes(model_cls, args))
    with pytest.raises(FileNotFoundError, match="not a DCP checkpoint"):
        export_checkpoint(TINY_CONFIG, seed / "checkpoint", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "block,extra,hf_class",
    [
        ("pre", {}, "LlamaForCausalLM"),
        ("peri", {}, "Glm4ForCausalLM"),
        ("peri", {"embedding_norm": True}, "TitanGeoNormForCausalLM"),
        ("geonorm", {"geonorm": GeoNormConfig(theta_base_max=math.inf)}, "TitanGeoNormForCausalLM"),
    ],
    ids=["llama", "glm4", "custom", "custom-geonorm"],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_config_json_is_what_save_pretrained_writes(
    make_variant, tokenizer_dir, tmp_path, block, extra, hf_class, dtype
):
    """Serving engines pick the class from `architectures`; nothing transformers would write (nor
    any value of it) may be missing from the exported config.json."""
    model, args = make_variant(block, **extra)
    export_state_dict(model.state_dict(), args, tmp_path / "export", tokenizer_dir, dtype=dtype)
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architectures"] == [hf_class] and exported["dtype"] == dtype

    load_hf(tmp_path / "export").save_pretrained(str(tmp_path / "resaved"))
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert sorted(set(resaved) - set(exported)) == []
    assert {k: (exported[k], v) for k, v in resaved.items() if exported[k] != v} == {}
