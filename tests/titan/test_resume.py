"""Resume compatibility (`titan.resume`): a checkpoint records what trained it; a resume with a
different model or optimizer is refused before anything is built, naming both values."""

from pathlib import Path

import pytest

from tests.launch import TINY_CONFIG, losses, train
from titan_geonorm.checks import ConfigError
from titan_geonorm.titan.launcher import parse_config
from titan_geonorm.titan.preflight import run_preflight
from titan_geonorm.titan.resume import read_record

pytestmark = pytest.mark.distributed

RUN = ("--model.name", "llama3_periln", "--training.steps", "4", "--checkpoint.enable",
       "--checkpoint.interval", "2")


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    train(folder, *RUN)
    return folder


def preflight(dump: Path, *overrides: str) -> None:
    job_config = parse_config(["--job.config_file", str(TINY_CONFIG), "--job.dump_folder", str(dump),
                               *RUN, *overrides])
    run_preflight(job_config)


def test_each_checkpoint_holds_the_record_of_its_run(dump):
    record = read_record(str(dump / "checkpoint" / "step-4"))
    assert record["model.name"] == "llama3_periln" and record["optimizer.lr"] == 1e-2


@pytest.mark.parametrize("override, expected", [
    (("--model.name", "llama3_preln"), "model.name = 'llama3_preln', but the checkpoint"),
    (("--model.norm_type", "layernorm"), "model.norm_type = 'layernorm'"),
    (("--model.flavor", "tiny12"), "with model.flavor = 'tiny'"),
    (("--peri_ln.embedding_norm",), "peri_ln.embedding_norm = True"),
    (("--optimizer.lr", "0.003"), "torchtitan restores the optimizer's settings"),
])
def test_mismatched_resume_is_refused_naming_both_values(dump, override, expected):
    with pytest.raises(ConfigError, match="step-4") as info:
        preflight(dump, *override)
    assert expected in str(info.value)


def test_allowed_change_and_same_settings_pass(dump):
    preflight(dump)
    preflight(dump, "--model.norm_type", "layernorm",
              "--checkpoint.allow_resume_changes", "model.norm_type")
    with pytest.raises(ConfigError, match="checkpoint.allow_resume_changes"):
        preflight(dump, "--checkpoint.allow_resume_changes", "optimizer.lr")


def test_resume_with_the_same_settings_trains_on(dump):
    train(dump, *RUN[:2], "--training.steps", "6", *RUN[4:])
    assert len(losses(dump)) == 6  # steps 1-4, then 5-6 after the resume
