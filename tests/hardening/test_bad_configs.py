"""Table of bad configs: each is refused by the preflight checks, before any process group, model
or data exists, with a message naming the offending key."""

import re
import tomllib

import pytest

from tests.launch import TINY_CONFIG, cli, trainer_args
from titan_geonorm.titan.launcher import parse_config
from titan_geonorm.titan.preflight import ConfigError, run_preflight

MM = ("--optimizer.name", "ManifoldMuon")

# (id, TOML additions {section: {key: value}}, CLI overrides, world size, text the error must contain)
CASES = [
    ("steps-type", {"training": {"steps": "ten"}}, (), 1, "training.steps = 'ten'"),
    ("lr-type", {"optimizer": {"lr": "fast"}}, (), 1, "optimizer.lr = 'fast'"),
    (
        "ac-mode-choice",
        {"activation_checkpoint": {"mode": "sometimes"}},
        (),
        1,
        "activation_checkpoint.mode = 'sometimes'",
    ),
    ("skips-type", {"divergence": {"max_consecutive_skips": 2.5}}, (), 1, "divergence.max_consecutive_skips = 2.5"),
    ("learnable-step-type", {"geonorm": {"learnable_step": "yes"}}, (), 1, "geonorm.learnable_step = 'yes'"),
    (
        "rules-type",
        {"optimizer": {"manifold_muon": {"rules": "wq=dgram"}}},
        (),
        1,
        "optimizer.manifold_muon.rules = 'wq=dgram'",
    ),
    ("steps-zero", {}, ("--training.steps", "0"), 1, "training.steps = 0"),
    ("batch-zero", {}, ("--training.local_batch_size", "0"), 1, "training.local_batch_size = 0"),
    ("max-norm-zero", {}, ("--training.max_norm", "0"), 1, "training.max_norm = 0"),
    ("lr-negative", {}, ("--optimizer.lr=-0.001",), 1, "optimizer.lr = -0.001"),
    ("beta2-one", {}, ("--optimizer.beta2", "1.0"), 1, "optimizer.beta2 = 1.0"),
    ("weight-decay-negative", {}, ("--optimizer.weight_decay=-0.1",), 1, "optimizer.weight_decay = -0.1"),
    ("optimizer-name", {}, ("--optimizer.name", "SGD"), 1, "optimizer.name = 'SGD'"),
    ("min-lr-factor", {}, ("--lr_scheduler.min_lr_factor", "2"), 1, "lr_scheduler.min_lr_factor = 2"),
    ("checkpoint-interval", {}, ("--checkpoint.enable", "--checkpoint.interval", "0"), 1, "checkpoint.interval = 0"),
    (
        "keep-latest-1",
        {},
        ("--checkpoint.enable", "--checkpoint.keep_latest_k", "1"),
        1,
        "checkpoint.keep_latest_k = 1",
    ),
    ("validation-freq", {}, ("--validation.enable", "--validation.freq", "0"), 1, "validation.freq = 0"),
    ("norm-type", {}, ("--model.norm_type", "batchnorm"), 1, "model.norm_type = 'batchnorm'"),
    ("decay", {}, ("--geonorm.attn_decay", "cubic"), 1, "geonorm.attn_decay = 'cubic'"),
    ("theta-max", {}, ("--geonorm.theta_max", "4"), 1, "geonorm.theta_max = 4"),
    ("decay-index", {}, ("--geonorm.decay_index", "layer"), 1, "geonorm.decay_index = 'layer'"),
    ("divergence-action", {}, ("--divergence.action", "ignore"), 1, "divergence.action = 'ignore'"),
    ("inject-step", {}, ("--divergence.inject_nan_at_step", "0"), 1, "divergence.inject_nan_at_step = 0"),
    ("mm-momentum", {}, ("--optimizer.manifold_muon.momentum", "1.0"), 1, "optimizer.manifold_muon.momentum = 1.0"),
    ("mm-preset", {}, ("--optimizer.manifold_muon.preset", "foo"), 1, "optimizer.manifold_muon.preset = 'foo'"),
    (
        "dgram-on-1d",
        {},
        (*MM, "--optimizer.manifold_muon.rules", "norm=dgram"),
        1,
        "optimizer.manifold_muon.rules = ['norm=dgram']",
    ),
    ("flavor", {}, ("--model.flavor", "13B"), 1, "model.flavor = '13B'"),
    (
        "degrees-vs-world",
        {},
        ("--parallelism.data_parallel_shard_degree", "3"),
        2,
        "parallelism.data_parallel_shard_degree = 3 x parallelism.data_parallel_replicate_degree = 1",
    ),
    ("tp-vs-world", {}, ("--parallelism.tensor_parallel_degree", "3"), 2, "parallelism.tensor_parallel_degree = 3"),
    ("lr-inf", {}, ("--optimizer.lr", "inf"), 1, "optimizer.lr = inf"),
    (
        "validation-steps-zero",
        {},
        ("--validation.steps", "0"),
        1,
        "validation.steps: validation steps must be positive or -1",
    ),
    (
        "stock-llama3-layernorm",
        {},
        ("--model.norm_type", "layernorm"),
        1,
        "model.norm_type = 'layernorm': model.name = 'llama3_titan'",
    ),
    (
        "allow-resume-optimizer",
        {},
        ("--checkpoint.allow_resume_changes", "optimizer.name"),
        1,
        "checkpoint.allow_resume_changes = ['optimizer.name']",
    ),
    (
        "allow-resume-beta",
        {},
        ("--checkpoint.allow_resume_changes", "optimizer.lr,optimizer.beta2"),
        1,
        "checkpoint.allow_resume_changes = ['optimizer.lr', 'optimizer.beta2']: 'optimizer.beta2'",
    ),
    (
        "tp-vs-heads",
        {},
        ("--parallelism.tensor_parallel_degree", "3"),
        3,
        "parallelism.tensor_parallel_degree = 3 does not divide the 4 attention heads",
    ),
    (
        "tp-vs-kv-heads",
        {},
        ("--parallelism.tensor_parallel_degree", "4"),
        4,
        "parallelism.tensor_parallel_degree = 4 does not divide the 2 key/value heads",
    ),
    (
        "seq-len-vs-tp",
        {},
        ("--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "66"),
        2,
        "training.seq_len = 66",
    ),
    (
        "compile-with-tp-on-cpu",
        {},
        ("--parallelism.tensor_parallel_degree", "2", "--compile.enable"),
        2,
        "compile.enable = true with parallelism.tensor_parallel_degree = 2",
    ),
    ("global-batch", {}, ("--training.global_batch_size", "6"), 1, "training.global_batch_size = 6"),
    ("validation-steps-all-ranks", {}, ("--validation.enable", "--validation.steps=-1"), 2, "validation.steps = -1"),
    (
        "pp-with-manifold-muon",
        {},
        (*MM, "--parallelism.pipeline_parallel_degree", "2"),
        2,
        "optimizer.name = 'ManifoldMuon' with parallelism.pipeline_parallel_degree = 2",
    ),
    (
        "pp-drops-emb-norm",
        {"peri_ln": {"embedding_norm": True}},
        ("--model.name", "llama3_periln", "--parallelism.pipeline_parallel_degree", "2"),
        2,
        "has an embedding norm (emb_norm) with parallelism.pipeline_parallel_degree = 2",
    ),
]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _toml_lines(data: dict, prefix: str = "") -> list[str]:
    lines = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for name, table in tables.items():
        lines += _toml_lines(table, f"{prefix}.{name}" if prefix else name)
    return lines


def config_file(additions: dict, path):
    """tests/configs/tiny.toml with `additions` merged in, written to `path`."""
    with open(TINY_CONFIG, "rb") as f:
        data = tomllib.load(f)
    for section, values in additions.items():
        target = data.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict):
                target.setdefault(key, {}).update(value)
            else:
                target[key] = value
    path.write_text("\n".join(_toml_lines(data)) + "\n")
    return path


@pytest.mark.parametrize("additions, overrides, world, expected", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_config_is_refused(additions, overrides, world, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    path = config_file(additions, tmp_path / "job.toml")
    with pytest.raises(ConfigError) as info:
        job_config = parse_config(
            ["--job.config_file", str(path), "--job.dump_folder", str(tmp_path / "dump"), *overrides]
        )
        run_preflight(job_config)
    assert expected in str(info.value)


def test_every_expected_message_names_a_full_key_and_its_value():
    for case_id, *_, expected in CASES:
        assert re.search(r"\b[a-z_]+\.[a-z0-9_.]+( = \S|: )", expected), case_id


def test_table_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_launcher_refuses_before_any_compute(tmp_path):
    """Through the launcher: exit status 2, one line naming the key, nothing written."""
    dump = tmp_path / "dump"
    proc = cli(
        "titan_geonorm.train",
        *trainer_args(dump),
        "--parallelism.tensor_parallel_degree",
        "2",
        "--compile.enable",
        extra_env={"WORLD_SIZE": "2"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "invalid configuration: compile.enable" in proc.stderr
    assert not dump.exists()
