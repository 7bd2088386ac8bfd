"""Exports are atomic and never mix: a non-empty output folder is refused unless `--overwrite`,
which replaces it whole; an export that fails midway leaves the target as it was."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.launch import TINY_CONFIG, cli
from titan_geonorm.evaluate import dcp_model
from titan_geonorm.export import export_checkpoint, export_state_dict, import_to_dcp
from titan_geonorm.export import hf as hf_module
from titan_geonorm.export.hf import read_weights
from titan_geonorm.export.load import load_job_config


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def test_reexport_sharded_into_single_file_folder(seed, trained, tmp_path):
    """The issue's case: step A as one file, then step B sharded into the same folder."""
    out = tmp_path / "hf"
    export_checkpoint(TINY_CONFIG, seed / "checkpoint" / "step-0", out)
    assert (out / "model.safetensors").is_file()
    (out / "notes.md").write_text("the user's own file\n")
    before = snapshot(out)

    step4 = trained / "checkpoint" / "step-4"
    with pytest.raises(ValueError, match=r"--output .*hf is not empty .*--overwrite"):
        export_checkpoint(TINY_CONFIG, step4, out, max_shard_size="500KB")
    assert snapshot(out) == before

    export_checkpoint(TINY_CONFIG, step4, out, max_shard_size="500KB", overwrite=True)
    export_checkpoint(TINY_CONFIG, step4, tmp_path / "fresh", max_shard_size="500KB")
    assert snapshot(out) == snapshot(tmp_path / "fresh")
    assert "model.safetensors" not in snapshot(out) and "notes.md" not in snapshot(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert siblings(out) == ["fresh"], "temporary folders left behind"

    # transformers loads step 4's weights, not the seed's (the issue's stale model.safetensors).
    model = dcp_model(load_job_config(TINY_CONFIG), step4)
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).model.embed_tokens.weight
    assert loaded.equal(model.tok_embeddings.weight)
    assert not loaded.equal(
        dcp_model(load_job_config(TINY_CONFIG), seed / "checkpoint" / "step-0").tok_embeddings.weight
    )


def test_cli_refuses_non_empty_output_before_reading(seed, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    proc = cli(
        "titan_geonorm.export",
        "--config",
        str(TINY_CONFIG),
        "--checkpoint",
        str(tmp_path / "no-such-checkpoint"),
        "--output",
        str(out),
        timeout=300,
    )
    # Refused on the output before the (missing) checkpoint is even looked at.
    assert proc.returncode == 2
    assert "is not empty (1 entries: config.json)" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "config.json").read_text() == '{"mine": true}\n'


def test_output_holding_the_input_is_refused(seed, tmp_path):
    checkpoint = seed / "checkpoint" / "step-0"
    with pytest.raises(ValueError, match="is or holds the input"):
        export_checkpoint(TINY_CONFIG, checkpoint, seed, overwrite=True)
    assert (checkpoint / ".metadata").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_checkpoint(TINY_CONFIG, checkpoint, tmp_path / "file")


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_export_leaves_no_half_folder(make_variant, tokenizer_dir, tmp_path, monkeypatch, error):
    model, args = make_variant("geonorm")
    real_save = hf_module.save_file
    written = []

    def save_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        written.append(filename)
        if len(written) == 2:
            raise error

    monkeypatch.setattr(hf_module, "save_file", save_then_fail)
    new = tmp_path / "new"
    with pytest.raises(type(error)):
        export_state_dict(model.state_dict(), args, new, tokenizer_dir, max_shard_size="100KB")
    assert len(written) == 2 and not new.exists()

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("kept")
    written.clear()
    with pytest.raises(type(error)):
        export_state_dict(model.state_dict(), args, old, tokenizer_dir, max_shard_size="100KB", overwrite=True)
    assert snapshot(old) == {"keep.txt": b"kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "temporary folders left behind"


def test_to_dcp_output_is_guarded_too(tmp_path, trained):
    hf = tmp_path / "hf"
    export_checkpoint(TINY_CONFIG, trained / "checkpoint" / "step-4", hf)
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / "stale.distcp").write_bytes(b"\0")
    with pytest.raises(ValueError, match="--overwrite"):
        import_to_dcp(TINY_CONFIG, hf, dcp)
    import_to_dcp(TINY_CONFIG, hf, dcp, overwrite=True)
    assert "stale.distcp" not in snapshot(dcp) and (dcp / ".metadata").is_file()
    model = dcp_model(load_job_config(TINY_CONFIG), dcp)
    assert torch.equal(model.tok_embeddings.weight, read_weights(hf)["model.embed_tokens.weight"])
