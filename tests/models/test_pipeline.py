"""Pipeline parallelism with the block variants: 2 stages on gloo reproduce one process.

Losses and grad norms are compared: in stock torchtitan 0.2.2 PP gradients are the token count
times the non-PP ones (`normalize_pp_loss_before_backward`, patch 0008), which clipping hides
from the first losses but not from the grad norm or, after a few steps, from the loss.

Peri-LN's embedding norm is a top-level module torchtitan's default stage split does not know
(preflight refuses it, tests/hardening/test_bad_configs.py); listed next to `tok_embeddings` in
`parallelism.module_fqns_per_model_part`, the 2-stage run must match one process from the same
seed checkpoint.
"""

from pathlib import Path

import pytest

from tests.hardening.test_bad_configs import config_file
from tests.launch import grad_norms, losses, seeded_args, steps, train

pytestmark = pytest.mark.distributed

# `tiny` has 4 layers; Peri-LN's embedding norm goes with the embedding.
STAGES = [["tok_embeddings", "emb_norm", "layers.0", "layers.1"], ["layers.2", "layers.3", "norm", "output"]]
CASES = [
    (
        "llama3_periln",
        "1F1B",
        {"peri_ln": {"embedding_norm": True}, "parallelism": {"module_fqns_per_model_part": STAGES}},
    ),
    # torchtitan's default split: GeoNorm has no top-level module of its own.
    ("llama3_geonorm", "GPipe", {}),
]


def _run(dump: Path, seed: Path, config: Path, *overrides: str, nproc: int):
    proc = train(dump, *seeded_args(seed, dump), *overrides, nproc=nproc, config=config)
    assert steps(dump) == [1, 2, 3, 4]
    return (losses(dump), grad_norms(dump)), proc.stdout + proc.stderr


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
    assert pp[1] == pytest.approx(one[1], rel=1e-3)
    assert pp[0] == pytest.approx(one[0], abs=1e-4)
