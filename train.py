"""Train a jaxllm model, or fine-tune one.

    python train.py --config configs/tiny.json --out_dir out/tiny
    python train.py --config configs/default.json --out_dir out/default --max_steps 20 --lr=3e-3
    python train.py --out_dir out/tiny --resume          # continue from the latest checkpoint

    python train.py --init_from MODEL_DIR --data my/texts --out_dir out/ft --lr 1e-4 --seq_len 256
    python train.py --init_from MODEL_DIR --data my/texts --out_dir out/lora --lora_rank 8 --lr 1e-3

Any field of the preset's "model" or "train" section can be overridden as `--field=value`
or `--field value` (typed by the field; see jaxllm/config.py). OUT_DIR ends up usable as
`python sample.py --checkpoint OUT_DIR`. Bad input exits with code 2 and one line naming the
problem; a NaN/inf loss stops the run with exit code 1, keeping the last good checkpoint.

`--init_from MODEL_DIR` (a jaxllm checkpoint or a Hugging Face directory) starts from that
model's weights and trains with its tokenizer (`--tokenizer` is refused) on `--data`. Its
config is the model's: `--config` is optional (its "train" section applies; its "model"
section and model flags may change only compute_dtype, attention_impl and max_seq_len).
`--lora_rank R` (needs --init_from) trains rank-R adapters on the frozen model instead
(`--lora_alpha`, default 2R; `--lora_targets`, default every layer matrix): the Orbax
checkpoints hold only the adapters, OUT_DIR the merged model plus adapters.safetensors and
adapters.json. Quantized models are refused: fine-tune the float checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from jaxllm.cli import Parser, fail


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(
        prog="train.py",
        description="Train a jaxllm model. Other --field=value flags override config fields.",
        allow_abbrev=False,
    )
    p.add_argument("--config", help="preset JSON file (configs/*.json); optional with --resume or --init_from")
    p.add_argument("--out_dir", required=True, help="run directory: checkpoints, metrics, the model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.add_argument("--no_compile_cache", action="store_true", help="do not keep compiled programs on disk")
    args, overrides = p.parse_known_args(argv)
    init_from = any(a.replace("-", "_").split("=")[0] == "__init_from" for a in overrides)
    if args.config is None and not args.resume and not init_from:
        p.error("the following arguments are required: --config (or --resume to continue a run, or --init_from to fine-tune)")
    return args, overrides


def quiet_closed_loop_reports(report) -> None:
    """When a damaged checkpoint fails to restore, TensorStore reads still in flight report
    into Orbax's already-closed event loop; after our one-line error those are noise."""
    if not (report.exc_type is RuntimeError and "Event loop is closed" in str(report.exc_value)):
        sys.__unraisablehook__(report)


def configs(args: argparse.Namespace, overrides: list[str]):
    """-> (model config, or for a fine-tune the model fields asked for; train config; description)
    from the preset (or the run being resumed, or only flags with --init_from) and the overrides."""
    from jaxllm.config import ModelConfig, preset_train_config, read_preset, split_overrides
    from jaxllm.errors import ConfigError
    from jaxllm import train_loop

    model_changes, train_changes = split_overrides(overrides)
    if "lora_rank" in train_changes and train_changes["lora_rank"] < 1:
        raise ConfigError(f"--lora_rank must be >= 1, got {train_changes['lora_rank']} (leave it out to train every weight)")
    if args.config:
        model, train, description = read_preset(args.config)
    elif args.resume:
        cfg, tcfg = train_loop.read_run(args.out_dir)
        model, train, description = cfg.to_dict(), tcfg.to_dict(), "resumed run"
    else:
        model, train, description = None, {}, "fine-tune"
    tcfg = preset_train_config(args.config or args.out_dir, train, train_changes)
    if tcfg.init_from:
        return {**(model or {}), **model_changes}, tcfg, description  # checked against the model (finetune_config)
    if model is None:
        raise ConfigError(f'config {args.config} must be a JSON object with a "model" section (or fine-tune a model: --init_from DIR)')
    try:
        cfg = ModelConfig.from_dict(model)
    except ConfigError as e:
        raise ConfigError(f"config {args.config}: {e}") from None
    return cfg.replace(**model_changes), tcfg, description


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    sys.unraisablehook = quiet_closed_loop_reports
    import jaxllm  # after parsing: --help and flag errors stay instant
    from jaxllm import train_loop
    from jaxllm.compilation import enable_persistent_cache
    try:
        cfg, tcfg, description = configs(args, overrides)
        if not args.no_compile_cache:
            try:
                enable_persistent_cache()
            except jaxllm.CacheError as e:  # a cache others can write could hand XLA their code: go without
                print(f"train.py: warning: {e}; running without the persistent compilation cache", file=sys.stderr)
        print(f"train.py: {args.config or (args.out_dir if args.resume else tcfg.init_from)}: {description}")
        train_loop.run(cfg, tcfg, args.out_dir, resume=args.resume, progress=not args.no_progress)
    except jaxllm.TrainingError as e:  # the run itself failed (exit 1), not its input
        fail("train.py", str(e))
        return 1
    except jaxllm.JaxllmError as e:
        return fail("train.py", str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
