"""`python -m titan_geonorm.train --job.config_file X.toml [--section.key value ...]`.

torchtitan's trainer with the plugin's config module merged in. Importing this module prepares
the process for torchtitan: the CPU patches when there is no accelerator (they must precede
torchtitan's first import), the run patches and the train-spec registration. The config is parsed
and checked (`titan_geonorm.titan.preflight`) before any process group, model or data is built; a
bad config exits with status 2 and a one-line message naming the key.

Under torchrun a worker exits when the torchrun agent dies (`exit_with_parent`).
"""

import ctypes
import dataclasses
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent() -> None:
    """Under torchrun (Linux), have the kernel send this worker SIGTERM when its torchrun agent
    dies. Without it a `kill -9` of torchrun alone leaves the workers training: their process
    group no longer needs the agent, so they go on writing checkpoints and metrics into a dump
    folder that a relaunch then shares with them. An agent that died before the call has already
    left this process reparented: it exits at once then."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1 or os.getppid() != parent:
        sys.exit("titan_geonorm: the torchrun agent that started this worker is gone")


exit_with_parent()

from titan_geonorm.titan.patches import apply_cpu_patches, apply_run_patches  # noqa: E402

apply_cpu_patches()

from titan_geonorm.titan import register  # noqa: E402  (after the CPU patches)
from titan_geonorm.titan.lock import DumpFolderBusy, lock_dump_folder  # noqa: E402
from titan_geonorm.titan.preflight import ConfigError, run_preflight  # noqa: E402
from titan_geonorm.titan.resume import CheckpointDamaged  # noqa: E402

apply_run_patches()
register()


def _cli_key(arg: str) -> str:
    """`--job.config-file=x` -> `--job.config_file` (tyro accepts both spellings)."""
    key = arg.split("=", 1)[0]
    return "--" + key[2:].replace("-", "_") if key.startswith("--") else key


def plugin_args(argv: list[str]) -> list[str]:
    """Default `custom_config_module`/`custom_import` to the plugin unless given on the CLI.

    Passed on the command line, they also apply to TOML files that don't name the plugin.
    """
    args = list(argv)
    keys = {_cli_key(a) for a in args}
    if "--job.custom_config_module" not in keys:
        args += ["--job.custom_config_module", "titan_geonorm.config"]
    if "--experimental.custom_import" not in keys:
        args += ["--experimental.custom_import", "titan_geonorm"]
    return args


def config_file_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if _cli_key(arg) == "--job.config_file":
            _, _, value = arg.partition("=")
            return value or (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def parse_config(argv: list[str]):
    from torchtitan.config import ConfigManager

    path = config_file_arg(argv)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"job.config_file = {path!r}: no such file")
    try:
        return ConfigManager().parse_args(plugin_args(argv))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except AssertionError as e:
        # torchtitan's own checks assert with prose ("validation steps must be ..."): name the key.
        raise ConfigError(f"{_key_named_in(str(e))}: {e} (torchtitan's check)") from None


def _key_named_in(message: str) -> str:
    """The `section.key` whose words a torchtitan assertion message spells out, if one does."""
    from torchtitan.config import JobConfig

    words = message.lower().replace("_", " ")
    for section in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(section.type):
            if f"{section.name} {f.name.replace('_', ' ')}" in words:
                return f"{section.name}.{f.name}"
    return "config"


def run(job_config) -> None:
    """Train (or write a seed checkpoint) as torchtitan's `main` does, with `GeoNormTrainer`
    (torchtitan's Trainer plus the `[divergence]` guard)."""
    import torch.distributed as dist

    from titan_geonorm.titan.trainer import GeoNormTrainer

    trainer = None
    try:
        trainer = GeoNormTrainer(job_config)
        if job_config.comm.mode == "local_tensor":
            return  # torchtitan 0.2.2 cannot init weights under LocalTensor: construction only
        if job_config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


PREFLIGHT_ONLY = "--preflight-only"
"""Check the config and exit (0, or 2 with the message) without building anything: what
`scripts/run_train.sh` runs before torchrun, whose agent would turn exit status 2 into 1."""


def main(argv: list[str] | None = None) -> None:
    from torchtitan.tools.logging import init_logger

    init_logger()
    argv = sys.argv[1:] if argv is None else argv
    preflight_only = PREFLIGHT_ONLY in argv
    argv = [a for a in argv if a != PREFLIGHT_ONLY]
    try:
        job_config = parse_config(argv)
        run_preflight(job_config)
    except CheckpointDamaged as e:
        print(f"titan_geonorm: {e}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        print(f"titan_geonorm: invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)
    if preflight_only:
        return
    lock = None
    if int(os.environ.get("RANK", "0")) == 0 and job_config.comm.mode == "default":
        try:
            lock = lock_dump_folder(job_config.job.dump_folder)
        except DumpFolderBusy as e:
            print(f"titan_geonorm: {e}", file=sys.stderr)
            sys.exit(2)
    try:
        run(job_config)
    finally:
        if lock is not None:
            os.close(lock)


if __name__ == "__main__":
    main()
