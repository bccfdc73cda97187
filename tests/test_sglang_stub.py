"""The stub SGLang server in its own process, through the real ``SGLangClient`` over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from envtune.agents.engine import EngineError, FinishReason, GenerateRequest, SamplingParams
from envtune.runtime.engines.settings import SGLangClientConfig
from envtune.runtime.engines.sglang_client import SGLangClient
from envtune.runtime.testing.sglang_stub import ScriptedReply, stub_process, write_script

REPLIES = {
    "ep": [
        ScriptedReply((11, 12, 2), (-0.5, -0.25, -0.125), "ab"),
        ScriptedReply((13, 14, 15, 16), (-1.0, -2.0, -3.0, -4.0), "cdef", "length"),
    ]
}
DEFAULT = ScriptedReply((7, 2), (-0.75, -0.5), "x")


@pytest.fixture(scope="module")
def stub_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("stub") / "script.json"
    write_script(path, REPLIES, default=DEFAULT)
    with stub_process(path) as url:
        yield url


def request(key: str, **sampling: int) -> GenerateRequest:
    return GenerateRequest((1, 2, 3), SamplingParams(max_new_tokens=64, **sampling), affinity_key=key)


async def test_the_client_gets_the_scripted_replies_in_order(stub_url: str) -> None:
    async with SGLangClient(SGLangClientConfig(urls=(stub_url,))) as client:
        (first,) = await client.generate(request("run1|ep"))
        (second,) = await client.generate(request("run1|ep"))
        (third,) = await client.generate(request("run1|ep"))  # past the script: the default
        (again,) = await client.generate(request("run2|ep"))  # another run tag starts over
    assert first.token_ids == (11, 12, 2) and first.logprobs == (-0.5, -0.25, -0.125)
    assert first.finish_reason is FinishReason.STOP and first.prompt_tokens == 3
    assert second.token_ids == (13, 14, 15, 16) and second.finish_reason is FinishReason.LENGTH
    assert third.token_ids == DEFAULT.ids
    assert again.token_ids == first.token_ids


async def test_max_new_tokens_cuts_a_reply_and_n_gives_several(stub_url: str) -> None:
    async with SGLangClient(SGLangClientConfig(urls=(stub_url,))) as client:
        (cut,) = await client.generate(
            GenerateRequest((1,), SamplingParams(max_new_tokens=2), affinity_key="cut|ep")
        )
        many = await client.generate(request("many|ep", n=2))
    assert cut.token_ids == (11, 12) and cut.finish_reason is FinishReason.LENGTH
    assert [c.token_ids for c in many] == [REPLIES["ep"][0].ids, REPLIES["ep"][1].ids]


def test_malformed_bodies_are_http_400(stub_url: str) -> None:
    def post(body: object) -> tuple[int, str]:
        data = json.dumps(body).encode()
        req = urllib.request.Request(stub_url + "/generate", data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert post({"input_ids": [], "sampling_params": {}})[0] == 400
    assert post({"input_ids": [1, "x"]})[0] == 400
    assert post({"input_ids": [1], "sampling_params": {"n": 0}})[0] == 400
    assert post([1, 2])[0] == 400
    status, text = post({"input_ids": [1], "routing_key": "r|ep"})
    assert status == 200 and "output_token_logprobs" not in text  # return_logprob defaults to false


async def test_an_unknown_key_without_default_is_a_client_error(tmp_path: Path) -> None:
    path = tmp_path / "script.json"
    write_script(path, REPLIES)
    with stub_process(path) as url:
        async with SGLangClient(SGLangClientConfig(urls=(url,))) as client:
            with pytest.raises(EngineError, match="no scripted reply") as error:
                await client.generate(request("r|missing"))
    assert error.value.retryable is False


def test_a_reply_needs_one_logprob_per_id() -> None:
    with pytest.raises(ValueError):
        ScriptedReply((1, 2), (-1.0,), "x")
    with pytest.raises(ValueError):
        ScriptedReply((1,), (-1.0,), "x", "eos")
