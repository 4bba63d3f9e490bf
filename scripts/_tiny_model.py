"""A tiny, deterministic Llama-architecture model ("cube-tiny") for testing inference backends.

No model hub is reachable, so tests generate their model: random weights (uniform, from SHAKE-256
streams keyed by a fixed seed and each tensor's name, so independent of any RNG library) written
as safetensors by hand (fixed header layout), and a byte-level BPE tokenizer trained on a fixed,
sorted list of CPython stdlib sources, with a ChatML chat template.

Same interpreter stdlib + same `tokenizers` version => byte-identical files. Needs numpy and
tokenizers (both in the vLLM venv made by scripts/setup-vllm); the manifest helpers need only
the stdlib.

Manifest (cube-model.json): the SHA-256 of every other file and a combined digest,
"sha256:" + hex(SHA-256 of the concatenation, sorted by name, of b"<name>\\0<hex sha256>\\n").
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

NAME = "cube-tiny"
SEED = b"cube-tiny/v1"
MANIFEST = "cube-model.json"
MANIFEST_FORMAT = "cube-model/1"

VOCAB = 4096
HIDDEN = 64
HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 32: vLLM's CPU attention fails every request below 32
LAYERS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 2048

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
PAD_ID, IM_START_ID, IM_END_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the tokenizer: CPython stdlib modules, relative to sysconfig's "stdlib" path.
# Fixed and sorted, so the corpus (and so the tokenizer) depends only on the CPython release.
CORPUS_FILES = tuple(
    sorted(
        [
            "argparse.py",
            "bisect.py",
            "collections/__init__.py",
            "configparser.py",
            "csv.py",
            "dataclasses.py",
            "datetime.py",
            "difflib.py",
            "email/message.py",
            "enum.py",
            "fractions.py",
            "functools.py",
            "heapq.py",
            "http/client.py",
            "inspect.py",
            "json/decoder.py",
            "json/encoder.py",
            "logging/__init__.py",
            "pathlib.py",
            "pprint.py",
            "shutil.py",
            "statistics.py",
            "string.py",
            "subprocess.py",
            "textwrap.py",
            "threading.py",
            "tokenize.py",
            "typing.py",
            "unittest/case.py",
            "urllib/parse.py",
        ]
    )
)


def log(msg: str) -> None:
    print(f"make-tiny-model: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- manifest (stdlib only)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def combined_digest(files: Mapping[str, str]) -> str:
    """ "sha256:<hex>" over the sorted lines b"<name>\\0<sha256 hex>\\n"."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def model_files(directory: Path) -> list[str]:
    """Every regular file under `directory` (relative, '/'-separated) but the manifest."""
    out = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append(p.relative_to(directory).as_posix())
    return out


def verify(directory: Path) -> dict[str, Any]:
    """Check `directory` against its cube-model.json; returns the manifest or raises ValueError."""
    manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
    files: dict[str, str] = manifest["files"]
    if combined_digest(files) != manifest["digest"]:
        raise ValueError("manifest digest does not match its file list")
    present = model_files(directory)
    if sorted(files) != present:
        raise ValueError(f"files differ from manifest: {sorted(set(files) ^ set(present))}")
    for name, want in files.items():
        if sha256_file(directory / name) != want:
            raise ValueError(f"{name}: SHA-256 differs from manifest")
    return manifest


# ---------------------------------------------------------------- generation


def corpus() -> tuple[list[str], str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, h = [], hashlib.sha256()
    for rel in CORPUS_FILES:
        data = (root / rel).read_bytes()
        h.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        texts.append(data.decode("utf-8"))
    return texts, h.hexdigest()


def recipe(corpus_sha256: str) -> dict[str, str]:
    """Everything the output depends on; equal recipe + intact files => nothing to do."""
    import numpy
    import tokenizers

    return {
        "generator_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "seed": SEED.decode(),
        "corpus": "CPython stdlib: " + " ".join(CORPUS_FILES),
        "corpus_sha256": corpus_sha256,
        "python": sys.version.split()[0],
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }


def config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": PAD_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": PAD_ID,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": False,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "rms_norm_eps": 1e-06,
        # Both spellings: transformers 5 reads rope_parameters, older tools read rope_theta.
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def tensor_specs() -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, shape, std); std None means a norm weight (all ones)."""
    h, i, v = HIDDEN, INTERMEDIATE, VOCAB
    specs: list[tuple[str, tuple[int, ...], float | None]] = [
        ("model.embed_tokens.weight", (v, h), 1.0),
        ("model.norm.weight", (h,), None),
        ("lm_head.weight", (v, h), h**-0.5),
    ]
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        specs += [
            (p + "input_layernorm.weight", (h,), None),
            (p + "post_attention_layernorm.weight", (h,), None),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, h), h**-0.5),
            (p + "self_attn.k_proj.weight", (HEADS * HEAD_DIM, h), h**-0.5),
            (p + "self_attn.v_proj.weight", (HEADS * HEAD_DIM, h), h**-0.5),
            (p + "self_attn.o_proj.weight", (h, HEADS * HEAD_DIM), h**-0.5),
            (p + "mlp.gate_proj.weight", (i, h), h**-0.5),
            (p + "mlp.up_proj.weight", (i, h), h**-0.5),
            (p + "mlp.down_proj.weight", (h, i), i**-0.5),
        ]
    return specs


def weights() -> dict[str, Any]:
    """Uniform weights with the given std, from SHAKE-256(seed, name): exact, platform-free."""
    import numpy as np

    out = {}
    for name, shape, std in tensor_specs():
        n = 1
        for d in shape:
            n *= d
        if std is None:
            out[name] = np.ones(shape, dtype="<f4")
            continue
        raw = hashlib.shake_256(SEED + b"\0" + name.encode()).digest(4 * n)
        u = np.frombuffer(raw, dtype="<u4") >> np.uint32(8)  # 24 random bits
        x = u.astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)  # exact, in [-1, 1)
        out[name] = (x * np.float32(std * 3.0**0.5)).astype("<f4").reshape(shape)
    return out


def write_safetensors(path: Path, tensors: Mapping[str, Any]) -> None:
    """safetensors by hand: sorted names, compact JSON header space-padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name]
        data = t.astype("<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    hdr = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    hdr += b" " * (-len(hdr) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for blob in blobs:
            f.write(blob)


def train_tokenizer(texts: Iterable[str]) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, want {VOCAB}")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} is not id {i}")
    return tok


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_POSITIONS,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }


def dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def generate(out: Path, texts: list[str], rec: Mapping[str, str]) -> dict[str, Any]:
    t0 = time.monotonic()
    tok = train_tokenizer(texts)
    t1 = time.monotonic()
    log(f"trained byte-level BPE ({VOCAB} tokens) in {t1 - t0:.2f}s")
    tok.save(str(out / "tokenizer.json"), pretty=True)
    dump_json(out / "tokenizer_config.json", tokenizer_config())
    dump_json(
        out / "special_tokens_map.json",
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        },
    )
    dump_json(out / "config.json", config())
    dump_json(
        out / "generation_config.json",
        {"bos_token_id": PAD_ID, "eos_token_id": IM_END_ID, "pad_token_id": PAD_ID},
    )
    ws = weights()
    write_safetensors(out / "model.safetensors", ws)
    n_params = sum(int(w.size) for w in ws.values())
    log(f"wrote {n_params} float32 weights in {time.monotonic() - t1:.2f}s")
    files = {name: sha256_file(out / name) for name in model_files(out)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": NAME,
        "architecture": "LlamaForCausalLM",
        "parameters": n_params,
        "files": files,
        "digest": combined_digest(files),
        "recipe": dict(rec),
    }
    dump_json(out / MANIFEST, manifest)
    return manifest


def make(out: Path) -> dict[str, Any]:
    """Create the model in `out`; do nothing when `out` already holds exactly these files."""
    texts, corpus_sha = corpus()
    rec = recipe(corpus_sha)
    if (out / MANIFEST).is_file():
        try:
            old = verify(out)
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
            log(f"{out}: regenerating ({e})")
        else:
            if old.get("recipe") == rec and old.get("name") == NAME:
                log(f"{out}: up to date ({old['digest']})")
                return old
            log(f"{out}: recipe changed, regenerating")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cube-tiny-", dir=out.parent) as tmp:
        manifest = generate(Path(tmp), texts, rec)
        foreign = set(model_files(out)) - set(manifest["files"])
        if foreign:
            raise SystemExit(
                f"make-tiny-model: {out} holds files that are not the model's: "
                f"{', '.join(sorted(foreign))}; use an empty or new directory"
            )
        (out / MANIFEST).unlink(missing_ok=True)  # no manifest while files are being replaced
        for name in [*manifest["files"], MANIFEST]:  # the manifest last
            os.replace(Path(tmp) / name, out / name)
    log(f"{out}: {manifest['digest']}")
    return manifest


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: make-tiny-model OUTPUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    manifest = make(out)
    print(manifest["digest"])
    return 0
