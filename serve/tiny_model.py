"""A tiny Qwen2-architecture model with a BPE tokenizer trained on project text.

Used by the tests and demos: it loads through exactly the same code path as a
real checkpoint (`AutoModelForCausalLM` / `AutoTokenizer`, local files only)
and every backend accepts it. Weights are random (seeded), so its text is
noise, but token counts, chat templating, sampling and seeding are real.

Sizes: 2 layers, hidden 128, 4 heads of dim 32, 2 KV heads, MLP 256. The head
dim is 32 rather than 16 (hidden 64) because vLLM's attention kernels do not
support head size 16; the model is still ~0.5M parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

STEP_TEXT = """\
STeP (Streaming Tensor Programs) is a dataflow abstraction for reconfigurable
dataflow accelerators. A STeP program wires operators between streams. A stream
has an element type and a shape; dims are written innermost first, for example
dims: [K, N, M]. Element types are fp32, Buffer(fp32, [D]) and Multihot(fp32, E).
Every operator is written step.Op(params).apply(inputs) and returns a new stream.
E1 = step.Map(fn=f).apply(E0)
E2 = step.Accum(fn=add, b=1).apply(E1)
E3 = step.Scan(fn=add, b=1).apply(E2)
E4, E5 = step.Copy().apply(E3)
E6 = step.Zip().apply((E4, E5))
E7 = step.Bufferize(a=1).apply(E6)
E8 = step.Streamify().apply(E7)
E9 = step.Promote(b=0).apply(E8)
E10 = step.Repeat(n=K).apply(E9)
E11 = step.RepeatRef().apply((E10, E9))
E12 = step.Flatten(L=[1, 2]).apply(E11)
E13 = step.Reshape(L=[1], S=4).apply(E12)
parts = step.Partition(N=4).apply((E13, idx))
E14 = step.Merge(fn=add).apply((parts, idx))
The affine rule: every stream is consumed exactly once; insert Copy to reuse it.
Tasks give a structural IR with inputs, outputs and an impl; the verifier runs
the program on random inputs and compares with the reference in torch.
def impl(E0, E1):
    E2 = step.Zip().apply((E0, E1))
    E3 = step.Map(fn=mul).apply(E2)
    return step.Accum(fn=add, b=1).apply(E3)
"""

# The word-splitting regex of Qwen2's tokenizer: transformers rebuilds a qwen2
# model's tokenizer with it, so the BPE is trained on the same pieces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SUFFIXES = {".md", ".yaml", ".yml", ".txt", ".j2", ".jinja", ".tmpl"}
_TEMPLATE_DIRS = ("loop/agents/templates", "loop/agents/knowledge")
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "runs", "build", "dist", "node_modules"}
_MAX_FILE_BYTES = 200_000
_MAX_CORPUS_BYTES = 2_000_000


def package_root() -> Path:
    """The stepforge package directory (the repository root in a checkout)."""
    return Path(__file__).resolve().parent.parent


def corpus_files(root: Path) -> list[Path]:
    """Project text files to train the tokenizer on, in a stable order."""
    found: set[Path] = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(".") or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if not path.is_file():
            continue
        in_template_dir = any(str(rel.parent).startswith(d) for d in _TEMPLATE_DIRS)
        if path.suffix.lower() in _SUFFIXES or in_template_dir:
            found.add(path)
    return sorted(found)


def corpus_texts(root: Path | None = None) -> Iterator[str]:
    """The built-in STeP paragraph, then the project's own text files."""
    yield STEP_TEXT
    total = 0
    for path in corpus_files(root or package_root()):
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        if total > _MAX_CORPUS_BYTES:
            return
        yield text


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """Train a byte-level BPE `tokenizers.Tokenizer` with ChatML special tokens,
    splitting words the way Qwen2's tokenizer does (NFC, then its regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 2048, corpus_root: Path | None = None) -> Path:
    """Write a tiny random Qwen2 model and its tokenizer to `out_dir`; return the path."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw = train_tokenizer(corpus_texts(corpus_root), vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=16384,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)

    endoftext = raw.token_to_id("<|endoftext|>")
    im_end = raw.token_to_id("<|im_end|>")
    config = Qwen2Config(
        vocab_size=raw.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,  # rotary: a long context costs no weights; real prompts fit
        tie_word_embeddings=True,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    model.save_pretrained(out)
    return out


def _portable_tokenizer_config(out: Path) -> None:
    """Name the tokenizer class `Qwen2Tokenizer` and inline the chat template,
    so transformers 4.x (as shipped next to vLLM) loads it as well as 5.x."""
    import json

    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
