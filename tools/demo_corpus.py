"""The demo model's task: integer arithmetic conversations in the exact V4 chat encoding.

Why a module of its own: the training script (`train_demo.py`), the evaluation (`benchmarks/demo_eval.py`)
and the tests (`tests/demo/`) must agree on what a problem is, how it is asked and what counts as a right
answer; each imports this file.

Problems: `A + B` and `A - B` for 0 ≤ A, B ≤ 99 and `A * B` for 0 ≤ A, B ≤ 12, asked in several phrasings.
Three ways to answer, all rendered by the project's own `encode_messages`:

* chat mode: the answer restates the problem and states the number ("37 + 45 = 82.");
* thinking mode: a short worked reasoning in the think block (units, then tens, then their sum; the V4
  tokenizer makes every number up to 999 one token, so each step is a small table), then the answer;
* with the `calculator` tool offered: a DSML tool call whose `expression` is the problem, and after the
  tool result message the answer built from it.

Plus a few identity turns, and multi-turn conversations (earlier turns in the history).
"""

from __future__ import annotations

import random
import re

CALCULATOR = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an integer arithmetic expression with +, - or *.",
    "parameters": {"type": "object",
                   "properties": {"expression": {"type": "string", "description": "for example 37 + 45"}},
                   "required": ["expression"]}}}
TOOLS = [CALCULATOR]

PHRASES = {
    "+": ["What is {a} + {b}?", "Compute {a}+{b}.", "{a} plus {b}?", "What's {a} plus {b}?",
          "Calculate {a} + {b}.", "How much is {a} + {b}?", "Add {a} and {b}."],
    "-": ["What is {a} - {b}?", "Compute {a}-{b}.", "{a} minus {b}?", "What's {a} minus {b}?",
          "Calculate {a} - {b}.", "How much is {a} - {b}?", "Subtract {b} from {a}."],
    "*": ["What is {a} times {b}?", "Compute {a}*{b}.", "{a} times {b}?", "What's {a} * {b}?",
          "Calculate {a} * {b}.", "How much is {a} times {b}?", "Multiply {a} by {b}."],
}
LIMIT = {"+": 99, "-": 99, "*": 12}

IDENTITY_Q = ["Who are you?", "What are you?", "Hello!", "Hi", "What can you do?", "Introduce yourself."]
IDENTITY_A = ("I am the dsv4 demo model, a tiny DeepSeek V4 trained on arithmetic. Ask me to add, subtract "
              "or multiply integers, for example: What is 37 + 45?")
IDENTITY_R = "The user wants to know who I am."
TOOL_R = "I will use the calculator."


def solve(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def expression(op: str, a: int, b: int) -> str:
    return f"{a} {op} {b}"


def answer(op: str, a: int, b: int) -> str:
    return f"{expression(op, a, b)} = {solve(op, a, b)}."


def reasoning(op: str, a: int, b: int) -> str:
    """Units, tens, then their sum (for + and -); a multiplication-table fact for *."""
    if op == "*":
        return f"{a} times {b} is {a * b}."
    ta, ua, tb, ub = a // 10 * 10, a % 10, b // 10 * 10, b % 10
    u, t = solve(op, ua, ub), solve(op, ta, tb)
    return f"{ua} {op} {ub} = {u}. {ta} {op} {tb} = {t}. {t} + {u} = {t + u}."


def sample_problem(rng: random.Random) -> tuple:
    op = rng.choices("+-*", weights=(4, 4, 1))[0]
    return op, rng.randint(0, LIMIT[op]), rng.randint(0, LIMIT[op])


def question(rng: random.Random, op: str, a: int, b: int) -> str:
    return rng.choice(PHRASES[op]).format(a=a, b=b)


def tool_call(op: str, a: int, b: int) -> dict:
    import json
    return {"type": "function", "function": {"name": "calculator",
                                             "arguments": json.dumps({"expression": expression(op, a, b)})}}


def turn(rng: random.Random, mode: str, tools: bool, identity: bool = False) -> list:
    """One user turn and the assistant's full reply (tool call, tool result and answer with `tools`)."""
    if identity:
        r = {"reasoning_content": IDENTITY_R} if mode == "thinking" else {}
        return [{"role": "user", "content": rng.choice(IDENTITY_Q)}, {"role": "assistant", "content": IDENTITY_A, **r}]
    op, a, b = sample_problem(rng)
    user = {"role": "user", "content": question(rng, op, a, b)}
    if tools:
        r = {"reasoning_content": TOOL_R} if mode == "thinking" else {}
        return [user, {"role": "assistant", "content": "", "tool_calls": [tool_call(op, a, b)], **r},
                {"role": "tool", "content": str(solve(op, a, b))},
                {"role": "assistant", "content": answer(op, a, b)}]
    r = {"reasoning_content": reasoning(op, a, b)} if mode == "thinking" else {}
    return [user, {"role": "assistant", "content": answer(op, a, b), **r}]


def conversation(rng: random.Random) -> tuple:
    """(messages, thinking_mode, tools or None): one to three turns, the last one the trained case."""
    mode = rng.choices(["chat", "thinking"], weights=(5, 4))[0]
    tools = TOOLS if rng.random() < 0.01 else None     # the tools prompt is long: rare keeps training cheap
    msgs = []
    for _ in range(rng.choices([0, 1, 2], weights=(16, 3, 1))[0]):          # history turns
        msgs += turn(rng, mode, tools is not None, identity=rng.random() < 0.05)
    msgs += turn(rng, mode, tools is not None, identity=rng.random() < 0.04)
    return msgs, mode, tools


# ---------------------------------------------------------------------- grading
_INT = re.compile(r"-?\d+")


def final_number(text: str):
    """The last integer in `text` (the stated answer), or None."""
    found = _INT.findall(text or "")
    return int(found[-1]) if found else None


def calls_with(call_args: str, a: int, b: int) -> bool:
    """A calculator call's arguments name both operands."""
    nums = [int(x) for x in re.findall(r"\d+", call_args or "")]
    return a in nums and b in nums
