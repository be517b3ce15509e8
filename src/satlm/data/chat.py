"""Tokenizing SFT conversations: the tokenizer's chat template or satlm's builtin one, and which tokens carry the
loss (the trained assistant turns' spans)."""

from __future__ import annotations

import re


from ..errors import DataError, ModelLoadError
from .packing import IGNORE_INDEX, _wrap_ids



def ensure_pad_token(tokenizer) -> None:
    """Padding needs an id; a tokenizer without a pad token pads with EOS, else UNK (masked out of attention
    and loss, so which token pads does not matter)."""
    if tokenizer.pad_token_id is not None:
        return
    fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if fallback is None:
        raise ModelLoadError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'this model'!r} has no "
                             "pad, eos or unk token to pad sft batches with; set pad_token in its "
                             "tokenizer_config.json")
    tokenizer.pad_token = fallback



def _builtin_segments(messages: list[dict], tokenizer) -> list[tuple[str | list[int], bool]]:
    """### System / ### Instruction / ### Response, each response followed by EOS."""
    head, tail = _wrap_ids(tokenizer)
    segments: list[tuple[str | list[int], bool]] = [(head, False)] if head else []
    for m in messages:
        if m["role"] == "assistant":
            trained = m.get("train", True)
            segments += [("### Response:\n", False), (m["content"], trained), (tail, trained), ("\n\n", False)]
        else:
            title = "System" if m["role"] == "system" else "Instruction"
            segments.append((f"### {title}:\n{m['content']}\n\n", False))
    return segments


GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = "SATLM-PROBE-7f3a"  # an answer no real data holds, to read the template's end-of-turn text


def _render(tokenizer, messages: list[dict], where: str, **kw):
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(msgs, **kw)
    except Exception as e:  # jinja raises its own errors (roles must alternate, ...)
        raise DataError(f"{where}: the tokenizer's chat template rejected this example: {e}") from None


def _end_of_turn(tokenizer) -> str:
    """The text the template puts right after an assistant answer (ChatML: <|im_end|>), trained with it, so
    the model learns to stop; read once per tokenizer from a probe conversation."""
    cached = getattr(tokenizer, "_satlm_end_of_turn", None)
    if cached is None:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": PROBE}], tokenize=False)
            cached = text[text.index(PROBE) + len(PROBE):].rstrip() if PROBE in text else ""
        except Exception:  # a template that needs more than one user turn: no end-of-turn text then
            cached = ""
        try:
            tokenizer._satlm_end_of_turn = cached
        except AttributeError:
            pass
    return cached


def _answer_in(text: str, content: str, pos: int) -> tuple[int, int] | None:
    """Where the template put this answer, searching from pos: as given, or, for templates that drop an earlier
    turn's reasoning, the part after its last </think>."""
    for candidate in (content, content.rsplit("</think>", 1)[-1].strip() if "</think>" in content else None):
        if candidate:
            at = text.find(candidate, pos)
            if at >= 0:
                return at, at + len(candidate)
    return None


def _chat_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered once by the chat template, and the character spans that carry the loss: each
    trained assistant answer where the template put it (found in order, so an answer that repeats an earlier
    message is not matched there), with the end-of-turn text that follows it. Whatever the template adds
    (default system prompts, dates, reasoning dropped from earlier turns) is in the text, untrained."""
    text = _render(tokenizer, messages, where, tokenize=False)
    end_mark = _end_of_turn(tokenizer)
    spans, pos = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        if not content:
            continue
        found = _answer_in(text, content, pos)
        if found is None:
            if m["role"] == "assistant" and m.get("train", True):
                raise DataError(f"{where}: the chat template does not render assistant turn {i} as its content, "
                                "so its trained tokens cannot be found; set data.template=builtin")
            continue
        start, pos = found
        if m["role"] == "assistant":
            if end_mark and text.startswith(end_mark, pos):
                pos += len(end_mark)
            if m.get("train", True):
                spans.append((start, pos))
    return text, spans


def _generation_marked(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """Templates with {% generation %} marks: transformers' assistant mask, one run of marked tokens per
    assistant turn, so turns that are not trained (data.train_on) are unmarked again."""
    out = _render(tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    answers = [m for m in messages if m["role"] == "assistant" and m["content"]]
    if len(runs) != len(answers):
        raise DataError(f"{where}: the chat template marks {len(runs)} generation spans for {len(answers)} "
                        "assistant turns; set data.template=builtin")
    for start, m in zip(runs, answers):
        if not m.get("train", True):
            i = start
            while i < len(mask) and mask[i]:
                mask[i] = False
                i += 1
    return ids, mask


def _chat_tokens(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """(token ids, which tokens are trained) of one conversation, the template rendered once."""
    if GENERATION_MARK.search(tokenizer.chat_template or ""):
        return _generation_marked(messages, tokenizer, where)
    text, spans = _chat_spans(messages, tokenizer, where)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: data.template=chat needs a fast tokenizer (character offsets); "
                        "set data.template=builtin")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s < e_span and e > s_span for s_span, e_span in spans) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def uses_chat_template(tokenizer, template: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise DataError("data.template=chat, but the tokenizer has no chat template; use auto or builtin")
    return template == "chat" or (template == "auto" and has)


def _encode(messages: list[dict], tokenizer, seq_len: int, chat: bool, where: str) -> tuple[dict | None, bool]:
    """(example truncated to seq_len, or None when no response token is left; whether truncation lost response
    tokens; losing only the untrained text after the last response does not count)."""
    later = False  # builtin: a trained segment left untokenized past seq_len
    if chat:
        ids, trained = _chat_tokens(messages, tokenizer, where)
    else:  # the builtin format: segments, tokenized one by one and not past seq_len (a huge example costs little)
        ids, trained = [], []
        segments = _builtin_segments(messages, tokenizer)
        for k, (part, train) in enumerate(segments):
            part_ids = part if isinstance(part, list) else tokenizer(part, add_special_tokens=False)["input_ids"]
            ids += part_ids
            trained += [train] * len(part_ids)
            if len(ids) > seq_len:
                later = any(t for _, t in segments[k + 1:])
                break
    cut = later or any(trained[seq_len:])
    ids, trained = ids[:seq_len], trained[:seq_len]
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        return None, cut
    return {"input_ids": ids, "labels": labels}, cut


def encode_conversation(messages: list[dict], tokenizer, seq_len: int, chat: bool, where: str = "example",
                        truncation: str = "truncate"):
    """{'input_ids', 'labels'} (lists, truncated to seq_len), or None when truncation leaves no response token.
    truncation='error': a DataError naming `where` for an example longer than seq_len instead."""
    example, cut = _encode(messages, tokenizer, seq_len, chat, where)
    if cut and truncation == "error":
        raise _too_long(where, seq_len)
    return example


def _too_long(where: str, seq_len: int) -> DataError:
    return DataError(f"{where}: example is longer than seq_len={seq_len} tokens (data.truncation=error); "
                     "raise seq_len, shorten the example or set data.truncation=truncate")


