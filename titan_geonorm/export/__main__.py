"""`python -m titan_geonorm.export`: DCP checkpoint -> Hugging Face folder, or back with `--to-dcp`.

    python -m titan_geonorm.export --config X.toml --checkpoint <run>/checkpoint/step-N \
        --output DIR [--dtype float32|bfloat16] [--max-shard-size 5GB] [--overwrite] [--section.key value ...]
    python -m titan_geonorm.export --to-dcp --config X.toml --checkpoint HF_DIR --output DCP_DIR

The output is written into a temporary folder beside DIR and renamed into place, so DIR is never
half-written nor a mix of two exports; a non-empty DIR is refused unless `--overwrite`, which
replaces it whole (the files of DIR not written by the export are deleted too).
Other `--section.key value` arguments override the TOML as in training (e.g. `--model.flavor`).
Errors (unknown variant, checkpoint/config mismatch, bad dtype) exit with status 2 and one line;
a checkpoint is exported only as the model its run record says it trained (`check_trained_as`).
"""

import argparse
import sys

from titan_geonorm.export import DTYPES, export_checkpoint, import_to_dcp


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m titan_geonorm.export", allow_abbrev=False, description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True, help="the run's training TOML")
    parser.add_argument("--checkpoint", required=True, help="DCP step folder (export) or exported HF folder (--to-dcp)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output folder whole (default: refuse it)"
    )
    parser.add_argument(
        "--to-dcp", action="store_true", help="import an exported HF folder back to a model-only DCP checkpoint"
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.to_dcp:
            target = import_to_dcp(args.config, args.checkpoint, args.output, overrides, args.overwrite)
        else:
            target = export_checkpoint(
                args.config, args.checkpoint, args.output, args.dtype, overrides, args.max_shard_size, args.overwrite
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"titan_geonorm.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"titan_geonorm.export: wrote {args.output} ({target.value})")


if __name__ == "__main__":
    main()
