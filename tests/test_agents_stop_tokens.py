"""A reply that ends on another EOS of the model (Qwen's <|endoftext|>) is a finished reply."""

from __future__ import annotations

from envtune.agents.chat_tokens import ChatTokenizer
from envtune.agents.config import AgentConfig
from envtune.agents.engine import Completion, FinishReason, GenerateRequest
from envtune.agents.episode_loop import run_episode_sync
from envtune.environments import BfclEnvironment, EpisodeConfig, StepCode


def test_reply_ending_on_endoftext_is_parsed_not_a_format_error(tokenizer, chat: ChatTokenizer) -> None:
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext != chat.end_of_turn_id
    body = chat.encode_reply("<think>done</think><answer>ok</answer>")[:-1]
    stopped_on_eos = [*body, endoftext]

    assert chat.decode_reply(stopped_on_eos, stopped=True) == "<think>done</think><answer>ok</answer>"
    # cut by a length cap, the same ids are judged as written
    assert chat.decode_reply(stopped_on_eos, stopped=False).endswith("<|endoftext|>")

    def generate(request: GenerateRequest) -> list[Completion]:
        return [
            Completion(
                token_ids=tuple(stopped_on_eos),
                logprobs=(-1.0,) * len(stopped_on_eos),
                finish_reason=FinishReason.STOP,
                policy_version=0,
            )
        ]

    episode = BfclEnvironment().make_episode("multi_turn_base_0", EpisodeConfig(max_steps_per_turn=1))
    trajectory = run_episode_sync(
        generate, episode, chat, AgentConfig(), task_id="multi_turn_base_0", group_id="g"
    )
    assert StepCode.FORMAT_ERROR not in trajectory.step_codes
    assert set(trajectory.step_codes) <= {StepCode.TURN_FAIL, StepCode.TURN_PASS}
