"""POST /tokenize and POST /detokenize with vLLM's request and response shapes (pure: no Ray, no web framework).

    /tokenize    {"prompt": text, "add_special_tokens"?, "return_token_strs"?}
                 or {"messages": [...], "add_generation_prompt"?, ...}  (laid out as chat completions do)
              -> {"count": n, "max_model_len": m, "tokens": [ids], "token_strs": [pieces] or null}
    /detokenize  {"tokens": [ids]} -> {"prompt": text}
    GET /tokenizer_info -> {"eos_token", "pad_token", "model_max_length", ...}  (what lm-evaluation-harness's
                 remote tokenizer reads)

Grok-1 prompts carry no special tokens (no BOS, as in the reference runner), so `add_special_tokens` adds
none either way: the ids are exactly what /v1/completions would run. A prompt that is exactly the EOS
token's text ("[EOS]") tokenizes as EOS's id, as Hugging Face tokenizers treat special tokens (clients find
the EOS id that way); inside a longer text it is plain text.
"""

from __future__ import annotations

from ingress import protocol
from ingress.errors import invalid
from ingress.fields import boolean, check_text, show

TOKENIZE_FIELDS = frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"})
TOKENIZE_CHAT_FIELDS = frozenset({"model", "messages", "add_special_tokens", "return_token_strs",
                                  "add_generation_prompt", "continue_final_message"})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})
GENERATION_PROMPT = "Assistant:"


def tokenize(body: dict, model: protocol.ModelInfo, tokenizer) -> dict:
    chat = "messages" in body
    protocol.check_fields(body, TOKENIZE_CHAT_FIELDS if chat else TOKENIZE_FIELDS, "/tokenize")
    protocol.check_model(body, model)
    boolean(body, "add_special_tokens")  # type-checked; there are none to add
    if chat:
        text = protocol.render_chat(body.get("messages"), model.max_prompt_chars)
        if not boolean(body, "add_generation_prompt", True) or boolean(body, "continue_final_message"):
            text = text[: -len(GENERATION_PROMPT)].rstrip("\n")
    else:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise invalid(f"prompt must be a string, got {show(text)}", "prompt")
        text = check_text(text, "prompt", model.max_prompt_chars)
    ids = [model.eos_token] if text == tokenizer.id_to_piece(model.eos_token) else tokenizer.encode(text)
    pieces = [tokenizer.id_to_piece(i) for i in ids] if boolean(body, "return_token_strs") else None
    return {"count": len(ids), "max_model_len": model.max_len, "tokens": ids, "token_strs": pieces}


def detokenize(body: dict, model: protocol.ModelInfo, tokenizer) -> dict:
    protocol.check_fields(body, DETOKENIZE_FIELDS, "/detokenize")
    protocol.check_model(body, model)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise invalid("tokens must be a list of token ids", "tokens")
    if len(ids) > model.max_len:
        raise invalid(f"at most {model.max_len} token ids, got {len(ids)}", "tokens")
    bad = [t for t in ids if not 0 <= t < model.vocab_size]
    if bad:
        raise invalid(f"token ids must be in [0, {model.vocab_size}), got {show(bad[:5])}", "tokens")
    return {"prompt": tokenizer.decode(ids)}


def tokenizer_info(model: protocol.ModelInfo, tokenizer) -> dict:
    """vLLM's GET /tokenizer_info, as far as a SentencePiece model has it (no chat template: see README)."""
    return {"tokenizer_class": "SentencePiece", "model_max_length": model.max_len,
            "vocab_size": model.vocab_size, "eos_token": tokenizer.id_to_piece(model.eos_token),
            "bos_token": None, "pad_token": None, "chat_template": None}
