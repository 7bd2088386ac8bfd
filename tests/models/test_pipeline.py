"""Pipeline parallelism with the block variants: 2 stages on gloo reproduce one process.

Peri-LN's embedding norm is a top-level module torchtitan's default stage split does not know
(preflight refuses it, tests/hardening/test_bad_configs.py); listed next to `tok_embeddings` in
`parallelism.module_fqns_per_model_part`, the 2-stage run must match one process from the same
seed checkpoint.
"""

import shutil
from pathlib import Path

import pytest

from tests.hardening.test_bad_configs import config_file
from tests.launch import losses, steps, train
from tests.models.test_model import SPHERE

pytestmark = pytest.mark.distributed

# `tiny` has 4 layers; Peri-LN's embedding norm goes with the embedding.
STAGES = [["tok_embeddings", "emb_norm", "layers.0", "layers.1"], ["layers.2", "layers.3", "norm", "output"]]
CASES = [
    (
        "llama3_periln",
        "1F1B",
        {"peri_ln": {"embedding_norm": True}, "parallelism": {"module_fqns_per_model_part": STAGES}},
    ),
    # torchtitan's default split: GeoNorm has no top-level module of its own. The sphere radius:
    # with the default Pre-Norm radius two stages drift from one process after the first step
    # (loss 8.6e-3 apart at step 4, README "Known limitations"), not yet explained.
    (
        "llama3_geonorm",
        "GPipe",
        {"geonorm": SPHERE},
    ),
]


def _run(dump: Path, seed: Path, config: Path, *overrides: str, nproc: int):
    (dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(seed / "checkpoint" / "step-0", dump / "checkpoint" / "step-0")
    proc = train(
        dump,
        "--model.hf_assets_path",
        str(seed / "tokenizer"),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "1000",
        *overrides,
        nproc=nproc,
        config=config,
    )
    assert steps(dump) == [1, 2, 3, 4]
    return losses(dump), proc.stdout + proc.stderr


@pytest.mark.parametrize("model, schedule, additions", CASES, ids=[c[0] for c in CASES])
def test_two_stages_match_one_process(tmp_path, model, schedule, additions):
    common = {"model": {"name": model}, "training": {"steps": 4}}
    one_cfg = config_file(common | {k: v for k, v in additions.items() if k != "parallelism"}, tmp_path / "one.toml")
    seed = tmp_path / "seed"
    train(seed, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint", config=one_cfg)
    one, _ = _run(tmp_path / "one", seed, one_cfg, nproc=1)
    pp, log = _run(
        tmp_path / "pp",
        seed,
        config_file(common | additions, tmp_path / "pp.toml"),
        "--parallelism.pipeline_parallel_degree",
        "2",
        "--parallelism.pipeline_parallel_schedule",
        schedule,
        nproc=2,
    )
    assert f"Using pipeline schedule {schedule} with 8 microbatches and 2 stages" in log
    assert pp == pytest.approx(one, abs=1e-4)
