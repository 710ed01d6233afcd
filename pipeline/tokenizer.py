"""umT5's SentencePiece tokenizer, applied the way the official Wan pipeline applies it.

Wan tokenizes with the Hugging Face T5 tokenizer over the umT5 SentencePiece unigram model, after a
'whitespace' cleaning of the prompt: no BOS, `</s>` appended, padding with id 0, truncation to 512 tokens that
keeps the `</s>`. The same model travels in three forms, all read here: a `spiece.model` file, a tokenizer
folder (Hugging Face `google/umt5-xxl` layout), and the `spiece_model` uint8 tensor inside ComfyUI's
text-encoder files. We run SentencePiece directly, which gives the same ids as the T5 tokenizer without
depending on transformers.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import sentencepiece
import torch

MAX_LENGTH = 512  # the official text_len: Wan's DiT attends to at most 512 text rows

SPIECE_FILE = "spiece.model"
# Where a tokenizer folder may keep the model: itself, a diffusers repo's tokenizer/, or the official Wan
# checkpoint folder, which ships the Hugging Face tokenizer as google/umt5-xxl/.
_FOLDER_CANDIDATES = (SPIECE_FILE, f"tokenizer/{SPIECE_FILE}", f"google/umt5-xxl/{SPIECE_FILE}")


def clean_prompt(text: str) -> str:
    """The official `clean='whitespace'` cleaning without ftfy: HTML entities unescaped (twice, as Wan does,
    so that `&amp;lt;` also resolves), surrounding whitespace stripped and inner runs collapsed to one space."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """Prompts -> padded umT5 token ids and attention mask."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor):
        if processor.eos_id() < 0:
            raise ValueError(
                "this SentencePiece model defines no end-of-sequence piece; the umT5 encoder needs one "
                "(`</s>`, id 1). Use the spiece.model that belongs to the text encoder (google/umt5-xxl).")
        self.processor = processor
        self.eos_id: int = processor.eos_id()
        # T5 models define <pad> as id 0; a model without a pad piece still pads with 0 (masked anyway).
        self.pad_id: int = processor.pad_id() if processor.pad_id() >= 0 else 0
        self.unk_id: int = processor.unk_id()
        self.vocab_size: int = processor.get_piece_size()

    @classmethod
    def from_bytes(cls, model_proto) -> "Tokenizer":
        """From the serialised SentencePiece `ModelProto`: bytes, or the uint8 tensor `spiece_model` that
        ComfyUI stores inside its umT5 text-encoder files."""
        if isinstance(model_proto, torch.Tensor):
            model_proto = model_proto.detach().cpu().contiguous().numpy().tobytes()
        data = bytes(model_proto)
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"these {len(data)} bytes are not a SentencePiece model ({e}); expected the contents of a "
                "spiece.model file, e.g. the `spiece_model` tensor of a ComfyUI umt5_xxl file") from None
        return cls(processor)

    @classmethod
    def from_path(cls, path: str | Path) -> "Tokenizer":
        """From a `spiece.model` file, or a folder holding one (itself, in `tokenizer/`, or in `google/umt5-xxl/`)."""
        path = Path(path)
        if path.is_dir():
            found = next((path / c for c in _FOLDER_CANDIDATES if (path / c).is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"no {SPIECE_FILE} in the folder {path} (looked for {', '.join(_FOLDER_CANDIDATES)}); point "
                    f"to the umT5 tokenizer folder (google/umt5-xxl) or to its {SPIECE_FILE} file")
            path = found
        elif not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} is neither a {SPIECE_FILE} file nor a folder")
        return cls.from_bytes(path.read_bytes())

    def tokenize(self, text: str, max_length: int = MAX_LENGTH) -> list[int]:
        """Ids of one prompt: cleaned, encoded, truncated to `max_length` including the EOS, which stays last."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for the EOS), got {max_length}")
        ids = self.processor.encode(clean_prompt(text), out_type=int)
        return ids[:max_length - 1] + [self.eos_id]

    def __call__(self, texts: str | list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """`ids` and `mask`, both int64 [B, L], right-padded to the longest prompt (pad id, mask 0)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("no prompts to tokenize: pass a list with at least one string")
        rows = [self.tokenize(t, max_length) for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask

    def unknown_words(self, text: str) -> list[str]:
        """Words of the cleaned prompt that the vocabulary can only represent with the unk id, in order,
        each once. The encoder sees such a word as `<unk>`, so it has no effect on the video."""
        words: list[str] = []
        for word in clean_prompt(text).split(" "):
            if word and word not in words and self.unk_id in self.processor.encode(word, out_type=int):
                words.append(word)
        return words
