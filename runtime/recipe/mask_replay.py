"""Replay the grammar masks a reply was sampled under, for the learner (constrained decoding).

Under constrained decoding the engine samples each token from ``softmax(masked(logits) / T)``: before
every token, an xgrammar matcher that has accepted the reply so far fills a bitmask of the allowed
tokens, and the logits of the others become -inf. The behaviour logprobs are therefore logprobs of the
masked, renormalised policy; the learner must take its policy, reference and entropy under the same
masks (``optim.logprobs``), or the ratio is off by the unmasked mass of the allowed tokens (the
median behaviour weight was 0.005 on BFCL episodes with the tiny model).

The masks are a pure function of (grammar, tokenizer, sampled ids), so they are not stored with the
trajectory: the trajectory records which constraint each reply was sampled under, and
``MaskReplayer`` rebuilds the masks token by token, just before the learner needs them. To be
bit-identical to the embedded engine (``runtime/engines/embedded.py``) it builds the xgrammar
``TokenizerInfo`` the same way (the model's vocabulary size, the model's EOS ids as stop tokens),
compiles each constraint kind with the same compiler call and runs a fresh ``GrammarMatcher`` per
reply: ``fill_next_token_bitmask`` then ``accept_token`` for every sampled token. An SGLang server
compiles with its own ``TokenizerInfo``; pass the stop ids it uses (its model's EOS ids).

Masks are int32 [tokens, ceil(vocab/32)] tensors in xgrammar's layout (token t allowed iff bit t % 32
of word t // 32 is set), what ``optim.Learner.step(token_masks=...)`` reads; rows of -1 mark tokens
sampled without a constraint. Imports: stdlib at module level; xgrammar and torch inside functions.

Deliberately left out: recording constraints in trajectories and calling the replay from the learner
actor (the runtime's side), jump-forward decoding (neither engine uses it).
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol


class ConstraintLike(Protocol):
    """What a reply was sampled under: the engine's ``Constraint`` (kind and grammar text)."""

    @property
    def kind(self) -> str: ...

    @property
    def grammar(self) -> str: ...


class ReplayError(ValueError):
    """The sampled ids do not fit the grammar (wrong constraint recorded, or misaligned replies)."""


def loss_runs(loss_mask: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of sampled tokens: one per reply in an episode-loop trajectory
    (replies are always separated by environment tokens)."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, sampled in enumerate(loss_mask):
        if sampled and start is None:
            start = i
        elif not sampled and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(loss_mask)))
    return runs


class MaskReplayer:
    """Rebuilds per-token grammar masks; thread-safe (the learner may call it from its worker thread)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], *, cache_size: int = 256
    ) -> None:
        """``tokenizer``: the HF tokenizer the engine uses; ``vocab_size``: the model's (logits width);
        ``stop_token_ids``: the engine's EOS ids (what its xgrammar ``TokenizerInfo`` was built with)."""
        import xgrammar

        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self._cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, engine: Any) -> MaskReplayer:
        """A replayer matching an ``EmbeddedEngine`` (its tokenizer, vocabulary and EOS ids)."""
        return cls(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)

    @property
    def words(self) -> int:
        """Int32 words per mask row."""
        return (self.vocab_size + 31) // 32

    def compile(self, constraint: ConstraintLike) -> Any:
        """The xgrammar ``CompiledGrammar`` (LRU-cached by kind and text), compiled as the engine does."""
        key = (str(constraint.kind), constraint.grammar)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        compiled = self._compile(str(constraint.kind), constraint.grammar)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: str, text: str) -> Any:
        # Same calls as EmbeddedEngine._compile (one shared function once the engine contract moves).
        import xgrammar

        match kind:
            case "ebnf":
                return self._compiler.compile_grammar(text)
            case "json_schema":
                return self._compiler.compile_json_schema(text)
            case "regex":
                return self._compiler.compile_regex(text)
            case "structural_tag":
                spec = json.loads(text)
                if isinstance(spec, dict) and "structures" in spec:
                    items = [
                        xgrammar.StructuralTagItem(
                            begin=item["begin"], schema=json.dumps(item["schema"]), end=item["end"]
                        )
                        for item in spec["structures"]
                    ]
                    return self._compiler.compile_structural_tag(items, spec["triggers"])
                return self._compiler.compile_structural_tag(text)
        raise ReplayError(f"unknown constraint kind {kind!r}")

    def reply_masks(self, constraint: ConstraintLike, token_ids: Sequence[int]) -> Any:
        """[len(token_ids), words] int32 masks: row i = the tokens allowed before ``token_ids[i]``."""
        import xgrammar

        matcher = xgrammar.GrammarMatcher(self.compile(constraint))
        masks = xgrammar.allocate_token_bitmask(len(token_ids), self.vocab_size)
        for i, token in enumerate(token_ids):
            if matcher.is_terminated():
                raise ReplayError(f"token {i} of {len(token_ids)} comes after the grammar ended")
            matcher.fill_next_token_bitmask(masks, i)
            if not matcher.accept_token(int(token)):
                raise ReplayError(f"token {i} (id {token}) is not allowed by the grammar at that point")
        return masks

    def trajectory_masks(
        self,
        loss_mask: Sequence[bool],
        token_ids: Sequence[int],
        constraints: Sequence[ConstraintLike | None],
    ) -> Any:
        """Masks of a trajectory's sampled tokens, in order, from the constraint of each reply.

        ``constraints[k]`` is what reply k (the k-th run of sampled tokens) was sampled under, None for
        an unconstrained reply (its rows are -1). Returns None when no reply was constrained (the
        learner then skips masking altogether).
        """
        import torch

        runs = loss_runs(loss_mask)
        if len(runs) != len(constraints):
            raise ReplayError(f"{len(constraints)} constraints recorded for {len(runs)} replies")
        if all(c is None for c in constraints):
            return None
        parts = []
        for (start, end), constraint in zip(runs, constraints, strict=True):
            if constraint is None:
                parts.append(torch.full((end - start, self.words), -1, dtype=torch.int32))
            else:
                parts.append(self.reply_masks(constraint, token_ids[start:end]))
        return torch.cat(parts)

    def mask_source(
        self,
        trajectories: Sequence[Any],
        constraints: Sequence[Sequence[ConstraintLike | None]],
    ) -> Callable[[int], Any]:
        """A ``token_masks`` callable for ``Learner.step(trajectories, token_masks=...)``: masks of
        trajectory i, replayed when the learner asks (per micro-batch), none kept afterwards."""
        if len(trajectories) != len(constraints):
            raise ValueError(f"{len(constraints)} constraint lists for {len(trajectories)} trajectories")

        def source(i: int) -> Any:
            t = trajectories[i]
            return self.trajectory_masks(t.loss_mask, t.token_ids, constraints[i])

        return source
