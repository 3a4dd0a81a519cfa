"""Answers constrained to JSON (`response_format`) by a grammar, through llguidance.

`{"type": "json_object"}` constrains the answer to one JSON object, `{"type": "json_schema",
"schema": {...}}` to JSON that validates against the schema. Before every token the request's
matcher gives the tokens that keep the answer a valid prefix; the others are masked (-inf) before
the sampler sees the logits, so the grammar, not the model, guarantees the shape. Once the JSON is
complete only an end token is allowed.

Why llguidance: a plain `pip install` (one abi3 wheel, no dependencies: no CUDA, triton or
transformers), it reads our `tokenizer.json` directly (`LLTokenizer(tokenizer.to_str())`, the
same Rust `tokenizers`), and it compiles JSON schemas (and Lark grammars) lazily, so compiling a
schema costs milliseconds and a mask well under a millisecond for small vocabularies. It is an
optional extra: `pip install -e .[structured]` (`serve` includes it); without it a request that
asks for a response format gets a 400 naming the package.
"""

from __future__ import annotations

import functools
import json
import threading

import numpy as np
import torch

from vlm.serve.api import RequestError

INSTALL = "response_format needs the llguidance package: pip install 'vlm[structured]'"
# compact JSON: no free whitespace between tokens (a small model would otherwise pad with it)
_OVERRIDES = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise RequestError(INSTALL, param="response_format", code="unsupported_parameter") from None
    return llguidance


def _bad(message: str) -> RequestError:
    return RequestError(message, param="response_format", code="invalid_value")


def schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema a `SamplingParams.response_format` asks for (None: unconstrained text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise _bad("response_format must be an object")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = response_format.get("schema")
        if not isinstance(schema, dict):
            raise _bad("response_format json_schema needs a 'schema' object")
        return schema
    raise _bad(f"response_format type must be text, json_object or json_schema, got {kind!r}")


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str) -> str:
    ll = _llguidance()
    grammar = ll.LLMatcher.grammar_from_json_schema(schema_json, overrides=_OVERRIDES)
    err = ll.LLMatcher.validate_grammar(grammar)
    if err and not err.startswith("WARNING"):
        raise _bad(f"response_format: the JSON schema cannot be used: {err}")
    return grammar


def grammar_for(response_format: dict | None) -> str | None:
    """The llguidance grammar of a response format (None: unconstrained). RequestError
    (param response_format) when it is malformed or its schema cannot be compiled."""
    schema = schema_of(response_format)
    if schema is None:
        return None
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise _bad(f"response_format: the schema is not JSON: {e}") from None
    return _grammar(key)


class Grammars:
    """One engine's compiler of response formats into per-request `JsonConstraint`s. The
    llguidance tokenizer (about a second for a large vocabulary) is built on first use."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, int(vocab_size), sorted(int(t) for t in eos_ids)
        self._ll_tokenizer = None
        self._lock = threading.Lock()

    def _tok(self):
        with self._lock:
            if self._ll_tokenizer is None:
                ll = _llguidance()
                self._ll_tokenizer = ll.LLTokenizer(
                    self.tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids
                )
            return self._ll_tokenizer

    def constraint(self, response_format: dict | None) -> JsonConstraint | None:
        grammar = grammar_for(response_format)
        if grammar is None:
            return None
        ll = _llguidance()
        tok = self._tok()
        err = ll.LLMatcher.validate_grammar(grammar, tok)
        if err and not err.startswith("WARNING"):
            raise _bad(f"response_format: the JSON schema cannot be used: {err}")
        matcher = ll.LLMatcher(tok, grammar)
        if matcher.is_error():
            raise _bad(f"response_format: {matcher.get_error()}")
        return JsonConstraint(matcher, self.eos_ids)


class JsonConstraint:
    """One answer's grammar state: `allowed(V)` before a token is picked, `accept(token)` after."""

    def __init__(self, matcher, eos_ids: list[int]):
        self.matcher, self.eos_ids = matcher, eos_ids

    def allowed(self, vocab_size: int) -> torch.Tensor:
        m = torch.zeros(vocab_size, dtype=torch.bool)
        if self.matcher.is_error():  # cannot happen with masked sampling; end the answer if it does
            m[self.eos_ids] = True
            return m
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
        n = min(vocab_size, bits.size)
        m[:n] = torch.from_numpy(bits[:n].astype(bool))
        if not bool(m.any()):
            m[self.eos_ids] = True
        return m

    def accept(self, token: int) -> None:
        self.matcher.consume_token(int(token))
