"""One calculator round trip through the real `openai` client against the server on the shipped demo."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from ..cli.server.server_helpers import API_KEY, live  # noqa: E402

from dsv4.cli.server import build_app  # noqa: E402


def test_calculator_round_trip(demo, grader):
    corpus = grader.corpus
    with live(build_app(demo, model_name="demo", api_key=API_KEY, max_batch=4)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is 37 + 45?"}]
        first = client.chat.completions.create(model="demo", messages=messages, tools=corpus.TOOLS,
                                               temperature=0, max_tokens=48)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        call = choice.message.tool_calls[0]
        assert call.function.name == "calculator"
        assert corpus.calls_with(json.loads(call.function.arguments)["expression"], 37, 45)
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "82"}]
        second = client.chat.completions.create(model="demo", messages=messages, tools=corpus.TOOLS,
                                                temperature=0, max_tokens=24)
        assert second.choices[0].finish_reason == "stop"
        assert corpus.final_number(second.choices[0].message.content) == 82
