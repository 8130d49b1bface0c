"""The llama.cpp model: loading, tokenization and canonical batch shapes.

Everything here talks to llama.cpp through llama-cpp-python's low-level
bindings. Nothing here is thread-safe except the vocabulary (read-only, and
guarded: ``close`` on one thread never frees it under a call on another);
contexts are owned by the engine thread (see ``scheduler.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import struct
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as llama
import numpy as np

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


class ModelError(Exception):
    """A model that cannot be used; the message is meant for the user."""


def _route_llama_logs() -> None:
    """Send llama.cpp's own logging to Python logging (debug level)."""
    llama_log = logging.getLogger("llama.cpp")

    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", "replace").rstrip()
        if msg:
            llama_log.debug(msg)

    callback = llama.llama_log_callback(on_log)
    # Keep a reference: llama.cpp calls it for the life of the process.
    _route_llama_logs.callback = callback  # type: ignore[attr-defined]
    llama.llama_log_set(callback, ctypes.c_void_p())


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        _route_llama_logs()
        llama.llama_backend_init()
        _backend_ready = True


def check_gguf(path: Path) -> None:
    """Raise ModelError with a one-line message if path is not a readable GGUF."""
    if not path.exists():
        raise ModelError(f"model file not found: {path} (pass --model PATH to a GGUF file)")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path} (pass --model PATH to a GGUF file)")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror} (check its permissions)") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelError(f"not a GGUF model file: {path} (convert it with llama.cpp or pick a .gguf file)")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise ModelError(f"unsupported GGUF version {version} in {path}")


@dataclass(frozen=True)
class BatchRule:
    """Canonical batch shape: every decode call has a row count that is a
    multiple of ``multiple`` and at least ``minimum``; short batches are padded
    with throw-away rows placed after the real ones.

    ``exact`` is False when no rule gave bit-identical logits on this CPU.
    """

    multiple: int
    minimum: int
    exact: bool = True

    def padded(self, n: int) -> int:
        m = max(n, self.minimum)
        return -(-m // self.multiple) * self.multiple

    def plan(self, n: int, max_rows: int) -> list[int]:
        """Split n real tokens into decode calls whose padded sizes fit max_rows.

        All calls but the last are full-size multiples; the last is padded.
        """
        step = max_rows - max_rows % self.multiple
        sizes = []
        while n > step:
            # never leave a remainder smaller than the minimum unpadded
            take = step if n - step >= self.minimum or n - step == 0 else step - self.minimum
            sizes.append(take)
            n -= take
        if n:
            sizes.append(n)
        return sizes


@dataclass(frozen=True)
class FimTokens:
    """The fill-in-the-middle control tokens a vocabulary declares."""

    pre: int
    suf: int
    mid: int


# Exact items (``Model(exact_items=True)``) need attention whose result does
# not depend on which KV cells a branch's rows landed in, for a branch's cells
# land where its neighbours left room. Without flash attention, llama.cpp sums
# the softmax in 8-cell SIMD blocks and the values in lanes by cell index, so
# the same tokens in other cells round differently. CPU flash attention under
# 64 rows a call visits a row's unmasked cells one at a time, in cell order:
# only their order counts, and each sequence's cells stay in position order
# (``branches`` keeps it so). From 64 rows on it switches to a tiled kernel
# that sums within tiles of cells again.
FLASH_ROWS = 32
# The rows that want logits run the last layer alone (llama.cpp drops the
# others before it), and its matrix products take another kernel path from 8
# rows on, which rounds differently from the 1 row of a fresh evaluation
# (measured on Gemma 3 270M, AVX2). A document feed keeps its logits rows
# under it (the probes in its padding); with exact items, branch calls too.
OUTPUT_ROWS = 7

CANDIDATE_RULES = [BatchRule(4, 4), BatchRule(4, 8), BatchRule(8, 8), BatchRule(16, 16), BatchRule(32, 32)]


class Model:
    """A loaded GGUF model plus its vocabulary."""

    def __init__(self, path: str | os.PathLike[str], threads: int, n_ubatch: int = 128,
                 exact_items: bool = False) -> None:
        self.path = Path(path)
        check_gguf(self.path)
        _init_backend()
        # the vocabulary guard: a call that uses the model counts itself in
        # (under the lock) and ``close`` frees the model only once none is in
        # flight, so a thread that races the free gets ModelError, never freed
        # memory
        self._guard = threading.Lock()
        self._users = 0
        self.aborted = False  # see ``abort``
        params = llama.llama_model_default_params()
        # Extra buffer types (weight repacking, AMX) crash or change kernels
        # on some CPUs; the plain CPU path is the one we calibrate.
        params.use_extra_bufts = False
        self._model = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelError(f"llama.cpp could not load model {self.path} (is it a complete GGUF file?)")
        self._loaded = self._model  # the same pointer, for calls counted in by ``_use``
        self.threads = threads
        # exact items: flash attention, in calls short enough for its
        # one-row-at-a-time kernel (see ``FLASH_ROWS``)
        self.flash_attention = exact_items
        self.n_ubatch = min(n_ubatch, FLASH_ROWS) if exact_items else n_ubatch
        self.max_outputs = OUTPUT_ROWS if exact_items else None  # logits rows per branch call
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab: int = llama.llama_vocab_n_tokens(self._vocab)
        self.bos: int = llama.llama_vocab_bos(self._vocab)
        self.add_bos: bool = bool(llama.llama_vocab_get_add_bos(self._vocab)) and self.bos >= 0
        self.n_ctx_train: int = llama.llama_model_n_ctx_train(self._model)
        fim = FimTokens(llama.llama_vocab_fim_pre(self._vocab), llama.llama_vocab_fim_suf(self._vocab),
                        llama.llama_vocab_fim_mid(self._vocab))
        self.fim: FimTokens | None = fim if min(fim.pre, fim.suf, fim.mid) >= 0 else None
        buf = ctypes.create_string_buffer(256)
        llama.llama_model_desc(self._model, buf, len(buf))
        self.description = buf.value.decode("utf-8", "replace")
        # a token's bytes, filled as tokens are met (a list: with a 262k
        # vocabulary a dict of int keys costs twice the memory)
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._sorted: tuple[list[bytes], np.ndarray] | None = None
        self.batch_rule = BatchRule(4, 8)
        # the logits after BOS alone, by batch rule: the same in every context
        # (see ``Session.sync``)
        self.bos_logits: dict[BatchRule, np.ndarray] = {}

    @property
    def name(self) -> str:
        return self.path.name

    # -- vocabulary -------------------------------------------------------
    def tokenize(self, data: bytes, add_bos: bool) -> list[int]:
        add = add_bos and self.add_bos
        cap = len(data) + 8
        arr = (llama.llama_token * cap)()
        vocab = self._use()
        try:
            n = llama.llama_tokenize(vocab, data, len(data), arr, cap, add, False)
            if n < 0:  # buffer too small (cannot happen for byte-level vocabularies)
                cap = -n
                arr = (llama.llama_token * cap)()
                n = llama.llama_tokenize(vocab, data, len(data), arr, cap, add, False)
        finally:
            self._done()
        return list(arr[:n])

    def piece(self, token: int) -> bytes:
        """The exact bytes a token stands for (empty for control tokens)."""
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token {token} is not in the vocabulary ({self.n_vocab} tokens)")
        cached = self._pieces[token]
        if cached is None:
            vocab = self._use()
            try:
                cached = self._piece_in(vocab, token)
            finally:
                self._done()
        return cached

    def _piece_in(self, vocab: llama.llama_vocab_p, token: int) -> bytes:
        """``piece`` for a caller counted in by ``_use``."""
        cached = self._pieces[token]
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            cached = buf.raw[:n]
            self._pieces[token] = cached
        return cached

    def tokens_starting_with(self, prefix: bytes) -> np.ndarray:
        """Ids of the normal tokens whose text starts with prefix."""
        if self._sorted is None:
            vocab = self._use()  # once for the whole vocabulary
            try:
                ids = [t for t in range(self.n_vocab)
                       if self._piece_in(vocab, t) and not llama.llama_vocab_is_control(vocab, t)]
            finally:
                self._done()
            ids.sort(key=self._pieces.__getitem__)
            self._sorted = ([self._pieces[t] for t in ids], np.array(ids, dtype=np.int64))
        pieces, ids = self._sorted
        lo = bisect_left(pieces, prefix)
        hi = bisect_left(pieces, prefix + b"\xff" * 8, lo)
        while hi < len(pieces) and pieces[hi].startswith(prefix):
            hi += 1
        return ids[lo:hi]

    def is_control(self, token: int) -> bool:
        vocab = self._use()
        try:
            return bool(llama.llama_vocab_is_control(vocab, token))
        finally:
            self._done()

    def is_eog(self, token: int) -> bool:
        vocab = self._use()
        try:
            return bool(llama.llama_vocab_is_eog(vocab, token))
        finally:
            self._done()

    # -- contexts -----------------------------------------------------------
    def new_context(self, n_ctx: int, n_seq: int) -> llama.llama_context_p:
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.n_ubatch
        params.n_ubatch = self.n_ubatch
        params.n_seq_max = n_seq
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attention
                                  else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.kv_unified = True  # candidates share the document's cells
        params.swa_full = True  # rewinds deeper than the sliding window stay exact
        params.no_perf = True
        self._use()
        try:
            ctx = llama.llama_init_from_model(self._loaded, params)
        finally:
            self._done()
        if not ctx:
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)")
        return ctx

    def calibration_key(self) -> str:
        st = self.path.stat()
        raw = json.dumps(
            [str(self.path.resolve()), st.st_size, st.st_mtime_ns, llama.__version__,
             platform.machine(), _cpu_flags(), self.threads, self.n_ubatch, self.flash_attention]
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def close(self) -> None:
        """Free the model (its contexts must be freed first). From now on the
        vocabulary is refused (ModelError); a call already in it, on another
        thread, finishes first."""
        with self._guard:
            model, self._model = self._model, None
        if not model:
            return
        while True:
            with self._guard:
                if not self._users:
                    break
            time.sleep(0.0005)  # a tokenization in flight: at most milliseconds
        llama.llama_model_free(model)

    @property
    def closed(self) -> bool:
        return not self._model

    def abort(self) -> None:
        """The process is ending (LSP shutdown/exit): every decode call of
        this model's sessions stops midway, within a graph node, rather than
        at its end (under load one call can take seconds). For good: a
        session of an aborted model never decodes again (``Cancelled``)."""
        self.aborted = True

    def _use(self) -> llama.llama_vocab_p:
        """The vocabulary, for one call: refused once the model is freed (a
        use-after-free would read freed memory or crash). Every use of the
        model's memory goes through here and ends with ``_done``."""
        with self._guard:
            if not self._model:
                raise ModelError(f"the model {self.name} was freed; its vocabulary is gone")
            self._users += 1
        return self._vocab

    def _done(self) -> None:
        with self._guard:
            self._users -= 1


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(line.encode()).hexdigest()[:12]
    except OSError:
        pass
    return platform.processor()


def best_tokens(logits: np.ndarray, k: int) -> tuple[int, ...]:
    """The k most likely tokens, most likely first (ties: lower id first, so
    the first is np.argmax)."""
    top = np.argpartition(logits, -k)[-k:]
    top = top[np.lexsort((top, -logits[top]))]
    return tuple(int(t) for t in top)


def logits_view(ctx: llama.llama_context_p, row: int, n_vocab: int) -> np.ndarray:
    ptr = llama.llama_get_logits_ith(ctx, row)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))
