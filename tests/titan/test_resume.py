"""Resume compatibility (`titan.resume`): a checkpoint records what trained it; a resume with a
different model or optimizer is refused before anything is built, naming both values, unless
`checkpoint.allow_resume_changes` lists the key (a new lr or weight decay is then applied)."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torchtitan.components.lr_scheduler import build_lr_schedulers

from tests.launch import TINY_CONFIG, losses, train
from titan_geonorm.checks import ConfigError
from titan_geonorm.titan.launcher import parse_config
from titan_geonorm.titan.metrics import read_metrics
from titan_geonorm.titan.preflight import run_preflight
from titan_geonorm.titan.resume import read_record

pytestmark = pytest.mark.distributed

RUN = ("--model.name", "llama3_periln", "--training.steps", "4", "--checkpoint.enable", "--checkpoint.interval", "2")


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    train(folder, *RUN)
    return folder


def preflight(dump: Path, *overrides: str) -> None:
    job_config = parse_config(["--job.config_file", str(TINY_CONFIG), "--job.dump_folder", str(dump), *RUN, *overrides])
    run_preflight(job_config)


def test_each_checkpoint_holds_the_record_of_its_run(dump):
    record = read_record(str(dump / "checkpoint" / "step-4"))
    assert record["model.name"] == "llama3_periln" and record["optimizer.lr"] == 1e-2


@pytest.mark.parametrize(
    "override, expected",
    [
        (("--model.name", "llama3_preln"), "model.name = 'llama3_preln', but the checkpoint"),
        (("--model.norm_type", "layernorm"), "model.norm_type = 'layernorm'"),
        (("--model.flavor", "tiny12"), "with model.flavor = 'tiny'"),
        (("--peri_ln.embedding_norm",), "peri_ln.embedding_norm = True"),
        (("--optimizer.lr", "0.003"), "optimizer.lr = 0.003, but the checkpoint"),
        (
            ("--optimizer.lr", "0.003"),
            (
                "with optimizer.lr = 0.01: use the checkpoint's value, or "
                'checkpoint.allow_resume_changes = ["optimizer.lr"] to apply'
            ),
        ),
        (("--optimizer.weight_decay", "0.5"), "with optimizer.weight_decay = 0.1"),
        (("--optimizer.name", "Adam"), "optimizer.name = 'Adam', but the checkpoint"),
        (("--optimizer.name", "Adam"), "optimizer.name cannot change on resume"),
    ],
)
def test_mismatched_resume_is_refused_naming_both_values(dump, override, expected):
    with pytest.raises(ConfigError, match="step-4") as info:
        preflight(dump, *override)
    assert expected in str(info.value)


def test_allowed_change_and_same_settings_pass(dump):
    preflight(dump)
    preflight(dump, "--model.norm_type", "layernorm", "--checkpoint.allow_resume_changes", "model.norm_type")
    preflight(dump, "--optimizer.lr", "0.003", "--checkpoint.allow_resume_changes", "optimizer.lr")
    with pytest.raises(ConfigError, match="checkpoint.allow_resume_changes .*cannot change on resume"):
        preflight(dump, "--optimizer.name", "Adam", "--checkpoint.allow_resume_changes", "optimizer.name")


def test_resume_with_the_same_settings_trains_on(dump):
    train(dump, *RUN[:2], "--training.steps", "6", *RUN[4:])
    assert len(losses(dump)) == 6  # steps 1-4, then 5-6 after the resume


def _param_groups(step: Path, key: str) -> set[float]:
    """Every value of the optimizer's param-group entry `key` saved in the checkpoint `step`."""
    names = [
        k
        for k in FileSystemReader(str(step)).read_metadata().state_dict_metadata
        if k.startswith("optimizer.param_groups.") and k.endswith(f".{key}")
    ]
    state = dict.fromkeys(names, 0.0)
    dcp.load(state, checkpoint_id=str(step), no_dist=True)
    return set(state.values())


def test_allowed_lr_and_weight_decay_change_is_applied_on_resume(dump, tmp_path):
    """Resume step 4 -> 6 with a new peak lr and weight decay: steps 5-6 log the new schedule, and
    step 6's checkpoint holds the new values (not the checkpoint's, as stock torchtitan would)."""
    run = tmp_path / "run"
    shutil.copytree(dump / "checkpoint" / "step-4", run / "checkpoint" / "step-4")
    shutil.copytree(dump / "tokenizer", run / "tokenizer")
    train(
        run,
        *RUN[:2],
        "--training.steps",
        "6",
        *RUN[4:],
        "--optimizer.lr",
        "0.003",
        "--optimizer.weight_decay",
        "0.25",
        "--checkpoint.allow_resume_changes",
        "optimizer.lr,optimizer.weight_decay",
    )
    job_config = parse_config(["--job.config_file", str(TINY_CONFIG), "--training.steps", "6"])
    schedule = build_lr_schedulers([torch.optim.SGD([torch.zeros(1)], lr=1.0)], job_config.lr_scheduler, 6)
    factors = []
    for _ in range(6):
        factors.append(schedule.schedulers[0].get_last_lr()[0])
        schedule.step()
    logged = {r["step"]: r["lr"] for r in read_metrics(str(run))}
    assert sorted(logged) == [5, 6]
    assert [logged[5], logged[6]] == pytest.approx([0.003 * factors[4], 0.003 * factors[5]], rel=1e-6)
    assert _param_groups(run / "checkpoint" / "step-6", "initial_lr") == {0.003}
    decays = sorted(_param_groups(run / "checkpoint" / "step-6", "weight_decay"))
    assert decays == [0.0, pytest.approx(0.25)]  # the 1-D parameters' group stays exempt
