"""Fixtures: the demo model, a live server on it, and a live server on the scripted stand-in
(see `server_helpers`)."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from .server_helpers import API_KEY, ScriptedModel, live  # noqa: E402

import dsv4  # noqa: E402
from dsv4.cli.server import build_app  # noqa: E402


@pytest.fixture(scope="session")
def demo_model():
    """The random-weight demo: its long, EOS-free outputs are what the batching and limit tests need."""
    return dsv4.load("demo-random", context=384)


@pytest.fixture(scope="session")
def demo_server(demo_model):
    """The demo model behind the full server (API key on, batching up to 8)."""
    with live(build_app(demo_model, model_name="demo", api_key=API_KEY, max_batch=8, prefill_chunk=64)) as url:
        yield url


@pytest.fixture(scope="session")
def scripted(demo_model):
    """(ScriptedModel, base URL) of a server backed by the scripted stand-in."""
    model = ScriptedModel(demo_model.tokenizer)
    with live(build_app(model, model_name="scripted", api_key=API_KEY)) as url:
        yield model, url


@pytest.fixture
def openai_client():
    openai = pytest.importorskip("openai")
    return lambda url: openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def anthropic_client():
    anthropic = pytest.importorskip("anthropic")
    return lambda url: anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)
