"""The one prompt renderer: every stage turns a prompt into text and token ids here.

Generation (the ``transformers`` and ``vllm`` backends), training (:mod:`prefalign.data.tokenize`),
the reference log-probs (computed on the training tokens), the reward model
(:func:`prefalign.score.rm_model.encode_pairs`) and evaluation (sampling, held-out pairs, reference
text) all call :func:`render_prompt` / :func:`encode_prompt`, so a model is trained, scored and
evaluated on exactly the prompt tokens it was sampled with.

A prompt is a string (one user turn) or a list of chat messages ``{"role", "content"}``. Options:

* ``system``: a system message put first (unless the prompt already starts with one);
* ``control_token``: ADPO's control token (``[TOXIC]``), put at the start of the last user turn;
* ``prefill``: the opening of the assistant's answer; the rendered prompt ends inside that turn
  so the model continues it. A message list ending with an assistant message is continued the same
  way.

``mode`` (``chat_template: auto|always|never`` in the configs):

* ``auto``: the tokenizer's chat template with the generation prompt when it has one, else the
  plain-role fallback (:func:`render_plain`: ``User: ...\\nAssistant:``);
* ``always``: the chat template; a tokenizer without one is an error;
* ``never``: no chat template. A plain-string prompt is used as written (a base model's
  continuation, TRL's handling of string prompts); anything with roles (a message list, a system
  prompt, a prefill) is rendered in the plain-role format.

A chat template's text already carries its special tokens (``add_special_tokens=False``); other
text is encoded with the tokenizer's own (e.g. a BOS token).
"""

from __future__ import annotations

from typing import Literal, Sequence, Union

ChatTemplateMode = Literal["auto", "always", "never"]
CHAT_TEMPLATE_MODES: tuple[str, ...] = ("auto", "always", "never")

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Prompt = Union[str, Sequence[Message]]

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

__all__ = [
    "CHAT_TEMPLATE_MODES",
    "ChatTemplateMode",
    "PLAIN_ROLES",
    "as_conversation",
    "encode_prompt",
    "has_chat_template",
    "render_plain",
    "render_prompt",
    "uses_chat_template",
    "with_control_token",
]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer, mode: ChatTemplateMode = "auto") -> bool:
    """Whether ``mode`` renders with the tokenizer's chat template (``always`` without one: error)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template: {mode!r} is not one of {', '.join(CHAT_TEMPLATE_MODES)}")
    has = has_chat_template(tokenizer)
    if mode == "always" and not has:
        raise ValueError("chat_template: 'always' but the tokenizer has no chat template")
    return has and mode != "never"


def with_control_token(prompt: Prompt, token: str) -> Prompt:
    """``prompt`` with ``token`` at the start of its last user turn (of the text, for a string)."""
    if isinstance(prompt, str):
        return f"{token} {prompt}"
    messages = [dict(m) for m in prompt]
    for message in reversed(messages):
        if message["role"] == "user":
            message["content"] = f"{token} {message['content']}"
            break
    else:
        messages.append({"role": "user", "content": token})
    return messages


def as_conversation(prompt: Prompt, *, system: str | None = None, prefill: str | None = None,
                    control_token: str | None = None) -> list[Message]:
    """The chat messages of ``prompt`` with the options applied (a new list; ``prompt`` is not changed)."""
    if control_token:
        prompt = with_control_token(prompt, control_token)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if prefill is not None:
        messages.append({"role": "assistant", "content": prefill})
    if not messages:
        raise ValueError("the prompt has no messages")
    return messages


def render_plain(conversation: Sequence[Message]) -> str:
    """Plain-role rendering for tokenizers without a chat template: ``User: ...\\nAssistant:``.

    A conversation that ends with an assistant message is continued (no new ``Assistant:`` line).
    """
    lines = [f"{PLAIN_ROLES.get(m['role'], str(m['role']).capitalize())}: {m['content']}" for m in conversation]
    if conversation and conversation[-1]["role"] == "assistant":
        return "\n".join(lines)
    return "\n".join([*lines, "Assistant:"])


def _is_raw(prompt: Prompt, mode: str, system, prefill) -> bool:
    return mode == "never" and isinstance(prompt, str) and system is None and prefill is None


def render_prompt(tokenizer, prompt: Prompt, mode: ChatTemplateMode = "auto", *, system: str | None = None,
                  prefill: str | None = None, control_token: str | None = None) -> str:
    """The prompt text the model sees (see the module docstring for ``mode`` and the options)."""
    templated = uses_chat_template(tokenizer, mode)
    if _is_raw(prompt, mode, system, prefill):
        return with_control_token(prompt, control_token) if control_token else prompt
    messages = as_conversation(prompt, system=system, prefill=prefill, control_token=control_token)
    if not templated:
        return render_plain(messages)
    if messages[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: Prompt, mode: ChatTemplateMode = "auto", *, system: str | None = None,
                  prefill: str | None = None, control_token: str | None = None) -> list[int]:
    """Token ids of :func:`render_prompt` (a chat template's text already holds its special tokens)."""
    text = render_prompt(tokenizer, prompt, mode, system=system, prefill=prefill, control_token=control_token)
    return list(tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, mode))["input_ids"])


def encode_exchange(tokenizer, prompt: Prompt, response: str, mode: ChatTemplateMode = "auto") -> list[int]:
    """Token ids of a whole (prompt, response) exchange for a model that reads it at once (a reward
    model): exactly :func:`encode_prompt`'s ids, then the rest of the conversation with the response
    as the closed assistant turn (the chat template's closing tokens; plain text after a plain-role
    or raw prompt)."""
    prompt_ids = encode_prompt(tokenizer, prompt, mode)
    prompt_text = render_prompt(tokenizer, prompt, mode)
    if _is_raw(prompt, mode, None, None):
        rest = response
    else:
        messages = [*as_conversation(prompt), {"role": "assistant", "content": response}]
        if uses_chat_template(tokenizer, mode):
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            full = render_plain(messages)
        # A template that renders earlier turns differently once an answer follows (some strip
        # reasoning) does not extend the prompt text: then the response text alone follows.
        rest = full[len(prompt_text):] if full.startswith(prompt_text) else response
    return prompt_ids + list(tokenizer(rest, add_special_tokens=False)["input_ids"])
