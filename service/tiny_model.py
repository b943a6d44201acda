"""Write a randomly initialised Qwen3-VL checkpoint with a working processor, fully offline.

    python -m service.tiny_model OUT_DIR                 # tiny (~0.3 M parameters): tests, CI
    python -m service.tiny_model OUT_DIR --shape 2b      # real Qwen3-VL-2B architecture, random weights
    python -m service.tiny_model OUT_DIR --fp8           # the same in the layout of Qwen's -FP8 checkpoints

The tokenizer is a byte-level BPE trained here with the `tokenizers` library on the few KB of text
below, wrapped as a Qwen2Tokenizer carrying Qwen's special tokens and Qwen3-VL's chat template; the
image processor is Qwen3-VL's (patch 16, merge 2). Real-size shapes put the special tokens at Qwen's
ids (``<|image_pad|>`` = 151655 ...), so tools that assume them (vLLM) accept the checkpoint too.
Deterministic: the same seed writes the same files.

``--fp8`` writes what Qwen publishes as Qwen/Qwen3-VL-*-FP8: the text decoder's linears as
float8_e4m3fn ``weight`` + float32 ``weight_scale_inv`` (amax / 448 per 128x128 block), every
other tensor bf16 under the same names, ``quantization_config`` {quant_method fp8, fmt e4m3,
weight_block_size [128, 128], activation_scheme dynamic, modules_to_not_convert: lm_head and the
vision tower's linears}; real sizes in shards with an index, as published.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.model_shapes import (
    QWEN_PLAIN_ADDED_TOKENS,
    QWEN_SPECIAL_BASE_ID,
    QWEN_SPECIAL_TOKENS,
    QWEN_VOCAB_SIZE,
    shape as model_shape,
)

CHAT_TEMPLATE_PATH = Path(__file__).with_name("qwen3_vl_chat_template.jinja")

_CORPUS = """\
A small camera sits on the window sill and looks at the street. Every morning it takes a picture of the
bakery across the road, the red bicycle leaning on the lamp post, and the people waiting for the tram.
The model reads the picture and writes a short caption: two cats on a wall, a dog under a bench, a
woman carrying flowers, a child with a yellow kite. Some days it rains and the colours are grey and blue;
other days the sun is low and everything looks orange and gold.
Describe the image. What is in this picture? How many people can you see? Read the text on the sign.
The answer should be short and clear. Count the objects from left to right, then top to bottom.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 20 32 64 100 128 256 512 1024 2048 4096 8192.
Punctuation and symbols: . , ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & % $ # @ ~ ^
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A graphics card with eight gigabytes of memory can hold a small vision language model, its cache
and one or two images at a time, if the service is careful with every buffer it allocates.
Requests arrive over HTTP, wait in a queue, and run together in a batch; each token is streamed back
as soon as it is ready. When a client goes away, its place in the batch is freed at once.
Le chat dort sur la chaise. Der Hund schlaeft unter dem Tisch. El sol brilla sobre el mar.
def caption(image): return model.generate(image, max_tokens=64)  # a line of code, for variety
{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "What is this?"}]}
"""


def build_tokenizer(*, qwen_ids: bool, vocab_size: int = 512):
    """A Qwen2Tokenizer whose BPE is trained on `_CORPUS`.

    qwen_ids: pad the vocabulary with unreachable filler entries so the special tokens land at
    Qwen's ids (151643 on); otherwise they follow the trained vocabulary directly.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    # Train with the exact pre-tokenizer Qwen2Tokenizer uses, so merges apply as trained.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    if qwen_ids:
        # No merge produces these multi-character entries, so the BPE never emits them.
        for i in range(len(vocab), QWEN_SPECIAL_BASE_ID):
            vocab[f"<|filler_{i}|>"] = i
    base = len(vocab)
    # Added tokens get fixed ids by sitting in the vocabulary first, in Qwen's order.
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS + QWEN_PLAIN_ADDED_TOKENS):
        vocab[token] = base + offset

    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges,
        unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS),
        model_max_length=262144,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED_TOKENS])
    tok.chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == base + offset, token
    return tok


def build_image_processor():
    """Qwen3-VL's image processor settings (the PIL backend works with or without torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 65536, "longest_edge": 16777216},
        patch_size=16, temporal_patch_size=2, merge_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


# Written as the published checkpoints have it, so that with torchvision installed AutoProcessor
# builds the whole Qwen3VLProcessor (video included), as it does for a real download.
_VIDEO_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}


def build_config(shape: str = "tiny", tokenizer=None):
    """A Qwen3VLConfig of `shape` whose token ids are `tokenizer`'s."""
    from transformers import Qwen3VLConfig

    spec = model_shape(shape)
    tok = tokenizer if tokenizer is not None else build_tokenizer(qwen_ids=shape != "tiny")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = spec["text_config"]
    if shape == "tiny":
        text["vocab_size"] = -(-len(tok) // 64) * 64  # round up: tidy matmuls
    else:
        text["vocab_size"] = QWEN_VOCAB_SIZE
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=None)
    return Qwen3VLConfig(
        text_config=text, vision_config=spec["vision_config"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_model(config, *, seed: int = 0, dtype=None, device: str | None = None):
    """A randomly initialised Qwen3VLForConditionalGeneration (weights created on `device`)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def generation_config(tokenizer):
    """Qwen3-VL Instruct's published sampling defaults; eos = <|im_end|> and <|endoftext|>."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
    )


def write_processor(out_dir: str | Path, tokenizer) -> None:
    """Tokenizer, image processor, video processor config and chat template files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    image_processor = build_image_processor()
    image_processor.save_pretrained(out)
    # Point AutoProcessor at Qwen3VLProcessor and keep the published class name.
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre.update(processor_class="Qwen3VLProcessor", image_processor_type="Qwen2VLImageProcessorFast")
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(_VIDEO_PREPROCESSOR_CONFIG, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2) + "\n")


def build_checkpoint(out_dir: str | Path, *, shape: str = "tiny", seed: int = 0, dtype=None,
                     device: str | None = None, fp8: bool = False, shard_bytes: int | None = None) -> Path:
    """Write config, random weights (safetensors), generation config and processor to `out_dir`.

    Tiny: float32 on the CPU. Real sizes: bfloat16; `device="cuda"` initialises the weights there (fast).
    `fp8`: Qwen's FP8 layout (see the module docstring), in shards of `shard_bytes` (default: one
    file for tiny, 4 GB for real sizes).
    """
    import torch

    out = Path(out_dir)
    tok = build_tokenizer(qwen_ids=shape != "tiny")
    config = build_config(shape, tok)
    if shape == "tiny":
        dtype = dtype or torch.float32
    model = build_model(config, seed=seed, dtype=dtype or torch.bfloat16, device=device)
    if shape == "tiny":
        _quiet_control_tokens(model, tok)
    model.generation_config = generation_config(tok)
    if fp8:
        write_fp8_checkpoint(model, out, shard_bytes if shard_bytes else (None if shape == "tiny" else 4 * 10**9))
    else:
        model.save_pretrained(out)
    write_processor(out, tok)
    _readable_by_all(out)
    return out


def _readable_by_all(folder: Path) -> None:
    """save_pretrained writes its weights readable by their owner only (0600); a checkpoint made to be
    served (`make up MODEL=<folder>` runs the service as another user in its container) is a+rX."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def write_fp8_checkpoint(model, out_dir: str | Path, shard_bytes: int | None = None) -> None:
    """``model``'s text decoder linears quantized blockwise to FP8, everything else bf16, written in
    Qwen's -FP8 layout (config with ``quantization_config``, safetensors, generation config)."""
    import torch
    from torch import nn

    from service.decode.fp8 import BLOCK, dequantize_gemm, decoder_linear_names, quantize_linears

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quantized = decoder_linear_names(model)
    kept = [name for name, module in model.named_modules() if type(module) is nn.Linear and name not in quantized]
    quantize_linears(model, quantized, dequantize_gemm)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    tensors = {}
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # tied to the embedding table: stored once, as in the published checkpoints
        if value.dtype == torch.float8_e4m3fn or key.endswith(".weight_scale_inv"):
            tensors[key] = value.contiguous().cpu()
        else:
            tensors[key] = value.to(torch.bfloat16).contiguous().cpu()
    _save_shards(tensors, out, shard_bytes)
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic",
        "modules_to_not_convert": sorted(kept)}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    model.generation_config.save_pretrained(out)


def _save_shards(tensors: dict, out: Path, shard_bytes: int | None) -> None:
    """One model.safetensors, or shards of about ``shard_bytes`` with model.safetensors.index.json."""
    from safetensors.torch import save_file

    if shard_bytes is None:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    shards, size = [{}], 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                      encoding="utf-8")


def _quiet_control_tokens(model, tokenizer) -> None:
    """Zero the output rows of added tokens in the tiny model.

    Random weights otherwise often pick <|im_end|> early; with these rows at zero their logit is 0
    while ordinary tokens spread wide, so tests see long outputs and end by length or stop string.
    """
    import torch

    ids = sorted(tokenizer.get_added_vocab().values())
    with torch.no_grad():
        model.lm_head.weight[ids] = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.tiny_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", default="tiny", help="tiny (default), 2b, 4b or 8b: architecture to build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="where to initialise the weights (e.g. cuda; default cpu)")
    parser.add_argument("--fp8", action="store_true",
                        help="Qwen's FP8 layout: the decoder's linears as float8_e4m3fn with 128x128 block scales")
    args = parser.parse_args(argv)
    out = build_checkpoint(args.out_dir, shape=args.shape, seed=args.seed, device=args.device, fp8=args.fp8)
    print(f"wrote a random-weight Qwen3-VL ({args.shape}{', FP8' if args.fp8 else ''}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
