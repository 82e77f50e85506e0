"""Sample from a jaxllm checkpoint.

    python sample.py --prompt "def fibonacci(n):" --max_new_tokens 64 --temperature 0.8 --seed 0
    python sample.py --checkpoint out/run1 --prompt "a" --prompt "b"      # a batch of two

Without --checkpoint, the model bundled with the package is used. Bad input exits with
code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "jaxllm" / "assets" / "default"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="sample.py", description="Generate text from a jaxllm checkpoint.")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text; repeat for a batch")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64, help="tokens to generate (>= 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; must be >= 0")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed (>= 0); default: random")
    p.add_argument("--no_compile_cache", action="store_true", help="do not keep compiled programs on disk")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"argument --max_new_tokens: must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:  # also catches nan
        p.error(f"argument --temperature: must be >= 0 (0 = greedy), got {args.temperature}")
    if args.seed is not None and args.seed < 0:
        p.error(f"argument --seed: must be >= 0, got {args.seed}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jaxllm  # after parsing: --help and flag errors stay instant
    from jaxllm.compilation import enable_persistent_cache

    if not args.no_compile_cache:
        enable_persistent_cache()
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    try:
        if args.checkpoint is None and not checkpoint.exists():
            raise jaxllm.CheckpointError(
                f"no --checkpoint given and the bundled model is missing ({checkpoint}); pass --checkpoint DIR"
            )
        params, cfg, tokenizer = jaxllm.load_checkpoint(checkpoint)
        if tokenizer is None:
            raise jaxllm.CheckpointError(f"{checkpoint} has no tokenizer.model, so text prompts cannot be encoded")
        prompts = args.prompt or [""]
        result = jaxllm.generate(
            params,
            cfg,
            prompts,
            tokenizer=tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    except jaxllm.JaxllmError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    for i, (prompt, text) in enumerate(zip(prompts, result.texts)):
        if i:
            print("\n" + "-" * 40)
        print(prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
