"""Bad input is refused before any compute, with a message naming the key or path."""

import pytest

from tests.launch import TINY_CONFIG, cli, trainer_args
from titan_geonorm.titan.launcher import parse_config
from titan_geonorm.titan.preflight import ConfigError, run_preflight


def check(*overrides: str, world: int = 1, config=TINY_CONFIG, monkeypatch=None):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    run_preflight(parse_config(["--job.config_file", str(config), *overrides]))


def test_good_config_passes(monkeypatch):
    check(monkeypatch=monkeypatch)
    check(
        "--parallelism.data_parallel_shard_degree",
        "2",
        "--parallelism.tensor_parallel_degree",
        "2",
        world=4,
        monkeypatch=monkeypatch,
    )


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        (["--model.name", "llama4_nope"], 1, "model.name = 'llama4_nope'"),
        (["--model.flavor", "9T"], 1, "model.flavor = '9T'"),
        (["--training.dataset", "text_files", "--training.dataset_path", "/no/such/dir"], 1, "/no/such/dir"),
        (["--training.dataset", "text_files"], 1, "training.dataset_path"),
        (
            ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"],
            2,
            "world size is 2",
        ),
        (["--parallelism.tensor_parallel_degree", "3"], 4, "not divisible"),
        (["--parallelism.data_parallel_shard_degree", "0"], 1, "data_parallel_shard_degree"),
        (["--checkpoint.create_seed_checkpoint"], 1, "checkpoint.enable"),
        (["--training.tokenizer_vocab_size", "4096"], 1, "training.tokenizer_vocab_size = 4096"),
        (["--checkpoint.enable", "--checkpoint.create_seed_checkpoint"], 2, "single process"),
    ],
)
def test_bad_values_are_refused(overrides, world, match, monkeypatch):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(".", r"\.")):
        check(*overrides, world=world, monkeypatch=monkeypatch)


def test_unknown_toml_key_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_CONFIG.read_text().replace("[training]", "[training]\nsteps_typo = 3"))
    with pytest.raises(ConfigError, match="steps_typo"):
        check(config=bad, monkeypatch=monkeypatch)


def test_missing_config_file_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="/no/such.toml"):
        check(config="/no/such.toml", monkeypatch=monkeypatch)


def test_cli_exits_2_with_one_line_before_any_compute(tmp_path):
    proc = cli(
        "titan_geonorm.train",
        *trainer_args(tmp_path),
        "--model.flavor",
        "9T",
        extra_env={"WORLD_SIZE": "1"},
        timeout=300,
    )
    assert proc.returncode == 2
    assert "invalid configuration: model.flavor = '9T'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"
