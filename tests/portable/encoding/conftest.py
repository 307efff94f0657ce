"""Shared fixtures for the encoding tests: the spec vectors and the tokenizers (loaded once)."""

import pytest

from dsv4.portable.encoding import Tokenizer, build_test_tokenizer, load_tokenizer

from .encoding_data import load_vectors


@pytest.fixture(scope="session")
def vectors():
    return load_vectors()


@pytest.fixture(scope="session")
def official():
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny():
    return Tokenizer(build_test_tokenizer(1024).to_str())
