"""The OpenAI sampling parameters in both engines: every option (top_k, min_p, presence /
frequency / repetition penalties, n, logprobs, response_format) gives in the engine the tokens
`vlm.model.generate.generate` gives on the request alone; n choices share one prefill and are
reproducible when seeded; logprobs are the sequence's log-probability under the model; a JSON
schema answer validates against the schema even from a random model; bad values are refused with
the parameter named.

Tiny random models (tests/test_serve_engine.py), fp32; the "soft" one has ordinary logits, so
sampling and the penalties really change the answers."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.test_serve_engine import CTX, WORDS, conversation, submit_randomly, tiny
from vlm.build.model import stop_ids
from vlm.model.generate import SamplerOptions, generate, penalize, pick, sample_next
from vlm.serve.api import ChatRequest, RequestError, SamplingParams
from vlm.serve.engine import Engine, EngineConfig
from vlm.serve.engine_config import check_sampling
from vlm.serve.media_urls import MediaPolicy
from vlm.serve.openai_protocol import completion_body, finish_chunks, parse_chat_request
from vlm.serve.prompt import PromptBuilder
from vlm.serve.serial import SerialEngine
from vlm.serve.structured import Grammars
from vlm.tokenizer import train_tokenizer

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["left", "right", "first", "second"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "sure": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["answer", "count", "sure", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS * 10, vocab_size=300)


@pytest.fixture(scope="module")
def soft(tok):
    """A tiny random model with unsharpened logits: sampling spreads over many tokens."""
    loaded = tiny(tok)
    with torch.no_grad():
        loaded.model.decoder.lm_head.weight.div_(20)
    return loaded


def reference(loaded, messages, sp: SamplingParams, index: int = 0, constraint=None) -> list[int]:
    """`generate` on the request alone: choice `index`, its seed, every sampling option."""
    p = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, CTX)(messages, sp.max_tokens)
    eos = stop_ids(loaded.tokenizer, loaded.config["template"])
    seed = sp.choice_seed(index)
    gen = torch.Generator().manual_seed(seed) if sp.temperature > 0 and seed is not None else None
    out = generate(
        loaded.model,
        p.batch(loaded.tokenizer.pad_id),
        sp.max_tokens,
        eos,
        suppress_ids=loaded.tokenizer.structural_ids,
        generator=gen,
        sampler=sp.sampler(),
        constraints=None if constraint is None else [constraint],
    )
    return out[0]


OPTIONS = {
    "greedy + repetition": dict(temperature=0.0, repetition_penalty=1.8),
    "greedy + frequency/presence": dict(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.7),
    "greedy + negative presence": dict(temperature=0.0, presence_penalty=-2.0),
    "seeded top_k": dict(temperature=1.0, top_k=5, seed=11),
    "seeded min_p": dict(temperature=1.3, min_p=0.1, seed=12),
    "seeded top_k + top_p + min_p + penalties": dict(
        temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, frequency_penalty=0.5, repetition_penalty=1.2, seed=13
    ),
    "seeded top_k -1 (off)": dict(temperature=1.0, top_k=-1, presence_penalty=1.0, seed=14),
}


# ---- the model side ------------------------------------------------------------------------------
def test_penalties_follow_openai_and_hf_semantics():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    opts = SamplerOptions(frequency_penalty=0.5, presence_penalty=0.25)
    got = penalize(logits, opts, torch.tensor([2]), [0, 0, 1])
    # token 0 twice, token 1 once; the prompt does not count for OpenAI's penalties
    assert torch.allclose(got, torch.tensor([[2.0 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 0.5, 3.0]]))
    got = penalize(logits, SamplerOptions(repetition_penalty=2.0), torch.tensor([2]), [1])
    # prompt and answer both count; positive logits divided, negative multiplied
    assert torch.allclose(got, torch.tensor([[2.0, -2.0, 0.25, 3.0]]))


def test_top_k_and_min_p_drop_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, 1.0, g, top_k=2)) for _ in range(200)} == {0, 1}
    assert {int(sample_next(logits, 1.0, 1.0, g, min_p=0.25)) for _ in range(200)} == {0, 1, 2}
    assert {int(sample_next(logits, 1.0, 1.0, g, min_p=0.7)) for _ in range(50)} == {0}
    tok, lp = pick(logits.clone(), SamplerOptions(logprobs=2))
    assert tok == 0 and abs(lp.logprob - float(logits[0, 0])) < 1e-6 and [t for t, _ in lp.top] == [0, 1]


# ---- engine == generate ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_equals_generate_whatever_runs_beside(soft, name):
    opts = OPTIONS[name]
    reqs = [
        ChatRequest(conversation(i), SamplingParams(max_tokens=10, **{**opts, "seed": opts.get("seed", 0) + i}))
        for i in range(5)
    ]
    crowd = [ChatRequest(conversation(i + 5), SamplingParams(max_tokens=7, temperature=0.7)) for i in range(4)]
    want = [reference(soft, r.messages, r.sampling) for r in reqs]
    with Engine(soft, EngineConfig(dtype="fp32", max_batch=4, prefill_chunk=32)) as engine:
        got = [h.result(120) for h in submit_randomly(engine, [*reqs, *crowd], seed=len(name))][: len(reqs)]
    for i, fin in enumerate(got):
        assert fin.token_ids == want[i], (name, i)
    if "seeded" in name:  # sampling did spread: not every request gives the same answer
        assert len({tuple(w) for w in want}) > 1


def test_the_serial_engine_runs_the_same_options(soft):
    sp = SamplingParams(max_tokens=8, **OPTIONS["seeded top_k + top_p + min_p + penalties"])
    with SerialEngine(soft, EngineConfig(dtype="fp32")) as engine:
        fin = engine.submit(ChatRequest(conversation(3), sp)).result(120)
    eos = set(stop_ids(soft.tokenizer, soft.config["template"]))
    assert fin.token_ids == [t for t in reference(soft, conversation(3), sp) if t not in eos]


# ---- n --------------------------------------------------------------------------------------------
def test_n_choices_share_one_prefill_and_reproduce_when_seeded(soft):
    sp = SamplingParams(max_tokens=9, temperature=1.0, seed=21, n=3)
    msgs = conversation(0)
    want = [reference(soft, msgs, sp, i) for i in range(3)]
    assert len({tuple(w) for w in want}) > 1
    cfg = EngineConfig(dtype="fp32", max_batch=4, prefix_cache_mb=0)
    with Engine(soft, cfg) as engine:
        before = engine.stats()["prefill_tokens"]
        fin = engine.submit(ChatRequest(msgs, sp)).result(120)
        prefilled = engine.stats()["prefill_tokens"] - before
        crowd = [ChatRequest(conversation(i), SamplingParams(max_tokens=6, temperature=0.9)) for i in range(3)]
        again = submit_randomly(engine, [ChatRequest(msgs, sp), *crowd], seed=4)[0].result(120)
    assert [c.index for c in fin.choices] == [0, 1, 2]
    assert [c.token_ids for c in fin.choices] == want
    assert [c.token_ids for c in again.choices] == want  # seeded: the same whatever runs beside
    assert prefilled == fin.usage.prompt_tokens  # one prefill for the three
    assert fin.usage.completion_tokens == sum(len(w) for w in want)
    body = completion_body("id", "m", fin)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["index"] for c in finish_chunks("id", "m", 0, fin)[0]["choices"]] == [0]
    with SerialEngine(soft, EngineConfig(dtype="fp32")) as serial:
        sfin = serial.submit(ChatRequest(msgs, sp)).result(120)
    eos = set(stop_ids(soft.tokenizer, soft.config["template"]))
    assert [c.token_ids for c in sfin.choices] == [[t for t in w if t not in eos] for w in want]


def test_n_over_the_batch_is_refused(soft):
    with Engine(soft, EngineConfig(dtype="fp32", max_batch=2)) as engine:
        fin = engine.submit(ChatRequest(conversation(3), SamplingParams(n=3))).result(60)
    assert fin.finish_reason == "error" and fin.error.param == "n"


# ---- logprobs -------------------------------------------------------------------------------------
def sequence_logprob(loaded, messages, answer: list[int]) -> float:
    """The model run once on prompt + answer (fp32, no cache): the sum of log_softmax at the answer's
    tokens, over the distribution the sampler draws from at temperature 1 (suppressed tokens out)."""
    p = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, CTX)(messages, len(answer))
    batch = p.batch(loaded.tokenizer.pad_id)
    ids = torch.cat([batch["input_ids"], torch.tensor([answer])], 1)
    pos = batch["position_ids"]
    nxt = int(pos.max()) + 1
    extra = torch.arange(nxt, nxt + len(answer))[None]
    pos = torch.cat([pos, extra.expand(3, 1, -1) if pos.dim() == 3 else extra], -1)
    am = torch.ones_like(ids)
    with torch.no_grad():
        hidden = loaded.model(
            ids,
            pos,
            am,
            pixel_patches=batch.get("pixel_patches"),
            grid_thw=batch.get("grid_thw"),
            media_per_sample=batch.get("media_per_sample"),
            keys=batch.get("keys"),
        )
        logits = loaded.model.logits(hidden[0, -len(answer) - 1 : -1]).float()
    suppressed = list(loaded.tokenizer.structural_ids) + loaded.model.media_token_ids.tolist()
    logits[:, suppressed] = float("-inf")
    lp = torch.log_softmax(logits, -1)
    return float(lp[torch.arange(len(answer)), torch.tensor(answer)].sum())


@pytest.mark.parametrize("kind", ["continuous", "serial"])
def test_logprobs_sum_to_the_sequence_log_probability(soft, kind):
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=3, logprobs=True, top_logprobs=3)
    msgs = conversation(0)
    cls = Engine if kind == "continuous" else SerialEngine
    with cls(soft, EngineConfig(dtype="fp32")) as engine:
        handle = engine.submit(ChatRequest(msgs, sp))
        events = list(handle)
    fin = events[-1]
    eos = set(stop_ids(soft.tokenizer, soft.config["template"]))
    answer = [t for t in fin.token_ids if t not in eos]
    assert len(fin.logprobs) == len(answer) > 0
    want = sequence_logprob(soft, msgs, answer)
    assert abs(sum(e.logprob for e in fin.logprobs) - want) < 1e-3 * max(1.0, abs(want))
    streamed = [e for ev in events[:-1] for e in ev.logprobs]
    assert [e.logprob for e in streamed] == [e.logprob for e in fin.logprobs]
    for e in fin.logprobs:
        tops = [t.logprob for t in e.top]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0.0
        assert e.logprob <= tops[0] + 1e-6
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
    assert bytes(b for e in fin.logprobs for b in e.bytes).decode("utf-8", errors="replace") == fin.text


# ---- response_format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["continuous", "serial"])
def test_a_json_schema_answer_validates_even_from_a_random_model(soft, kind):
    cls = Engine if kind == "continuous" else SerialEngine
    cfg = EngineConfig(dtype="fp32", max_batch=4) if kind == "continuous" else EngineConfig(dtype="fp32")
    schema_rf = {"type": "json_schema", "schema": SCHEMA}
    object_rf = {"type": "json_object"}
    with cls(soft, cfg) as engine:
        reqs = [
            ChatRequest(conversation(i), SamplingParams(max_tokens=80, temperature=1.2, seed=i, response_format=rf))
            for i in range(4)
            for rf in (schema_rf, object_rf)
        ]
        fins = [h.result(120) for h in [engine.submit(r) for r in reqs]]
    for r, fin in zip(reqs, fins, strict=True):
        if r.sampling.response_format["type"] == "json_object":
            if fin.finish_reason == "stop":
                assert isinstance(json.loads(fin.text), dict)
            else:  # an unbounded object may run out of tokens: still a valid prefix
                assert fin.text.startswith("{")
            continue
        assert fin.finish_reason == "stop", fin.text
        jsonschema.validate(json.loads(fin.text), SCHEMA)


def test_the_grammar_is_the_same_in_the_engine_and_in_generate(soft):
    sp = SamplingParams(
        max_tokens=60, temperature=1.0, seed=8, response_format={"type": "json_schema", "schema": SCHEMA}
    )
    eos = stop_ids(soft.tokenizer, soft.config["template"])
    grammars = Grammars(soft.tokenizer, soft.model.decoder.vocab_size, eos)
    want = reference(soft, conversation(1), sp, constraint=grammars.constraint(sp.response_format))
    with Engine(soft, EngineConfig(dtype="fp32", max_batch=3)) as engine:
        crowd = [ChatRequest(conversation(i), SamplingParams(max_tokens=8, temperature=1.0)) for i in range(3)]
        got = submit_randomly(engine, [ChatRequest(conversation(1), sp), *crowd], seed=2)[0].result(120)
    assert got.token_ids == want
    jsonschema.validate(json.loads(got.text), SCHEMA)


# ---- refusals ----------------------------------------------------------------------------------------
BAD = {
    "presence_penalty": {"presence_penalty": 2.5},
    "frequency_penalty": {"frequency_penalty": -3},
    "repetition_penalty": {"repetition_penalty": 0},
    "top_k": {"top_k": -2},
    "min_p": {"min_p": 1.5},
    "n": {"n": 9},
    "top_logprobs": {"logprobs": True, "top_logprobs": 21},
    "logprobs": {"logprobs": "yes"},
    "response_format": {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
}
MORE_BAD = [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"n": 0}, "n"),
    ({"n": True}, "n"),
    ({"min_p": float("nan")}, "min_p"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
]


@pytest.mark.parametrize("fields,param", [*((v, k) for k, v in BAD.items()), *MORE_BAD])
def test_bad_values_are_refused_naming_the_parameter(fields, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, "m", MediaPolicy())
    assert e.value.status == 400 and e.value.param == param, str(e.value)


def test_check_sampling_refuses_the_same_for_direct_callers():
    for fields, param in [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"n": 9}, "n"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"response_format": {"type": "json_schema", "schema": {"type": "nonsense"}}}, "response_format"),
    ]:
        with pytest.raises(RequestError) as e:
            check_sampling(SamplingParams(**fields))
        assert e.value.param == param


def test_good_values_parse_into_the_sampling_params():
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}},
    }
    sp = parse_chat_request(body, "m", MediaPolicy()).request.sampling
    assert (sp.n, sp.logprobs, sp.top_logprobs, sp.top_k, sp.min_p) == (2, True, 2, 40, 0.05)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (-2.0, 2.0, 1.1)
    assert sp.response_format == {"type": "json_schema", "schema": SCHEMA}
    text = {**body, "response_format": {"type": "text"}, "logprobs": False, "top_logprobs": 0}
    assert parse_chat_request(text, "m", MediaPolicy()).request.sampling.response_format is None


def test_without_llguidance_a_response_format_is_one_clear_400(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as if not installed
    rf = {"type": "json_schema", "schema": {"type": "object", "properties": {"unique_to_this_test": {"type": "null"}}}}
    with pytest.raises(RequestError, match=r"pip install 'vlm\[structured\]'") as e:
        check_sampling(SamplingParams(response_format=rf))
    assert e.value.param == "response_format" and e.value.status == 400
