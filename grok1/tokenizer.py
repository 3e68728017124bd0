"""The Grok-1 SentencePiece tokenizer (131,072 pieces), resolved from config, environment or ../shared.

The model file is Apache-2.0 but large and not ours to ship: it is never committed. Lookup order:
1. an explicit path (the config's `tokenizer:` key or a command-line flag),
2. `$GROK1_TOKENIZER`,
3. `../shared/grok-1/tokenizer.model` beside the project checkout,
4. `tokenizer.model` inside the checkpoint directory (where `grok1 checkpoint` tools place it).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "GROK1_TOKENIZER"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_TOKENIZER = PROJECT_ROOT.parent / "shared" / "grok-1" / "tokenizer.model"
WHERE_TO_GET_IT = (
    "The Grok-1 tokenizer.model ships with the open weights (github.com/xai-org/grok-1, file "
    "tokenizer.model, Apache-2.0). Put it at ../shared/grok-1/tokenizer.model, set $GROK1_TOKENIZER to its "
    "path, or set `tokenizer:` in the config."
)


class TokenizerNotFound(FileNotFoundError):
    pass


def resolve_tokenizer_path(explicit: str | os.PathLike | None = None,
                           checkpoint_dir: str | os.PathLike | None = None) -> Path:
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("the config/flag", Path(explicit).expanduser()))
    if os.environ.get(ENV_VAR):
        candidates.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()))
    candidates.append(("the shared folder", SHARED_TOKENIZER))
    if checkpoint_dir:
        candidates.append(("the checkpoint folder", Path(checkpoint_dir) / "tokenizer.model"))
    for _, path in candidates:
        if path.is_file():
            return path
    tried = "; ".join(f"{source}: {path}" for source, path in candidates)
    raise TokenizerNotFound(f"Grok-1 tokenizer not found (tried {tried}). {WHERE_TO_GET_IT}")


class Tokenizer:
    """Text <-> token ids. No BOS is added, as in the reference's runner."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        self.path = Path(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.vocab_size()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id()

    @classmethod
    def load(cls, explicit=None, checkpoint_dir=None) -> "Tokenizer":
        return cls(resolve_tokenizer_path(explicit, checkpoint_dir))

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def sentencepiece(self):
        """The SentencePiece processor (grok1/grammar.py reads the pieces' kinds from it)."""
        return self._sp

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))
