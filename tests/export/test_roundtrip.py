"""HF -> DCP -> HF is bit-identical for the stock targets (Llama, Glm4) and the shipped modeling
file, and import refuses a folder that does not match the configured model."""

import dataclasses
import math
from pathlib import Path

import pytest

from tests.export.test_export import THIRD_PARTY
from tests.launch import TINY_CONFIG, cli
from titan_geonorm.export import export_checkpoint, export_state_dict, import_state_dict
from titan_geonorm.export.load import checkpoint_tensors, load_checkpoint, save_checkpoint
from titan_geonorm.models.model import VariantTransformer


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize(
    "block, extra",
    [("pre", {}), ("peri", {}), ("geonorm", {"geonorm": THIRD_PARTY})],
    ids=["llama", "glm4", "custom-geonorm-prenorm"],
)
def test_round_trip_bit_identical(make_variant, tokenizer_dir, tmp_path, block, extra):
    model, args = make_variant(block, **extra)
    export_state_dict(model.state_dict(), args, tmp_path / "hf", tokenizer_dir)
    state_dict = import_state_dict(tmp_path / "hf", VariantTransformer, args)
    save_checkpoint(state_dict, tmp_path / "dcp")
    reloaded = load_checkpoint(tmp_path / "dcp", {k: v.shape for k, v in model.state_dict().items()})
    for key, value in model.state_dict().items():
        assert reloaded[key].dtype == value.dtype and reloaded[key].equal(value), key
    export_state_dict(reloaded, args, tmp_path / "again", tokenizer_dir)
    same_files(tmp_path / "hf", tmp_path / "again")


def test_import_refuses_other_variant_and_shapes(make_variant, tokenizer_dir, tmp_path):
    model, args = make_variant("peri")
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir)
    _, pre_args = make_variant("pre")
    with pytest.raises(ValueError, match="'glm4' model"):
        import_state_dict(tmp_path, VariantTransformer, pre_args)
    _, wider = make_variant("peri", multiple_of=512)
    with pytest.raises(ValueError, match="intermediate_size"):
        import_state_dict(tmp_path, VariantTransformer, wider)


@pytest.mark.parametrize(
    "key, value", [("radius", "sphere"), ("update_map", "retraction"), ("theta_base_max", math.inf)]
)
def test_import_refuses_other_geonorm_mode(make_variant, tokenizer_dir, tmp_path, key, value):
    """Same weight names and shapes, another [geonorm] mode: a different model."""
    model, args = make_variant("geonorm", geonorm=THIRD_PARTY)
    export_state_dict(model.state_dict(), args, tmp_path, tokenizer_dir)
    _, other = make_variant("geonorm", geonorm=dataclasses.replace(THIRD_PARTY, **{key: value}))
    with pytest.raises(ValueError, match=f"geonorm_{key}"):
        import_state_dict(tmp_path, VariantTransformer, other)


def test_cli_round_trip_of_trained_run(trained, tmp_path):
    """Export, `--to-dcp`, export again: same bytes; the DCP holds the model weights only."""
    export_checkpoint(TINY_CONFIG, trained / "checkpoint" / "step-4", tmp_path / "hf")
    proc = cli(
        "titan_geonorm.export",
        "--to-dcp",
        "--config",
        str(TINY_CONFIG),
        "--checkpoint",
        str(tmp_path / "hf"),
        "--output",
        str(tmp_path / "dcp"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained_keys = set(checkpoint_tensors(trained / "checkpoint" / "step-4"))
    assert set(checkpoint_tensors(tmp_path / "dcp")) == trained_keys
    export_checkpoint(
        TINY_CONFIG, tmp_path / "dcp", tmp_path / "again", overrides=["--model.hf_assets_path", str(tmp_path / "hf")]
    )
    same_files(tmp_path / "hf", tmp_path / "again")
