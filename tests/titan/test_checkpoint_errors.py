"""Checkpoint errors name the step folder and the file, and say what to do: a damaged checkpoint is
refused before anything is built, a full disk during a save is reported as such, and a checkpoint
is exported only as the model it trained.

Checkpoints here are small DCP folders written in-process, laid out as torchtitan's
(`<dump>/checkpoint/step-N`) and holding a run record (`titan.resume`) where a test needs one.
"""

import errno
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager

from tests.launch import TINY_CONFIG, cli, trainer_args
from titan_geonorm.export.load import (
    check_trained_as,
    load_checkpoint,
    load_job_config,
    save_checkpoint,
)
from titan_geonorm.titan.launcher import parse_config
from titan_geonorm.titan.patches import CheckpointError
from titan_geonorm.titan.preflight import run_preflight
from titan_geonorm.titan.resume import RECORD_KEY, CheckpointDamaged, run_record


def write_step(dump: Path, step: int, overrides: tuple[str, ...] = ()) -> Path:
    """`dump/checkpoint/step-N` with one tensor and the record of tiny.toml + `overrides`."""
    path = dump / "checkpoint" / f"step-{step}"
    record = run_record(load_job_config(TINY_CONFIG, list(overrides)))
    save_checkpoint({"w": torch.arange(4096.0), RECORD_KEY: {"json": json.dumps(record, sort_keys=True)}}, path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def preflight(dump: Path, *overrides: str) -> None:
    run_preflight(
        parse_config(
            ["--job.config_file", str(TINY_CONFIG), "--job.dump_folder", str(dump), "--checkpoint.enable", *overrides]
        )
    )


@pytest.fixture
def dump(tmp_path) -> Path:
    write_step(tmp_path, 2)
    write_step(tmp_path, 4)
    return tmp_path


def test_truncated_shard_fails_bare_inside_dcp(dump):
    """Why the check exists: DCP's own load gives an EOFError that names no file."""
    shard = dump / "checkpoint" / "step-4" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.empty(4096)}, checkpoint_id=str(shard.parent), no_dist=True)
    assert "EOFError" in str(info.value) and "__0_0.distcp" not in str(info.value)


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        ("truncate-shard", "__0_0.distcp", "is truncated or unreadable (1000 bytes, the metadata expects"),
        ("delete-shard", "__0_0.distcp", "is missing"),
        ("truncate-metadata", ".metadata", "is truncated or unreadable ("),
    ],
)
def test_damaged_checkpoint_is_refused_naming_folder_and_file(dump, damage, file, problem):
    step4 = dump / "checkpoint" / "step-4"
    target = step4 / file
    if damage == "delete-shard":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: 1000 if file != ".metadata" else 100])
    before = snapshot(dump)
    with pytest.raises(CheckpointDamaged) as info:
        preflight(dump)
    assert str(info.value).startswith(f"checkpoint {step4}: {file} {problem}")
    assert ("delete the folder to resume from the previous step (step-2), or set checkpoint.load_step") in str(
        info.value
    )
    assert snapshot(dump) == before  # nothing deleted or rewritten
    preflight(dump, "--checkpoint.load_step", "2")  # the way out the message names


def test_load_step_of_an_unfinished_save_is_refused(dump):
    (dump / "checkpoint" / "step-4" / ".metadata").unlink()
    with pytest.raises(
        CheckpointDamaged,
        match=r"step-4: \.metadata is missing \(the save of this "
        r"step did not finish\); delete the folder .*\(step-2\)",
    ):
        preflight(dump, "--checkpoint.load_step", "4")
    preflight(dump)  # without load_step torchtitan takes step-2, the newest complete one


def test_launcher_refuses_a_truncated_shard_before_any_compute(dump):
    shard = dump / "checkpoint" / "step-4" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = snapshot(dump)
    proc = cli(
        "titan_geonorm.train",
        *trainer_args(dump),
        "--checkpoint.enable",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"titan_geonorm: checkpoint {shard.parent}: __0_0.distcp is truncated" in proc.stderr
    assert snapshot(dump) == before and not (dump / "metrics.jsonl").exists()


def test_export_of_a_truncated_shard_names_the_file(dump):
    shard = dump / "checkpoint" / "step-4" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {re.escape(str(shard.parent))}: __0_0.distcp is truncated or "
        r"unreadable \(1000 bytes, .*: export another step",
    ):
        load_checkpoint(shard.parent, {"w": torch.Size([4096])})
    assert load_checkpoint(dump / "checkpoint" / "step-2", {"w": torch.Size([4096])})["w"].equal(torch.arange(4096.0))


# Disk full during a save (patch 0007): the writer fails as torch's does on a full disk.
DISK_FULL = {
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
    "enforce-fail": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4310"),
}


def _save(checkpoint_id: Path, dcp_save=CheckpointManager.dcp_save) -> None:
    manager = object.__new__(CheckpointManager)  # dcp_save reads no attribute for a plain sync save
    dcp_save(manager, {"w": torch.arange(4096.0)}, checkpoint_id=str(checkpoint_id), async_mode=AsyncMode.DISABLED)


@pytest.mark.parametrize("error", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_disk_full_during_save_names_the_folder_and_keeps_earlier_checkpoints(dump, monkeypatch, error):
    write_item = filesystem._write_item

    def write_then_fail(*args, **kwargs):
        write_item(*args, **kwargs)
        raise error

    monkeypatch.setattr(filesystem, "_write_item", write_then_fail)
    before = snapshot(dump / "checkpoint" / "step-4")
    step6 = dump / "checkpoint" / "step-6"
    with pytest.raises(CheckpointError) as info:
        _save(step6)
    message = str(info.value)
    assert message.startswith(f"checkpoint {step6}: the disk is full (")
    assert str(error) in message and "MiB free" in message
    assert f"the newest complete one, {dump / 'checkpoint' / 'step-4'}, is intact" in message
    assert not (step6 / ".metadata").exists()
    assert snapshot(dump / "checkpoint" / "step-4") == before

    # Stock torchtitan: DCP's wrapper, naming neither the folder nor the full disk.
    with pytest.raises(CheckpointException) as stock:
        _save(dump / "checkpoint" / "step-8", CheckpointManager.dcp_save.__wrapped__)
    assert "step-8" not in str(stock.value) and "disk is full" not in str(stock.value)


def test_other_save_errors_pass_unchanged(dump, monkeypatch):
    def fail(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(filesystem, "_write_item", fail)
    with pytest.raises(CheckpointException, match="Permission denied"):
        _save(dump / "checkpoint" / "step-6")


# Export refuses a checkpoint of another model (`check_trained_as`, same rule as resume).
PRELN = ("--model.name", "llama3_preln")


def test_export_as_another_model_is_refused_naming_both_values(tmp_path):
    path = write_step(tmp_path, 4, PRELN)
    check_trained_as(load_job_config(TINY_CONFIG, list(PRELN)), path)
    for overrides, expected in [
        (
            ("--model.norm_type", "layernorm"),
            (f"model.norm_type = 'layernorm', but the checkpoint {path} was trained with model.norm_type = 'rmsnorm'"),
        ),
        (("--model.flavor", "tiny12"), "model.flavor = 'tiny12', but the checkpoint"),
        (("--model.name", "llama3_periln"), "was trained with model.name = 'llama3_preln'"),
    ]:
        with pytest.raises(ValueError) as info:
            check_trained_as(load_job_config(TINY_CONFIG, [*PRELN, *overrides]), path)
        assert expected in str(info.value)
    # The optimizer does not matter to an export.
    check_trained_as(load_job_config(TINY_CONFIG, [*PRELN, "--optimizer.lr", "0.5"]), path)


def test_export_cli_refuses_layernorm_export_of_rmsnorm_checkpoint(tmp_path):
    path = write_step(tmp_path, 4, PRELN)
    out = tmp_path / "hf"
    proc = cli(
        "titan_geonorm.export",
        "--config",
        str(TINY_CONFIG),
        "--checkpoint",
        str(path),
        "--output",
        str(out),
        *PRELN,
        "--model.norm_type",
        "layernorm",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"error: model.norm_type = 'layernorm', but the checkpoint {path} was trained with model.norm_type = 'rmsnorm'"
    ) in proc.stderr
    assert not out.exists()
