"""The llama.cpp reference of the decode benchmark: its subprocess protocol against a stand-in
llama_cpp module (the real one compiles llama.cpp, too slow for the tests), and its errors."""

from __future__ import annotations

import sys

import pytest

from dsf_runtime.benchmarks.llamacpp import LlamaCppError, time_llama_cpp

FAKE = """
__version__ = "0.0-test"
import time
calls = []

class Llama:
    def __init__(self, model_path, n_threads, n_threads_batch, n_ctx, n_batch, verbose):
        assert model_path.endswith(".gguf") and n_threads == n_threads_batch == 2 and n_ctx >= 12
        self.n = 0

    def reset(self):
        self.n = 0

    def eval(self, ids):
        assert all(isinstance(i, int) for i in ids)
        self.n += len(ids)
        time.sleep(0.001 * len(ids))

    def sample(self, temp):
        assert temp == 0.0
        return 7
"""


def test_times_prompt_and_generation_in_the_given_interpreter(tmp_path, monkeypatch):
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    res = time_llama_cpp(str(tmp_path / "m.gguf"), [5, 6, 7, 8], gen_tokens=3, threads=2, repeats=2)
    assert res["version"] == "0.0-test"
    assert 0 < res["pp_tok_s"] < 1100 and 0 < res["tg_tok_s"] < 1100  # each token sleeps 1 ms


def test_says_what_is_missing(tmp_path):
    with pytest.raises(LlamaCppError, match="has no llama_cpp: pip install llama-cpp-python"):
        time_llama_cpp(str(tmp_path / "m.gguf"), [1, 2], 2, 1, python=sys.executable)
    with pytest.raises(LlamaCppError, match="cannot run llama.cpp through"):
        time_llama_cpp(str(tmp_path / "m.gguf"), [1, 2], 2, 1, python=str(tmp_path / "no-python"))
