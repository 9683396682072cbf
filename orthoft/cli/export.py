"""``orthoft export``: merge saved orthoft adapters into their base and write a plain Hugging Face model folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``orthoft export``."""
    parser.description = (
        "Load BASE (optionally in 4-bit), load each ADAPTER in the given order, merge them exactly in float32 "
        "into a dense copy of the base and write OUT atomically, with a model card recording the measured "
        "merge error."
    )
    parser.add_argument(
        "--base", help="base model folder or hub id (default: the first adapter's base_model_name_or_path)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        help="saved orthoft adapter folder; repeat to merge several in order",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (must not exist unless --overwrite; never the working directory, the base or an "
        "adapter folder or the run folder it came from)",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="written dtype (default: base's)"
    )
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="keep the base's bitsandbytes format (nf4 when the base is dense) and report the error this adds",
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="load BASE in 4-bit nf4 (as it was trained)")
    parser.add_argument(
        "--device", default=None, help="device to load the base on (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if an earlier export wrote it (kept until the new one is complete)",
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")


def run(args: argparse.Namespace) -> int:
    """Check OUT, load, merge, write; print where it went and the measured errors."""
    import sys

    from ..export import export_merged, load_for_export
    from ..export.api import shard_size
    from ..export.destination import check_destination, protected_inputs
    from ..export.report import format_error

    # before minutes of loading: OUT must not destroy the inputs, the working directory or a folder export did not write
    shard_size(args.max_shard_size, label="--max-shard-size")
    inputs = protected_inputs(args.base, args.adapter)
    restored = check_destination(args.out, inputs, args.overwrite, label="--out")
    if restored is not None:
        print(
            f"orthoft export: {args.out} was missing after an interrupted export; restored it from {restored}",
            file=sys.stderr,
        )
    peft_model, names = load_for_export(args.base, args.adapter, args.load_in_4bit, args.device)
    report = export_merged(
        peft_model,
        args.out,
        dtype=args.dtype,
        quantization="base" if args.requantize else None,
        adapter_names=names,
        base_name_or_path=args.base,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        adapter_dirs=args.adapter,
    )
    print(f"wrote {report.out_dir} ({', '.join(f'{n}: {report.methods[n]}' for n in report.adapters)})")
    print(f"merge error (float32 merge vs adapter model): {format_error(report.merge_error)}")
    print(f"export error (as written vs adapter model):   {format_error(report.export_error)}")
    if report.requantization_error is not None:
        print(f"added by requantization:                      {format_error(report.requantization_error)}")
    return 0


__all__ = ["add_arguments", "run"]
