"""Off-policy guidance (LUFFY; Yan et al., 2025): a group in which no sample earns what the row's
reference reply earns trains on that reply in place of its last sample.

Why: group advantages are ``A_i = (r_i - mean r) / std r``, zero for every row of a group whose
rewards are equal.  A prompt the policy never solves in ``G`` samples therefore gives no gradient
however often it is drawn, and RL can only sharpen what sampling already finds.  With the reference
in the group (reward ``r* = 1``, the ``G - 1`` samples 0), the reference's tokens get
``A = (1 - 1/G) / std > 0`` and the wrong samples ``-1/G / std``: the update is the advantage-weighted
log-likelihood of the right reply, aimed only at the prompts the policy fails, next to the usual push
away from what it got wrong.  A group with a right sample is left as sampled.

How the reference is trained: as if the policy had sampled it.  Its old log-probs are the policy's
own (the ratio starts at 1 and the clip acts as on any row); LUFFY's policy shaping
``f(pi) = pi / (pi + gamma)`` is not applied.  It continues the very prompt the group saw: with its
``reasoning_content`` after a prompt that opened ``<think>``, without it after a closed block; a
left-truncated prompt, or a reference longer than ``--max_gen_len``, is not guided.  Single-turn
rows only (an agentic episode's turns depend on tool results no reference holds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from minimind.rl.data import PromptRow, reference_message
from minimind.rl.rollout import RolloutBatch, given_completions
from minimind.train.stages.rl_rollout import concat_rows, select_rows

__all__ = ["Scorer", "guide", "reference_completion"]

#: Scores replies: ``(prompt texts, replies, dataset rows, reply tokens) -> (rewards [N], parts {name: [N]})``.
Scorer = Callable[[list[str], list[str], list[int], list[int]], tuple[Tensor, dict[str, Tensor]]]


def reference_completion(tokenizer: Any, row: PromptRow, prompt_text: str,
                         prompt_ids: Sequence[int] | None = None) -> tuple[list[int], str] | None:
    """The token ids (through the stop token) and reply text by which ``row``'s reference continues
    ``prompt_text`` (tokenized as ``prompt_ids``, when the caller has them), or ``None`` when neither
    rendering of it (with or without reasoning) does."""
    message = reference_message(row.columns["reference"])
    eos = tokenizer.eos_token
    candidates = [message, {k: v for k, v in message.items() if k != "reasoning_content"}]
    for m in candidates:
        full = tokenizer.apply_chat_template([*row.messages, m], tools=row.tools, tokenize=False)
        if not full.startswith(prompt_text):
            continue
        reply = full[len(prompt_text):]
        cut = reply.find(eos)
        if cut < 0:
            continue
        prompt_ids = list(prompt_ids) if prompt_ids is not None else tokenizer.encode(prompt_text)
        full_ids = tokenizer.encode(prompt_text + reply[:cut + len(eos)])
        ids = (full_ids[len(prompt_ids):] if full_ids[:len(prompt_ids)] == prompt_ids
               else tokenizer.encode(reply[:cut + len(eos)]))
        return ids, reply[:cut]
    return None


def guide(tokenizer: Any, rows: Sequence[PromptRow], batch: RolloutBatch, prompt_ids: list[int],
          prompt_texts: list[str], rewards: Tensor, parts: dict[str, Tensor], group: int, max_len: int,
          score: Scorer) -> tuple[RolloutBatch, Tensor, dict[str, Tensor], list[int]]:
    """Put the reference of each group that misses it in place of the group's last sample.

    ``rows`` are the dataset's rows, ``prompt_ids[k]`` the one row ``k`` of ``batch`` sampled (groups
    of ``group`` contiguous rows).  Returns the batch, rewards and reward parts with the references
    in, and the rows that now hold a reference.
    """
    pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    todo: list[tuple[int, list[int], str]] = []  # (row to replace, completion ids, reply)
    for first in range(0, len(batch), group):
        row = rows[prompt_ids[first]]
        if "reference" not in row.columns:
            continue
        prompt = batch.input_ids[first, :int(batch.prompt_lengths[first])].tolist()
        found = reference_completion(tokenizer, row, prompt_texts[first], prompt)
        if found is not None and len(found[0]) <= max_len:
            todo.append((first + group - 1, *found))
    if not todo:
        return batch, rewards, parts, []
    ks = [k for k, _, _ in todo]
    ref_rewards, ref_parts = score([prompt_texts[k] for k in ks], [reply for _, _, reply in todo],
                                   [prompt_ids[k] for k in ks], [len(ids) for _, ids, _ in todo])
    won = [j for j, k in enumerate(ks)
           if ref_rewards[j] > rewards[k - group + 1:k + 1].max() + 1e-6]  # no sample earned as much
    if not won:
        return batch, rewards, parts, []
    prompts = [batch.input_ids[ks[j], :int(batch.prompt_lengths[ks[j]])].tolist() for j in won]
    refs = given_completions(prompts, [todo[j][1] for j in won], [todo[j][2] for j in won],
                             [int(batch.prompt_index[ks[j]]) for j in won], pad)
    order = list(range(len(batch)))
    for n, j in enumerate(won):
        order[ks[j]] = len(batch) + n
    batch = select_rows(concat_rows([batch, refs], pad), order)
    rewards, parts = rewards.clone(), {name: v.clone() for name, v in parts.items()}
    at, sel = torch.tensor([ks[j] for j in won]), torch.tensor(won)
    rewards[at] = ref_rewards.float().cpu()[sel]
    for name in parts:
        parts[name][at] = ref_parts[name].float().cpu()[sel]
    return batch, rewards, parts, [ks[j] for j in won]
