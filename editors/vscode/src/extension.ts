// lsp-llm VS Code extension: starts the lsp-llm language server over stdio and wires it
// into VS Code (completions, inline completions, settings, log, status bar, restart).
import * as fs from 'fs';
import * as path from 'path';
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
} from 'vscode-languageclient/node';

const SECTION = 'lsp-llm';
/** Settings forwarded to the server (the rest are for the extension itself). */
const SERVER_KEYS = ['model', 'nCtx', 'threads', 'maxSessions', 'items', 'lineTokens', 'waitFor', 'exactItems',
  'logLevel', 'engineUrl', 'engineApi', 'engineSlots'] as const;
/** Settings that need a new server process when they change. */
const RESTART_KEYS = ['serverCommand', 'serverArgs'];

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let pollTimer: NodeJS.Timeout | undefined;
let refreshTimer: NodeJS.Timeout | undefined;
let modelName: string | undefined;
let starting: Promise<void> | undefined;

export interface ServerCommand {
  command: string;
  args: string[];
  how: string;
}

/** Server settings from the `lsp-llm` configuration section, with unset values left out. */
export function serverSettings(cfg: vscode.WorkspaceConfiguration = vscode.workspace.getConfiguration(SECTION)) {
  const out: Record<string, unknown> = {};
  for (const key of SERVER_KEYS) {
    const value = cfg.get(key);
    if (value === undefined || value === null || value === '') {
      if (key === 'model') out.model = null;
      if (key === 'engineUrl') out.engineUrl = '';  // back to in-process
      continue;
    }
    out[key] = value;
  }
  return out;
}

/** `lsp-llm.<kind>.enabled`: popup items or ghost text on (read at each request, so a change applies at once). */
function enabled(kind: 'popup' | 'inline'): boolean {
  return vscode.workspace.getConfiguration(SECTION).get<boolean>(`${kind}.enabled`) ?? true;
}

function isPython(file: string): boolean {
  return /^python[0-9.]*(\.exe)?$/i.test(path.basename(file));
}

function findOnPath(name: string): string | undefined {
  const exts = process.platform === 'win32' ? ['.exe', '.cmd', ''] : [''];
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    for (const ext of exts) {
      const candidate = path.join(dir, name + ext);
      try {
        fs.accessSync(candidate, fs.constants.X_OK);
        if (fs.statSync(candidate).isFile()) return candidate;
      } catch {
        /* not here */
      }
    }
  }
  return undefined;
}

/** The interpreter selected in the Python extension (ms-python.python), if it is installed. */
async function selectedPython(): Promise<string | undefined> {
  const ext = vscode.extensions.getExtension('ms-python.python');
  if (!ext) return undefined;
  try {
    const api: any = ext.isActive ? ext.exports : await ext.activate();
    const resource = vscode.window.activeTextEditor?.document.uri;
    if (api?.environments?.getActiveEnvironmentPath) {
      const envPath = api.environments.getActiveEnvironmentPath(resource);
      const env = await api.environments.resolveEnvironment(envPath);
      const exe: string | undefined = env?.executable?.uri?.fsPath ?? envPath?.path;
      if (exe) return exe;
    }
    const details = await api?.settings?.getExecutionDetails?.(resource);
    if (details?.execCommand?.[0]) return details.execCommand[0];
  } catch (err) {
    output.appendLine(`[lsp-llm] could not ask the Python extension for the interpreter: ${err}`);
  }
  return undefined;
}

/** How to start the server: the setting, else `lsp-llm` on PATH, else the selected Python, else python3. */
export async function resolveServerCommand(): Promise<ServerCommand> {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const configured = (cfg.get<string>('serverCommand') ?? '').trim();
  const extra = cfg.get<string[]>('serverArgs') ?? [];
  if (configured) {
    const cmd = configured.replace(/^~(?=$|\/|\\)/, process.env.HOME ?? '~');
    return isPython(cmd)
      ? { command: cmd, args: ['-m', 'lsp_llm', ...extra], how: 'lsp-llm.serverCommand (Python interpreter)' }
      : { command: cmd, args: extra, how: 'lsp-llm.serverCommand' };
  }
  const onPath = findOnPath('lsp-llm');
  if (onPath) return { command: onPath, args: extra, how: 'lsp-llm on PATH' };
  const py = await selectedPython();
  if (py) {
    const script = path.join(path.dirname(py), process.platform === 'win32' ? 'lsp-llm.exe' : 'lsp-llm');
    if (fs.existsSync(script)) return { command: script, args: extra, how: `next to the selected Python ${py}` };
    return { command: py, args: ['-m', 'lsp_llm', ...extra], how: `selected Python ${py}` };
  }
  const python = process.platform === 'win32' ? 'python' : 'python3';
  return { command: python, args: ['-m', 'lsp_llm', ...extra], how: `${python} on PATH` };
}

function setStatus(text: string, tooltip?: string) {
  statusItem.text = `$(sparkle) ${text}`;
  statusItem.tooltip = tooltip ?? 'lsp-llm — click for stats';
  statusItem.show();
}

async function stats(uri?: string): Promise<any> {
  if (!client || client.state !== State.Running) return undefined;
  return client.sendRequest(ExecuteCommandRequest.type, {
    command: 'lsp-llm.stats',
    arguments: uri ? [uri] : [],
  });
}

/** Read lsp-llm.stats and show model, last latency and prefix reuse in the status bar. */
async function refreshStatus(): Promise<void> {
  if (!client || client.state !== State.Running) return;
  let detailModel: string | undefined;
  try {
    if (!modelName) {
      const all = await stats();
      const name = all?.model ? path.basename(String(all.model)).replace(/\.gguf$/i, '') : undefined;
      // Keep it once the server reports a real name (not a placeholder such as "(loading)").
      modelName = name && !name.startsWith('(') ? name : undefined;
      if (!modelName && name) detailModel = name;
    }
    const doc = vscode.window.activeTextEditor?.document;
    let detail = '';
    let tooltip = `lsp-llm: ${modelName ?? detailModel ?? 'model ?'}`;
    if (doc && doc.uri.scheme !== 'output') {
      const s = await stats(doc.uri.toString());
      if (s && typeof s === 'object' && Number(s.last_ms) > 0) {
        const reused = Number(s.reused_last ?? 0);
        const fed = Number(s.fed_last ?? 0);
        const reuse = reused + fed > 0 ? Math.round((100 * reused) / (reused + fed)) : 100;
        detail = ` · ${Math.round(Number(s.last_ms))} ms · reuse ${reuse}%`;
        tooltip +=
          `\nlast completion: ${Number(s.last_ms).toFixed(1)} ms, ${reused} tokens reused, ${fed} fed` +
          `\ndocument: ${s.tokens ?? '?'} tokens, ${s.cached ? 'cached' : 'not cached'}` +
          `\ntotal fed ${s.fed_total ?? '?'}, generated ${s.generated_total ?? '?'}`;
      }
    }
    setStatus(`${modelName ?? `lsp-llm ${detailModel ?? ''}`.trim()}${detail}`, tooltip);
  } catch (err) {
    output.appendLine(`[lsp-llm] stats failed: ${err}`);
  }
}

function scheduleRefresh(delayMs = 50) {
  if (refreshTimer) clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => void refreshStatus(), delayMs);
}

function startPolling() {
  if (pollTimer) clearInterval(pollTimer);
  const seconds = vscode.workspace.getConfiguration(SECTION).get<number>('statusBar.pollSeconds') ?? 3;
  if (seconds > 0) {
    pollTimer = setInterval(() => {
      if (vscode.window.activeTextEditor && vscode.window.state.focused !== false) void refreshStatus();
    }, seconds * 1000);
  }
}

async function startClient(context: vscode.ExtensionContext): Promise<void> {
  const server = await resolveServerCommand();
  output.appendLine(`[lsp-llm] starting: ${server.command} ${server.args.join(' ')}  (${server.how})`);
  setStatus('lsp-llm: starting…');

  const serverOptions: ServerOptions = {
    command: server.command,
    args: server.args,
    // No `transport`: with TransportKind.stdio the client would append `--stdio` to the arguments.
    options: { env: { ...process.env, PYTHONUNBUFFERED: '1' } },
  };
  const clientOptions: LanguageClientOptions = {
    // The model is language-agnostic: every file and untitled document.
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    outputChannel: output,
    traceOutputChannel: output,
    initializationOptions: serverSettings(),
    middleware: {
      // lsp-llm.popup.enabled / lsp-llm.inline.enabled switch the two kinds of suggestions off
      // independently: the provider stays registered, its results are dropped (no request).
      provideCompletionItem: async (document, position, ctx, token, next) => {
        if (!enabled('popup')) return undefined;
        const result = await next(document, position, ctx, token);
        scheduleRefresh();
        return result;
      },
      // vscode-languageclient registers the inline (ghost text) provider because the server
      // advertises inlineCompletionProvider; VS Code shows its items as ghost text, Tab accepts.
      provideInlineCompletionItems: async (document, position, ctx, token, next) => {
        if (!enabled('inline')) return undefined;
        const result = await next(document, position, ctx, token);
        scheduleRefresh();
        return result;
      },
    },
  };

  client = new LanguageClient('lsp-llm', 'lsp-llm', serverOptions, clientOptions);
  try {
    await client.start();
  } catch (err) {
    setStatus('lsp-llm: failed', `${err}`);
    output.appendLine(`[lsp-llm] failed to start ${server.command}: ${err}`);
    void vscode.window
      .showErrorMessage(
        `lsp-llm: could not start the server (${server.command}). Install it from a checkout (pip install ./lsp-llm) or set "lsp-llm.serverCommand".`,
        'Open Settings',
        'Show Log',
      )
      .then((pick) => {
        if (pick === 'Open Settings') void vscode.commands.executeCommand('workbench.action.openSettings', 'lsp-llm.serverCommand');
        if (pick === 'Show Log') output.show(true);
      });
    return;
  }
  modelName = undefined;
  // Also send the settings once as workspace/didChangeConfiguration, as we do on every change.
  await client.sendNotification(DidChangeConfigurationNotification.type, { settings: { [SECTION]: serverSettings() } });
  await refreshStatus();
  startPolling();
}

async function stopClient(): Promise<void> {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = undefined;
  const c = client;
  client = undefined;
  if (c) {
    try {
      await c.stop(5000);
    } catch (err) {
      output.appendLine(`[lsp-llm] stop: ${err}`);
    }
  }
}

async function restart(context: vscode.ExtensionContext): Promise<void> {
  if (starting) await starting;
  starting = (async () => {
    output.appendLine('[lsp-llm] restarting server');
    await stopClient();
    await startClient(context);
  })();
  try {
    await starting;
  } finally {
    starting = undefined;
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<{ client: () => LanguageClient | undefined }> {
  output = vscode.window.createOutputChannel('lsp-llm', { log: true });
  statusItem = vscode.window.createStatusBarItem('lsp-llm.status', vscode.StatusBarAlignment.Right, 100);
  statusItem.name = 'lsp-llm';
  statusItem.command = 'lsp-llm.showStats';
  context.subscriptions.push(output, statusItem);

  context.subscriptions.push(
    vscode.commands.registerCommand('lsp-llm.restartServer', () => restart(context)),
    vscode.commands.registerCommand('lsp-llm.showOutput', () => output.show(true)),
    vscode.commands.registerCommand('lsp-llm.showStats', async () => {
      const doc = vscode.window.activeTextEditor?.document;
      const s = await stats(doc?.uri.toString()).catch((e) => `${e}`);
      output.appendLine(`[lsp-llm] stats${doc ? ' ' + doc.uri.toString() : ''}: ${JSON.stringify(s, null, 2)}`);
      output.show(true);
      await refreshStatus();
    }),
    vscode.workspace.onDidChangeConfiguration(async (e) => {
      if (!e.affectsConfiguration(SECTION)) return;
      if (RESTART_KEYS.some((k) => e.affectsConfiguration(`${SECTION}.${k}`))) {
        await restart(context);
        return;
      }
      if (e.affectsConfiguration(`${SECTION}.statusBar`)) startPolling();
      if (client && client.state === State.Running) {
        modelName = undefined;
        await client.sendNotification(DidChangeConfigurationNotification.type, {
          settings: { [SECTION]: serverSettings() },
        });
        scheduleRefresh(500);
      }
    }),
    vscode.window.onDidChangeActiveTextEditor(() => scheduleRefresh(100)),
    { dispose: () => void stopClient() },
  );

  starting = startClient(context);
  await starting;
  starting = undefined;
  return { client: () => client };
}

export async function deactivate(): Promise<void> {
  await stopClient();
}
