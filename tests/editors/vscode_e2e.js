// Drive a real VS Code (code-server) in headless Chromium through playwright-core:
// open the file, type like a user, wait for the suggest widget to show lsp-llm's items,
// accept one, check the editor, take screenshots.
// MODE=suggest (default): the suggest widget, settings, restart. MODE=ghost: ghost text (inline
// completions): shown, Tab, Ctrl+Right (a word), Escape, beside the suggest widget, switched off.
// Env: PW_CORE (path of the playwright-core package), CHROMIUM, URL, FILE_NAME, FILE_PATH, TYPED, EXPECTED,
// SHOTS (dir), SETTINGS_FILES (JSON list). Prints one JSON line with the result.
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium } = require(process.env.PW_CORE);

const TYPED = process.env.TYPED;
const EXPECTED = process.env.EXPECTED;
const SHOTS = process.env.SHOTS;
const log = (...a) => console.error(`[e2e ${new Date().toISOString().slice(11, 23)}]`, ...a);

async function waitFor(fn, timeoutMs, what, intervalMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = `${e}`;
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(last)}`);
}

// The ghost text VS Code shows: the first line inline (.ghost-text-decoration), more lines below (.ghost-text).
async function ghostText(page) {
  return page.evaluate(() => {
    const text = (e) => e.textContent.replace(/\u00a0/g, ' ');
    const first = [...document.querySelectorAll('.monaco-editor .view-lines .ghost-text-decoration')].map(text).join('');
    const more = [...document.querySelectorAll('.monaco-editor .ghost-text .view-line')].map(text);
    return [first, ...more].join('\n');
  });
}

// Save (Ctrl+S) and read the file back: what the buffer holds, without any ghost text.
async function saved(page) {
  await page.keyboard.press('Control+S');
  await page.waitForTimeout(700);
  return fs.readFileSync(process.env.FILE_PATH, 'utf8');
}

function setSettings(values) {
  for (const file of JSON.parse(process.env.SETTINGS_FILES || '[]')) {
    const settings = JSON.parse(fs.readFileSync(file, 'utf8'));
    Object.assign(settings, values);
    fs.writeFileSync(file, JSON.stringify(settings, null, 2));
  }
}

async function suggestLabels(page) {
  return page.$$eval('.editor-widget.suggest-widget.visible .monaco-list-row', (els) =>
    els.map((e) => (e.querySelector('.label-name') || e).textContent.trim()));
}

// The file as on disk at the start; each phase starts from it and types in the same place, so the
// (deterministic) server suggests the same there.
let ORIGINAL;

async function editorText(page) {
  return page.$$eval('.monaco-editor .view-lines .view-line', (els) =>
    els.map((e) => ({ top: parseFloat(e.style.top) || 0, text: e.textContent.replace(/\u00a0/g, ' ') }))
      .sort((a, b) => a.top - b.top).map((l) => l.text).join('\n'));
}

// Put the original file back on disk and "File: Revert File" from the command palette.
async function restore(page) {
  await page.keyboard.press('Escape');
  fs.writeFileSync(process.env.FILE_PATH, ORIGINAL);
  await page.keyboard.press('F1');
  await page.waitForSelector('.quick-input-widget input', { state: 'visible', timeout: 10000 });
  await page.keyboard.type('File: Revert File', { delay: 20 });
  await waitFor(async () => {
    const rows = await page.$$eval('.quick-input-list .monaco-list-row', (els) => els.map((e) => e.textContent));
    return rows.some((t) => /Revert File/.test(t));
  }, 10000, 'Revert File in the palette');
  await page.keyboard.press('Enter');
  let last;
  await waitFor(async () => (last = await editorText(page)) === ORIGINAL, 20000,
    'the editor to show the file as on disk').catch((e) => { throw new Error(`${e}: ${JSON.stringify(last)}`); });
  await page.locator('.monaco-editor textarea').first().focus();
}

// A new line after line GHOST_AFTER, TYPED typed key by key; then wait for ghost text (or not).
async function typeLine(page, waitGhost) {
  await page.keyboard.press('Control+G');
  await page.waitForSelector('.quick-input-widget input', { state: 'visible', timeout: 10000 });
  await page.keyboard.type(process.env.GHOST_AFTER, { delay: 30 });
  await page.keyboard.press('Enter');
  await page.waitForSelector('.quick-input-widget', { state: 'hidden', timeout: 10000 });
  await page.waitForTimeout(200);
  await page.keyboard.press('End');
  await page.keyboard.press('Enter');
  await page.waitForTimeout(200);
  await page.keyboard.type(process.env.TYPED, { delay: 150 });
  if (!waitGhost) return '';
  const t0 = Date.now();
  const ghost = await waitFor(async () => (await ghostText(page)).trim() && ghostText(page), 60000, 'ghost text');
  log('ghost text after', Date.now() - t0, 'ms:', JSON.stringify(ghost));
  return ghost;
}

async function ghostScenario(page, result) {
  ORIGINAL = fs.readFileSync(process.env.FILE_PATH, 'utf8');

  // 1. Ghost text appears as you type; Tab accepts it.
  result.accept_ghost = await typeLine(page, true);
  await page.screenshot({ path: path.join(SHOTS, 'vscode-ghost.png') });
  await page.keyboard.press('Tab');
  await page.waitForTimeout(300);
  result.accept_after = await saved(page);
  await page.screenshot({ path: path.join(SHOTS, 'vscode-ghost-accepted.png') });

  // 2. Beside the suggest widget (Ctrl+Space), then Escape twice: widget, then ghost text gone.
  await restore(page);
  result.side_ghost = await typeLine(page, true);
  await page.keyboard.press('Control+Space');
  result.side_labels = await waitFor(async () => {
    const labels = await suggestLabels(page);
    return labels.some((l) => l.startsWith(process.env.TYPED) && l.length > process.env.TYPED.length) && labels;
  }, 30000, 'the suggest widget with lsp-llm items');
  result.side_ghost_with_widget = await ghostText(page);
  await page.screenshot({ path: path.join(SHOTS, 'vscode-ghost-and-suggest.png') });
  await page.keyboard.press('Escape');
  await page.waitForTimeout(200);
  if ((await ghostText(page)).trim()) await page.keyboard.press('Escape');
  await page.waitForTimeout(1500);
  result.dismissed_ghost = await ghostText(page);
  result.dismissed = await saved(page);

  // 3. Ctrl+Right accepts one word; the rest stays shown.
  await restore(page);
  result.word_ghost = await typeLine(page, true);
  await page.keyboard.press('Control+ArrowRight');
  await page.waitForTimeout(500);
  result.word_rest = await ghostText(page);
  await page.keyboard.press('Escape');
  result.word_after = await saved(page);

  // 4. lsp-llm.inline.enabled false: no ghost text, the suggest widget still has our items.
  await restore(page);
  setSettings({ 'lsp-llm.inline.enabled': false });
  await page.waitForTimeout(1500);
  await typeLine(page, false);
  await page.waitForTimeout(3000);
  result.inline_off_ghost = await ghostText(page);
  await page.keyboard.press('Control+Space');
  result.inline_off_labels = await waitFor(async () => {
    const labels = await suggestLabels(page);
    return labels.some((l) => l.startsWith(process.env.TYPED)) && labels;
  }, 30000, 'the suggest widget with lsp-llm items').catch((e) => `${e}`);

  // 5. lsp-llm.popup.enabled false: ghost text again, no items of ours in the suggest widget.
  await restore(page);
  setSettings({ 'lsp-llm.inline.enabled': true, 'lsp-llm.popup.enabled': false });
  await page.waitForTimeout(1500);
  result.popup_off_ghost = await typeLine(page, true);
  await page.keyboard.press('Control+Space');
  await page.waitForTimeout(3000);
  result.popup_off_labels = await suggestLabels(page);
  await page.screenshot({ path: path.join(SHOTS, 'vscode-popup-off.png') });
  await page.keyboard.press('Escape');
  await restore(page);
}

(async () => {
  const result = { ok: false };
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text().slice(0, 300)); });
  try {
    const t0 = Date.now();
    await page.goto(process.env.URL, { waitUntil: 'domcontentloaded', timeout: 120000 });
    await page.waitForSelector('.monaco-workbench', { timeout: 120000 });
    log('workbench up');
    // The status bar item of our extension appears once it has activated and started the server.
    const status = await waitFor(async () => {
      const texts = await page.$$eval('.statusbar-item', (els) => els.map((e) => e.textContent.trim()));
      return texts.find((t) => /lsp-llm|gemma/i.test(t));
    }, 120000, 'the lsp-llm status bar item');
    result.status_at_start = status;
    log('status bar:', status);

    // Open the file with Quick Open, the way a user does.
    await page.click('.monaco-workbench .part.editor', { timeout: 10000 }).catch(() => {});
    await page.keyboard.press('Control+P');
    await page.waitForSelector('.quick-input-widget input', { state: 'visible', timeout: 20000 });
    await page.keyboard.type(process.env.FILE_NAME, { delay: 30 });
    await waitFor(async () => (await page.$$('.quick-input-list .monaco-list-row')).length > 0, 20000, 'quick open results');
    await page.keyboard.press('Enter');
    await page.waitForSelector('.monaco-editor .view-lines', { timeout: 30000 });
    await waitFor(async () => (await page.$$eval('.monaco-editor .view-line', (els) => els.map((e) => e.textContent.replace(/\u00a0/g, ' ')).join('\n'))).includes('def greet'), 30000, 'the file contents');
    log('file open after', Date.now() - t0, 'ms');

    // Wait until the server knows the document (its stats answer for it) = status shows latency or model.
    await page.locator('.monaco-editor textarea').first().focus();
    if (process.env.MODE === 'ghost') {
      await ghostScenario(page, result);
      result.ok = true;
      return;
    }
    // Go to line 6, end of line, new line, type the prefix key by key.
    await page.keyboard.press('Control+G');
    await page.waitForSelector('.quick-input-widget input', { state: 'visible', timeout: 10000 });
    await page.keyboard.type('6', { delay: 30 });
    await page.keyboard.press('Enter');
    await page.waitForSelector('.quick-input-widget', { state: 'hidden', timeout: 10000 });
    await page.waitForTimeout(300);
    await page.keyboard.press('End');
    await page.waitForTimeout(100);
    await page.keyboard.press('Enter');
    await page.waitForTimeout(300);
    const tType = Date.now();
    await page.keyboard.type(TYPED, { delay: 150 });

    // The suggest widget with our items.
    const rows = await waitFor(async () => {
      const visible = await page.$('.editor-widget.suggest-widget.visible');
      if (!visible) {
        // Quick suggestions can be dismissed by timing; ask explicitly like a user would.
        if (Date.now() - tType > 8000) await page.keyboard.press('Control+Space');
        return null;
      }
      const r = await page.$$eval('.editor-widget.suggest-widget.visible .monaco-list-row', (els) =>
        els.map((e) => ({
          label: (e.querySelector('.label-name') || e).textContent.trim(),
          details: (e.querySelector('.details-label') || { textContent: '' }).textContent.trim(),
          aria: e.getAttribute('aria-label') || '',
          focused: e.classList.contains('focused'),
        })));
      return r.length && r.some((x) => x.label.startsWith(TYPED) && x.label.length > TYPED.length) ? r : null;
    }, 90000, 'the suggest widget with lsp-llm items');
    result.suggest_ms = Date.now() - tType;
    result.rows = rows;
    log('suggest widget after', result.suggest_ms, 'ms:', JSON.stringify(rows.map((r) => r.label)));
    // Let the inline details (our probability) render, then take the screenshot.
    await page.waitForTimeout(300);
    result.rows = await page.$$eval('.editor-widget.suggest-widget.visible .monaco-list-row', (els) =>
      els.map((e) => ({
        label: (e.querySelector('.label-name') || e).textContent.trim(),
        details: (e.querySelector('.details-label') || { textContent: '' }).textContent.trim(),
        aria: e.getAttribute('aria-label') || '',
        focused: e.classList.contains('focused'),
      })));
    await page.screenshot({ path: path.join(SHOTS, 'vscode-suggest.png') });

    // Accept: the expected word if offered, else the best-ranked longer identifier.
    const labels = result.rows.map((r) => r.label);
    let target = labels.indexOf(EXPECTED);
    if (target < 0) target = labels.findIndex((l) => l.startsWith(TYPED) && l.length > TYPED.length && /^[A-Za-z_][A-Za-z0-9_]*$/.test(l));
    const focused = Math.max(0, result.rows.findIndex((r) => r.focused));
    result.chosen = labels[target];
    for (let i = focused; i < target; i++) await page.keyboard.press('ArrowDown');
    for (let i = focused; i > target; i--) await page.keyboard.press('ArrowUp');
    await page.waitForTimeout(200);
    await page.keyboard.press('Enter');
    await page.waitForTimeout(500);
    await page.keyboard.press('Escape');
    result.lines = await page.$$eval('.monaco-editor .view-lines .view-line', (els) =>
      els.map((e) => ({ top: parseFloat(e.style.top) || 0, text: e.textContent.replace(/\u00a0/g, ' ') }))
        .sort((a, b) => a.top - b.top).map((l) => l.text));
    await page.screenshot({ path: path.join(SHOTS, 'vscode-accepted.png') });

    // Status bar after a completion: model, latency and reuse from lsp-llm.stats.
    result.status_after = await waitFor(async () => {
      const texts = await page.$$eval('.statusbar-item', (els) => els.map((e) => e.textContent.trim()));
      return texts.find((t) => /reuse/i.test(t));
    }, 20000, 'the status bar to show latency and reuse').catch((e) => `${e}`);

    // A settings change goes to the server (workspace/didChangeConfiguration): an out-of-range
    // value comes back as the server's window/showMessage, shown as a notification.
    for (const file of JSON.parse(process.env.SETTINGS_FILES || '[]')) {
      const settings = JSON.parse(fs.readFileSync(file, 'utf8'));
      settings['lsp-llm.items'] = 99;
      fs.writeFileSync(file, JSON.stringify(settings, null, 2));
    }
    result.settings_notification = await waitFor(async () => {
      const texts = await page.$$eval('.notification-list-item-message', (els) => els.map((e) => e.textContent));
      return texts.find((t) => /items/.test(t) && /lsp-llm/.test(t));
    }, 30000, 'the server to report the changed setting').catch((e) => `${e}`);
    log('notification:', result.settings_notification);
    await page.screenshot({ path: path.join(SHOTS, 'vscode-settings-change.png') });

    // "lsp-llm: Restart Server" from the command palette.
    await page.keyboard.press('Escape');
    await page.locator('.monaco-editor textarea').first().focus();
    await page.keyboard.press('F1');
    await page.waitForSelector('.quick-input-widget input', { state: 'visible', timeout: 10000 });
    await page.keyboard.type('lsp-llm: Restart Server', { delay: 20 });
    await waitFor(async () => {
      const rows = await page.$$eval('.quick-input-list .monaco-list-row', (els) => els.map((e) => e.textContent));
      return rows.some((t) => /Restart Server/.test(t));
    }, 10000, 'the Restart Server command in the palette');
    await page.keyboard.press('Enter');
    const starts = () => (fs.readFileSync(process.env.SERVER_LOG, 'utf8').match(/serving LSP on stdio/g) || []).length;
    result.server_starts = await waitFor(async () => starts() >= 2 && starts(), 60000, 'a second server process');
    await page.waitForTimeout(500);
    result.status_after_restart = await waitFor(async () => {
      const texts = await page.$$eval('.statusbar-item', (els) => els.map((e) => e.textContent.trim()));
      return texts.find((t) => /gemma/i.test(t));
    }, 60000, 'the status bar after the restart').catch((e) => `${e}`);
    log('after restart:', result.status_after_restart);
    result.ok = true;
  } catch (e) {
    result.error = `${e.stack || e}`;
    await page.screenshot({ path: path.join(SHOTS, 'vscode-failure.png') }).catch(() => {});
  } finally {
    result.console_errors = consoleErrors.slice(0, 20);
    await browser.close();
    process.stdout.write(JSON.stringify(result) + '\n');
  }
})();
