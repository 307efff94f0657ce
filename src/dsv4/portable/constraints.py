"""Constrained decoding: forced DSML tool calls and JSON replies, as token masks from llguidance.

A `Constraint` says, before each sampled token, which ids may come next (`mask()`), and is told the
token that was sampled (`accept`).  The sampler sets the logits of the other ids to -inf; a mask that
allows EOS means the reply may end there, and `finished` means it has ended.  `fork()` copies the state
for n > 1.  `build_constraint` makes one from the `OutputRule` the request mapping produced:

* a forced tool call (OpenAI `tool_choice: "required"` or a named function, Anthropic `any` or a named
  tool): the reply is a DSML block, `\\n\\n<｜DSML｜tool_calls>` … `</｜DSML｜tool_calls>`, exactly as the
  encoder renders history calls (spec §3.7), with one invoke per call (several only if parallel calls
  are allowed).  Each parameter is written as the model was trained to write it: a plain string property
  (or a string enum) as raw text with `string="true"`, any other as compact JSON with `string="false"`,
  valid under that property's own schema (the root's `$defs` travel with it, so `$ref`s resolve).
  Properties come in schema order; required ones must be there, optional ones may be left out,
  undeclared ones are not offered.  So the arguments validate against the tool's schema.
* a JSON reply (`response_format` `json_object` / `json_schema`): the content is one JSON value valid
  under the schema; tools offered with `tool_choice: "auto"` stay possible as the alternative.
In thinking mode the reasoning comes first, free text up to the `</think>` token (without `</think>`,
`<think>` or `｜DSML｜` as text, which the strict parser refuses there); in chat mode the generation
prompt already ends with `</think>` and the constrained part starts at once.  JSON is written in the
encoder's style (`", "` and `": "` separators, no other whitespace), which also keeps a random-weight
model from padding a value with endless whitespace.  A reply cut off by max_tokens is simply unfinished:
the engine ends it with "length", never as complete.

Why llguidance (`benchmarks/constraints.py`, figures in `benchmarks/results/constraints.json`; official V4
tokenizer, 129,280 ids, a shared CPU): of the three candidates it is the only one that states the
tool-call format as the model writes it.  Its Lark grammars name token ids (`<[128825]>`), so the DSML and
`</think>` markup is forced as the control tokens the model was trained on, not as look-alike text; they
embed a JSON schema per parameter (`%json{…}`); and they intersect and complement terminals (`&`, `~`),
which is how "raw text up to the first `</｜DSML｜parameter>`" is said exactly.  Its JSON-schema coverage
held for `$ref`/`$defs`, enums, anyOf, numeric bounds, string lengths and nested objects and arrays.  It
costs 0.6 s once per tokenizer (cached here), ~1 ms per grammar and 0.07–0.17 ms per token for a mask,
far below a decode step.  outlines-core compiles one regular expression per request (markup would match
as text, not as the control token) and took 1.1 s to index a small schema and 0.4–1.4 ms per token.
xgrammar masks as fast (0.06–0.15 ms per token with the bool mask, 0.03 s per schema), but its grammars
name text, not token ids, so the markup would be matched as characters the tokenizer can also spell
with ordinary tokens, and it needs torch to import, far too heavy for the `serve` extra.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from .encoding.errors import RequestError
from .encoding.requests import OutputRule
from .encoding.tokens import (DSML, INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN, THINK_CLOSE, THINK_OPEN,
                              TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN)

NL = "\n"
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# A string property whose schema says no more than this is raw text (string="true").
_PLAIN_STRING_KEYS = {"type", "description", "title", "default", "examples", "enum"}
# What a tool's parameter schema may hold at its top level; anything else (anyOf, patternProperties,
# minProperties, ...) constrains the arguments as a whole, which a per-parameter grammar cannot check.
_TOP_LEVEL_KEYS = {"type", "properties", "required", "additionalProperties", "description", "title",
                   "$defs", "definitions", "$schema", "$id", "$comment", "default", "examples", "strict"}
_ANY_TEXT = r"(.|\n)*"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise RequestError("constrained output (a forced tool_choice, response_format) needs llguidance: "
                           "install dsv4[serve]") from None
    return llguidance


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer):
    """The llguidance view of `tokenizer`; ~0.7 s to build for V4's vocabulary, so one per tokenizer."""
    return _llguidance().LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size,
                                     eos_token=tokenizer.eos_id)


class Constraint:
    """An llguidance matcher behind the sampler's constraint protocol (module docstring)."""

    def __init__(self, matcher, vocab_size: int, known: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._known = min(known, vocab_size)       # ids the tokenizer has; the rest is padding

    def mask(self) -> np.ndarray:
        """Allowed next ids over the model's vocabulary; ids past the tokenizer's (padding) never are."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        out = np.zeros(self.vocab_size, dtype=bool)
        out[:self._known] = np.unpackbits(bits, count=self._known, bitorder="little")
        return out

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"constrained decoding: token {token_id} is outside the grammar "
                             f"({self._matcher.get_error() or 'not allowed here'})")

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()

    def fork(self) -> "Constraint":
        return Constraint(self._matcher.deep_copy(), self.vocab_size, self._known)


def build_constraint(rule: OutputRule, tokenizer, vocab_size: int, thinking_mode: str) -> Constraint:
    """The constraint for `rule` over a model of `vocab_size` ids.  A schema it cannot enforce (an
    unsupported keyword, a bad `$ref`) is a RequestError naming the request field."""
    llg = _llguidance()
    lark = grammar(rule, tokenizer, thinking=thinking_mode == "thinking")
    matcher = llg.LLMatcher(_ll_tokenizer(tokenizer), llg.LLMatcher.grammar_from_lark(lark), log_level=0)
    if matcher.is_error():
        param = "tools" if rule.forced else "response_format"
        reason = matcher.get_error().splitlines()[0].split("failed to compile JSON schema: ")[-1]
        raise RequestError(f"{param}: this schema cannot be enforced: {reason}", param)
    return Constraint(matcher, vocab_size, tokenizer.vocab_size)


def grammar(rule: OutputRule, tokenizer, thinking: bool) -> str:
    """The Lark grammar (llguidance dialect) of the replies `rule` allows."""
    return _Lark(tokenizer).grammar(rule, thinking)


def _literal(text: str) -> str:
    """A Lark string literal (Lark reads JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _regex(text: str) -> str:
    """`text` as literal characters inside a Lark /regex/."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$/-" else ("\\n" if c == NL else c) for c in text)


def _q(text: str) -> str:
    return f'"{text}"'


class _Lark:
    """Writes the grammar of one `OutputRule`; each piece becomes a rule with a fresh name.

    Every piece of the DSML block that a newline follows ends with that newline, so no literal starts
    with one: llguidance reads terminals greedily, and a lone "\\n" before "<…" would be taken for the
    start of "\\n</…" and never given back."""

    def __init__(self, tokenizer):
        self._dsml = f"<[{tokenizer.special_ids['dsml']}]>"
        self._think_close = f"<[{tokenizer.special_ids['think_close']}]>"
        self._rules: list = []

    def grammar(self, rule: OutputRule, thinking: bool) -> str:
        answers = []
        if rule.schema is not None and not rule.forced:
            answers.append(self._json(rule.schema))
        if rule.tools:
            answers.append(self._tool_calls(rule))
        body = " | ".join(answers)
        if thinking:
            banned = "|".join(_regex(t) for t in (THINK_CLOSE, THINK_OPEN, DSML))
            reasoning = self._add(f"/{_ANY_TEXT}/ & ~/{_ANY_TEXT}({banned}){_ANY_TEXT}/", terminal=True)
            body = f"{reasoning} {self._think_close} ({body})"
        return "\n".join([f"start: {body}", *self._rules]) + "\n"

    def _add(self, body: str, terminal: bool = False) -> str:
        """A new rule (a terminal, named in capitals, where the body uses `&` or `~`); its name."""
        name = f"{'T' if terminal else 'r'}{len(self._rules)}"
        self._rules.append(f"{name}: {body}")
        return name

    def _markup(self, text: str) -> str:
        """DSML markup: each `｜DSML｜` as the control token, the text between as literals."""
        parts = []
        for k, chunk in enumerate(text.split(DSML)):
            if k:
                parts.append(self._dsml)
            if chunk:
                parts.append(_literal(chunk))
        return " ".join(parts)

    def _json(self, schema: dict) -> str:
        return self._add("%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False))

    # ------------------------------------------------------------ the tool_calls block
    def _tool_calls(self, rule: OutputRule) -> str:
        invoke = self._add(" | ".join(self._invoke(tool, f"tools[{i}]") for i, tool in enumerate(rule.tools)))
        calls = f"{invoke}+" if rule.parallel else invoke
        return self._add(f"{self._markup(NL * 2 + TOOL_CALLS_OPEN + NL)} {calls} {self._markup(TOOL_CALLS_CLOSE)}")

    def _invoke(self, function: dict, where: str) -> str:
        """One invoke of `function`: header, parameters, close (and the newline after it)."""
        schema = function.get("parameters") or {}
        properties, required, defs = _parameter_schemas(schema, where)
        _check_name(function["name"], where)
        params = [(self._parameter(key, sub, defs, f"{where} parameter"), key in required)
                  for key, sub in properties.items()]
        head = " ".join([self._markup(INVOKE_OPEN + ' name="'), _literal(function["name"]), _literal('">' + NL)])
        return self._add(f"{head} {self._params(params)} {self._markup(INVOKE_CLOSE + NL)}")

    def _params(self, params: list) -> str:
        """The parameters in order, optional ones possibly missing.  `first` reads from parameter i on
        with none written yet, `rest` after one was; with none at all the encoder writes one more
        newline (`">\\n\\n</｜DSML｜invoke>`)."""
        first, rest = _literal(NL), ""
        for rule, required in reversed(params):
            first = self._add(f"{rule} {rest}" if required else f"{rule} {rest} | {first}")
            rest = self._add(f"{rule} {rest}" if required else f"{rule}? {rest}")
        return first

    def _parameter(self, key: str, schema: dict, defs: dict, where: str) -> str:
        _check_name(key, where)
        raw = _raw_string(schema)
        close = self._markup(PARAM_CLOSE + NL)
        if raw is None:
            value = f"{self._json({**schema, **defs})} {close}"
        elif raw:
            value = "(" + " | ".join(_literal(v) for v in raw) + f") {close}"
        else:
            value = f"{self._raw_text()} {_literal(NL)}"
        flag = "false" if raw is None else "true"
        return self._add(f"{self._markup(PARAM_OPEN)} {_literal(f' name={_q(key)} string={_q(flag)}>')} {value}")

    def _raw_text(self) -> str:
        """Raw text and its `</｜DSML｜parameter>` as one terminal: text without `/｜DSML｜parameter` (where
        the parser would end the value).  The close is inside because a terminal read greedily would
        otherwise swallow it."""
        end = _regex("/" + DSML + "parameter")
        return self._add(f"/{_ANY_TEXT}{_regex(PARAM_CLOSE)}/ & ~/{_ANY_TEXT}{end}{_ANY_TEXT}{end}{_ANY_TEXT}/",
                         terminal=True)


def _parameter_schemas(schema: dict, where: str) -> tuple:
    """(property -> schema, required names, the root's `$defs`/`definitions`) of a parameter schema,
    refused when it is not a plain object schema a per-parameter grammar can enforce."""
    extra = sorted(set(schema) - _TOP_LEVEL_KEYS)
    if extra:
        raise RequestError(f"{where}: {extra[0]!r} at the top of the parameter schema cannot be enforced on "
                           "a forced tool call", "tools")
    declared = schema.get("properties") or {}
    required = schema.get("required") or []
    if not isinstance(declared, dict) or not all(isinstance(s, (dict, bool)) for s in declared.values()):
        raise RequestError(f"{where}: the parameter schema's properties must be an object of schemas", "tools")
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise RequestError(f"{where}: the parameter schema's required must be a list of names", "tools")
    properties = {key: {} if sub is True else {"not": {}} if sub is False else sub
                  for key, sub in declared.items() if sub is not False or key in required}
    properties.update({key: {} for key in required if key not in properties})
    return properties, set(required), {k: schema[k] for k in ("$defs", "definitions") if k in schema}


def _check_name(name: str, where: str) -> None:
    """DSML has no escaping: a `"` or a newline in a name would end its attribute early."""
    if '"' in name or NL in name:
        raise RequestError(f"{where}: the name {name!r} holds a quote or a newline, which DSML cannot "
                           "write", "tools")


def _raw_string(schema: dict):
    """How a property is written: None (JSON, string="false"), [] (any raw text) or its allowed values
    (raw text, one of them)."""
    if schema.get("type") != "string" or not set(schema) <= _PLAIN_STRING_KEYS:
        return None
    enum = schema.get("enum")
    if enum is None:
        return []
    return enum if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum) else None
