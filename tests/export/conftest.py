"""Shared fixtures of the export tests: a tokenizer, tiny variant models, and torchrun runs.

In-process fixtures build models directly (no train spec needed); the run fixtures launch
`python -m titan_geonorm.train` under torchrun on `tests/configs/tiny.toml` (torchtitan's llama3,
fp32) and are shared by the whole session: one seed checkpoint, one short training run from it,
and one FSDP run on 2 ranks that saves the seed's weights unchanged (lr 0).
"""

import shutil
from pathlib import Path

import pytest
import torch

from tests.launch import REPO, train
from titan_geonorm.data.tokenizer import tokenizer_files, train_bpe, write_files
from titan_geonorm.models.args import VariantModelArgs
from titan_geonorm.models.model import VariantTransformer

VOCAB = 512


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-entry byte-level BPE trained in well under a second on the repo's README."""
    folder = tmp_path_factory.mktemp("tokenizer")
    text = (REPO / "README.md").read_text(encoding="utf-8")
    write_files(folder, tokenizer_files(train_bpe([text], VOCAB)))
    return folder


@pytest.fixture
def make_variant():
    """`make_variant(block, norm_type, **args)` -> (model, args): a 2-layer GQA model with random
    weights and every 1-D parameter (gains, biases, GeoNorm steps) moved off its init value, so
    that a wrongly mapped or ignored gain shows in the logits."""

    def build(block: str, norm_type: str = "rmsnorm", **extra):
        torch.manual_seed(0)
        args = VariantModelArgs(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=VOCAB,
            rope_theta=500000,
            max_seq_len=32,
            block=block,
            norm_type=norm_type,
            **extra,
        )
        model = VariantTransformer(args)
        with torch.no_grad():
            model.init_weights()
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.2 * torch.randn_like(p))
        return model.eval(), args

    return build


def _run_from(seed: Path, dump: Path, *overrides: str, nproc: int = 1) -> Path:
    """A run folder laid out as if it had trained its own tokenizer and seed checkpoint."""
    (dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(seed / "checkpoint" / "step-0", dump / "checkpoint" / "step-0")
    shutil.copytree(seed / "tokenizer", dump / "tokenizer")
    train(dump, "--checkpoint.enable", *overrides, nproc=nproc)
    return dump


@pytest.fixture(scope="session")
def seed(tmp_path_factory) -> Path:
    """Run folder with `checkpoint/step-0` (initial weights, saved by 1 rank) and `tokenizer/`."""
    dump = tmp_path_factory.mktemp("seed")
    train(dump, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
    return dump


@pytest.fixture(scope="session")
def trained(seed, tmp_path_factory) -> Path:
    """4 AdamW steps from the seed on 1 rank; checkpoint at step 4."""
    return _run_from(seed, tmp_path_factory.mktemp("trained"), "--training.steps", "4", "--checkpoint.interval", "4")


@pytest.fixture(scope="session")
def fsdp_seed_weights(seed, tmp_path_factory) -> Path:
    """One step at lr 0 under FSDP on 2 ranks: `checkpoint/step-1` holds the seed's weights,
    sharded across 2 ranks."""
    return _run_from(
        seed,
        tmp_path_factory.mktemp("fsdp"),
        "--training.steps",
        "1",
        "--checkpoint.interval",
        "1",
        "--optimizer.lr",
        "0",
        "--parallelism.data_parallel_shard_degree",
        "2",
        nproc=2,
    )
