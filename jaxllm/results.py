"""What generation hands back: the decode state turned into ids, texts, finish reasons and
checks, and verify-and-retry for constrained output.

Legend: B output rows, N output buffer length, A logprob alternatives.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from jaxllm.errors import GenerationError
from jaxllm.stopping import FINISH_REASONS, RUNNING, cut_at_stop, holdback
from jaxllm.structured import constraints


@dataclasses.dataclass
class GenerationResult:
    """One entry per output sequence (prompt i's samples are rows i*n .. i*n + n - 1)."""

    token_ids: list[list[int]]  # generated ids (EOS kept, padding dropped)
    finish_reasons: list[str]  # "eos", "stop", "length", "repetition", "custom" or "constraint"
    num_prompt_tokens: list[int]
    prompt_index: list[int]  # which prompt each output continues
    # with a tokenizer: the continuation as it reads after its prompt (prompt + text is the whole
    # text; a Llama-style tokenizer's leading space is kept), cut at the stop string
    texts: list[str] | None = None
    logprobs: list[list[float]] | None = None  # per generated token, when asked for
    top_logprobs: list[list[dict[int, float]]] | None = None  # A alternatives per token, when asked for
    timing: dict = dataclasses.field(default_factory=dict)  # compile_s, prefill_s, decode_s, decode_tokens_per_s
    scores: list[float] | None = None  # beam search: each hypothesis' length-normalized score
    valid: list[bool | None] | None = None  # with a constraint: whether each text satisfies it (None: free row)
    errors: list[str | None] | None = None  # why a text is not valid


def final_text(text: str, reason: str, stop: Sequence[str], include: bool) -> str:
    return cut_at_stop(text, stop, include) if reason == "stop" else text


def decode_rows(tokenizer, prompts, token_ids, reasons, stop: Sequence[str], include: bool, after_prompt: bool = True) -> list[str]:
    """Each row's text, cut at its stop string: as it reads after its prompt, or (`after_prompt=False`)
    as a text of its own, whose first space a dummy-prefix tokenizer drops."""
    return [
        final_text(tokenizer.decode(ids, after=prompt if after_prompt else ()), why, stop, include)
        for prompt, ids, why in zip(prompts, token_ids, reasons)
    ]


class TextStream:
    """Each row's new text as successive decode states arrive (any decoder's `DecodeState`).

    `pieces(state)` yields (row, text) pairs; a row's pieces concatenate to its final text
    (`decode_rows`): a UTF-8 character is never split, and text that could still begin a stop
    string is held back until the row ends or the text moves past it.
    """

    def __init__(self, tokenizer, prompts, stop: Sequence[str], include: bool):
        if tokenizer is None:
            raise GenerationError("streaming needs a tokenizer")
        self.decoders = [tokenizer.stream_decoder(after=prompt) for prompt in prompts]
        self.stop, self.include = list(stop), include
        B = len(prompts)
        self.text, self.shown, self.seen = [""] * B, [0] * B, [0] * B

    def pieces(self, state):
        out, lengths, finish = jax.device_get((state.tokens, state.length, state.finish))
        for r, decoder in enumerate(self.decoders):
            self.text[r] += decoder.push(out[r, self.seen[r] : lengths[r]].tolist())
            self.seen[r] = int(lengths[r])
            if finish[r] != RUNNING:
                self.text[r] += decoder.flush()
                ready = final_text(self.text[r], FINISH_REASONS[finish[r]], self.stop, self.include)
            else:
                ready = self.text[r][: len(self.text[r]) - holdback(self.text[r], self.stop)]
            if len(ready) > self.shown[r]:
                yield r, ready[self.shown[r] :]
                self.shown[r] = len(ready)


def collect(state, req, tokenizer, timing: dict) -> GenerationResult:
    """The host's view of a finished `generate.DecodeState` for the prepared request `req` (`request.Prepared`)."""
    logprobs, include_stop = req.request.logprobs, req.request.include_stop_str_in_output
    out, lengths, finish, lp, top_ids, top_lp = jax.device_get(
        (state.tokens, state.length, state.finish, state.logprobs, state.top_ids, state.top_logprobs)
    )
    B = len(req.prompts)
    token_ids = [out[r, : lengths[r]].tolist() for r in range(B)]
    reasons = [FINISH_REASONS[f] for f in finish]
    texts = valid = errors = None
    if tokenizer is not None:
        texts = decode_rows(tokenizer, req.prompts, token_ids, reasons, req.stop_strings, include_stop)
        # A constraint matches the output as a text of its own: a dummy-prefix tokenizer's first
        # space separates it from the prompt and is not part of the value (constraints.dfa_table).
        own = texts if all(c is None for c in req.constraints) else decode_rows(
            tokenizer, req.prompts, token_ids, reasons, req.stop_strings, include_stop, after_prompt=False
        )
        valid, errors = constraints.verify_all(req.constraints, own)
    generated = int(np.sum(lengths))
    timing["decode_tokens_per_s"] = generated / timing["decode_s"] if timing.get("decode_s") else 0.0
    return GenerationResult(
        token_ids=token_ids,
        finish_reasons=reasons,
        num_prompt_tokens=[len(p) for p in req.prompts],
        prompt_index=req.prompt_index,
        texts=texts,
        logprobs=[lp[r, : lengths[r]].tolist() for r in range(B)] if logprobs is not None else None,
        top_logprobs=[
            [dict(zip(top_ids[r, t].tolist(), top_lp[r, t].tolist())) for t in range(lengths[r])] for r in range(B)
        ] if logprobs else None,
        timing=timing,
        valid=valid,
        errors=errors,
    )


def retry_invalid(
    run: Callable[..., GenerationResult], request, result: GenerationResult, attempt: int,
) -> GenerationResult:
    """Generates the rows of `result` whose output is not valid again with `run(request)` (one sample
    each, seeds moved on), and puts them in place. -> result

    `request`: the `request.Request` that made `result`; the new one continues the invalid rows'
    prompts with their own per-prompt values (`Request.subset`).
    """
    bad = [r for r, ok in enumerate(result.valid or []) if ok is False]
    if not bad:
        return result
    again = request.subset([result.prompt_index[r] for r in bad]).replace(num_return_sequences=1, retries=0)
    if again.seed is not None:  # each row its own new seed, so a retry does not repeat the failed sample
        seeds = again.seed if isinstance(again.seed, list) else [again.seed] * len(bad)
        again = again.replace(seed=[(s + 1_000_003 * attempt + r) % 2**32 for s, r in zip(seeds, bad)])
    redo = run(again)
    for j, r in enumerate(bad):
        for field in ("token_ids", "finish_reasons", "texts", "logprobs", "top_logprobs", "valid", "errors"):
            if getattr(result, field) is not None:
                getattr(result, field)[r] = getattr(redo, field)[j]
    result.timing["retries"] = result.timing.get("retries", 0) + len(bad)
    return result
