"""Random-weight, Llama-shaped GGUF files for benchmarks.

`bastion bench weights` needs 1B- and 7B-sized checkpoints to measure memory and
throughput at realistic sizes; downloading them is slow and not always possible. This
writes a GGUF with the llama.cpp tensor layout of a chosen shape, weights drawn from
N(0, 0.02) (norms all ones) and quantized with gguf-py, and the tokenizer (vocabulary,
merges, special ids, chat template) copied from the embedded SmolLM2 GGUF, so the file
loads and serves like a real model; its outputs are of course gibberish.

Tensors are streamed: every tensor's info is declared first (only shapes and byte
sizes), then each one is generated, quantized, written and dropped, so a 7B file needs
well under 1 GB of RAM beyond the tokenizer. Same seed, same file.

    python -m bastion.bench.gguf_gen --shape 1b --qtype Q4_0 --out /tmp/random-1b-Q4_0.gguf
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: dict[str, dict[str, int]] = {
    "smol": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3},  # SmolLM2-135M
    "1b": {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8},  # ~1.2B
    "7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32},  # Llama-2-7B
}
QTYPES = ("Q4_0", "Q4_1", "Q8_0", "F16")
_CHUNK_VALUES = 1 << 24  # floats generated at once (64 MB), so the 7B embedding is chunked too


def _tensor_plan(s: dict[str, int], vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(llama.cpp name, numpy shape [out_features, in_features]) in file order."""
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    yield "token_embd.weight", (vocab, h)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (h,)
        yield p + "attn_q.weight", (s["heads"] * hd, h)
        yield p + "attn_k.weight", (s["kv_heads"] * hd, h)
        yield p + "attn_v.weight", (s["kv_heads"] * hd, h)
        yield p + "attn_output.weight", (h, s["heads"] * hd)
        yield p + "ffn_norm.weight", (h,)
        yield p + "ffn_gate.weight", (s["intermediate"], h)
        yield p + "ffn_up.weight", (s["intermediate"], h)
        yield p + "ffn_down.weight", (h, s["intermediate"])
    yield "output_norm.weight", (h,)
    yield "output.weight", (vocab, h)


def _encode(shape: tuple[int, ...], qt: Any, rng: np.random.Generator | None,
            ) -> tuple[np.ndarray, np.dtype[Any], tuple[int, ...], int]:
    """(data or an empty placeholder when rng is None, dtype, stored shape, nbytes)."""
    import gguf

    if len(shape) == 1:  # norms: F32 ones
        return np.ones(shape, np.float32), np.dtype(np.float32), shape, 4 * shape[0]
    if qt == gguf.GGMLQuantizationType.F16:
        out_dtype, out_shape = np.dtype(np.float16), shape
    else:
        out_dtype, out_shape = np.dtype(np.uint8), tuple(gguf.quants.quant_shape_to_byte_shape(shape, qt))
    nbytes = int(np.prod(out_shape)) * out_dtype.itemsize
    if rng is None:
        return np.empty(0, out_dtype), out_dtype, out_shape, nbytes
    out = np.empty(out_shape, out_dtype)
    rows = max(1, _CHUNK_VALUES // shape[1])
    for r in range(0, shape[0], rows):
        x = rng.standard_normal((min(rows, shape[0] - r), shape[1]), dtype=np.float32)
        x *= 0.02
        out[r:r + len(x)] = gguf.quants.quantize(x, qt)
    return out, out_dtype, out_shape, nbytes


def write_random_gguf(path: str | Path, shape: str | dict[str, int] = "1b", qtype: str = "Q4_0", seed: int = 0,
                      context_length: int = 4096, show_progress: bool = True) -> Path:
    """Write a random-weight Llama GGUF of `shape` (a SHAPES key or a dict like its values)
    with matrices in `qtype` (QTYPES) to `path`; returns the path. Written to a .part
    file first and renamed, so an interrupted run leaves no truncated model behind."""
    import gguf
    from tqdm import tqdm

    from bastion.engine.models.loader import embedded_model_path

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    label = shape if isinstance(shape, str) else "custom"
    s = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    if s["hidden"] % s["heads"] or s["heads"] % s["kv_heads"]:
        raise ValueError(f"hidden must divide by heads and heads by kv_heads: {s}")
    qt = gguf.GGMLQuantizationType[qtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")

    reader = gguf.GGUFReader(str(embedded_model_path()))
    tok_fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    vocab = len(tok_fields["tokenizer.ggml.tokens"].data)

    w = gguf.GGUFWriter(part, "llama")
    w.add_name(f"random-llama-{label}-{qtype}")
    w.add_context_length(context_length)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["intermediate"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, f in tok_fields.items():
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    del reader, tok_fields

    plan = list(_tensor_plan(s, vocab))
    for name, shp in plan:  # pass 1: declare (no data generated)
        _, dtype, stored, nbytes = _encode(shp, qt, None)
        w.add_tensor_info(name, stored, dtype, nbytes, raw_dtype=qt if dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    rng = np.random.default_rng(seed)
    n_params = sum(int(np.prod(shp)) for _, shp in plan)
    try:
        with tqdm(total=n_params, desc=f"writing {path.name}", unit="param", unit_scale=True,
                  disable=not show_progress) as bar:
            for name, shp in plan:  # pass 2: generate, quantize, write, drop
                data = _encode(shp, qt, rng)[0]
                w.write_tensor_data(data)
                del data
                bar.update(int(np.prod(shp)))
        w.close()
        os.replace(part, path)
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bastion.bench.gguf_gen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--qtype", choices=QTYPES, default="Q4_0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None, help="default: ./random-<shape>-<qtype>.gguf")
    args = ap.parse_args(argv)
    out = args.out or Path(f"random-{args.shape}-{args.qtype}.gguf")
    p = write_random_gguf(out, args.shape, args.qtype, args.seed, args.context_length)
    print(f"{p} ({p.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
