"""Per-request `draft_tokens` and `dsv4 serve --draft-tokens`: the same greedy answer as without drafts,
batched, with the drafted/accepted counts as a usage extension field in every API; bad values are 400s."""

import concurrent.futures

import httpx
import pytest

import dsv4
from dsv4.cli.server import build_app

from ..cli_helpers import error_line
from .server_helpers import API_KEY, live, serve_configs

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    model = dsv4.load(tiny_dir, context=512)
    with live(build_app(model, model_name="tiny", api_key=API_KEY, max_batch=4, prefill_chunk=64)) as url:
        yield url


def _completion(client, prompt, k, **kw):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, **kw}
    if k is not None:
        body["draft_tokens"] = k
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_with_drafts_match_plain_and_batch(tiny_server):
    prompts = ["river lamp orbit", "violet cedar", "pixel harbor maple quartz"]
    with httpx.Client(base_url=tiny_server, headers=HEADERS, timeout=120) as client:
        plain = [_completion(client, p, 0) for p in prompts]
        assert all("speculative" not in r["usage"] for r in plain)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:       # decoded together, drafting
            spec = list(pool.map(lambda p: _completion(client, p, 2), prompts))
    for a, b in zip(plain, spec):
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
        ext = b["usage"]["speculative"]
        assert ext["drafted_tokens"] > 0 and 0 <= ext["accepted_tokens"] <= ext["drafted_tokens"]


def test_anthropic_and_responses_usage_carry_the_counts(tiny_server):
    with httpx.Client(base_url=tiny_server, headers=HEADERS, timeout=120) as client:
        r = client.post("/v1/messages", json={"model": "tiny", "max_tokens": 8, "draft_tokens": 1,
                                              "messages": [{"role": "user", "content": "ember maple"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["speculative"]["drafted_tokens"] > 0
        r = client.post("/v1/responses", json={"model": "tiny", "input": "ember maple", "max_output_tokens": 8,
                                               "temperature": 0, "draft_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["speculative"]["drafted_tokens"] > 0


@pytest.mark.parametrize("value, why", [(8, "must be an integer in [0, 7]"), ("two", "must be of type integer")])
def test_bad_draft_tokens_is_a_400(tiny_server, value, why):
    with httpx.Client(base_url=tiny_server, headers=HEADERS, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "draft_tokens": value})
    assert r.status_code == 400 and why in r.json()["error"]["message"]


def test_serve_flag_sets_the_engine_default(dsv4_cli, tiny_dir, monkeypatch):
    model = dsv4.load(tiny_dir, context=512)
    run, configs = serve_configs(dsv4_cli, model, monkeypatch)
    assert run("--draft-tokens", "3").exit_code == 0
    assert configs[-1].app.state.server.engine.draft_tokens == 3
    assert run().exit_code == 0 and configs[-1].app.state.server.engine.draft_tokens is None
    r = dsv4_cli("serve", "--draft-tokens", "9")
    assert r.exit_code == 2 and error_line(r) == "error: --draft-tokens must be in 0..7, got 9"
