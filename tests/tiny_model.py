"""Build a tiny Gemma-3-architecture GGUF with random weights.

It carries the real Gemma 3 tokenizer (copied from the embedded default
model), so tokenization behaves exactly as in production, and a small
sliding window (16) so rewinds deeper than the window are cheap to test.
Weights are quantized (Q8_0/Q5_0/Q4_0) to exercise the quantized kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

N_EMBD = 32
N_HEAD = 2
N_HEAD_KV = 1
HEAD_DIM = 32
N_FF = 64
N_LAYER = 6  # gemma3: five sliding-window layers, then one global layer
SLIDING_WINDOW = 16
CONTEXT = 4096
FIM_TOKENS = (6, 7, 8)  # <unused0..2> of the Gemma vocabulary: FIM prefix, suffix, middle (fim=True)

_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def _field_array(field: gguf.ReaderField) -> list:
    return [field.parts[i] for i in field.data]


def build(out: Path, source: Path, seed: int = 0, fim: bool = False) -> Path:
    """With fim, the vocabulary also declares FIM tokens (FIM_TOKENS)."""
    reader = gguf.GGUFReader(str(source))
    fields = reader.fields
    tokens = [bytes(p) for p in _field_array(fields["tokenizer.ggml.tokens"])]
    scores = np.array([p[0] for p in _field_array(fields["tokenizer.ggml.scores"])], dtype=np.float32)
    types = np.array([p[0] for p in _field_array(fields["tokenizer.ggml.token_type"])], dtype=np.int32)
    n_vocab = len(tokens)

    def scalar(name: str) -> int:
        return int(fields[name].parts[-1][0])

    w = gguf.GGUFWriter(str(out), "gemma3")
    w.add_name("lsp-llm tiny test model")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(SLIDING_WINDOW)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores.tolist())
    w.add_token_types(types.tolist())
    w.add_bos_token_id(scalar("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(scalar("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(scalar("tokenizer.ggml.unknown_token_id"))
    w.add_pad_token_id(scalar("tokenizer.ggml.padding_token_id"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if fim:
        for key, token in zip(("pre", "suf", "mid"), FIM_TOKENS):
            w.add_uint32(f"tokenizer.ggml.fim_{key}_token_id", token)

    rng = np.random.default_rng(seed)

    def tensor(name: str, shape: tuple[int, ...], qtype: Q | None, scale: float = 0.5) -> None:
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    tensor("token_embd.weight", (n_vocab, N_EMBD), Q.Q8_0, scale=1.0)
    norm("output_norm.weight", N_EMBD)
    for il in range(N_LAYER):
        p = f"blk.{il}."
        norm(p + "attn_norm.weight", N_EMBD)
        tensor(p + "attn_q.weight", (N_HEAD * HEAD_DIM, N_EMBD), Q.Q5_0)
        tensor(p + "attn_k.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), Q.Q5_0)
        tensor(p + "attn_v.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), Q.Q8_0)
        norm(p + "attn_q_norm.weight", HEAD_DIM)
        norm(p + "attn_k_norm.weight", HEAD_DIM)
        tensor(p + "attn_output.weight", (N_EMBD, N_HEAD * HEAD_DIM), Q.Q4_0)
        norm(p + "post_attention_norm.weight", N_EMBD)
        norm(p + "ffn_norm.weight", N_EMBD)
        tensor(p + "ffn_gate.weight", (N_FF, N_EMBD), Q.Q5_0)
        tensor(p + "ffn_up.weight", (N_FF, N_EMBD), Q.Q5_0)
        tensor(p + "ffn_down.weight", (N_EMBD, N_FF), Q.Q4_0)
        norm(p + "post_ffw_norm.weight", N_EMBD)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


if __name__ == "__main__":
    from lsp_llm.engine.default_model import default_model_path

    print(build(Path(sys.argv[1]), default_model_path()))
