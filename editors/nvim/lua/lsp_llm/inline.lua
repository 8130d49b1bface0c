-- lsp-llm ghost text (inline completion) for Neovim 0.11+.
--
-- Neovim 0.11 has no built-in `textDocument/inlineCompletion`, so this module does it:
--   * after typing in insert mode (TextChangedI/TextChangedP/CursorMovedI), wait `debounce_ms`,
--     then ask the server; a newer request cancels the older one, and an answer that arrives
--     after the buffer or the cursor changed (changedtick, position) is dropped;
--   * show the first item as extmarks: the first line `virt_text` inline at the cursor, the
--     other lines as `virt_lines` below;
--   * keys (insert mode, buffer-local) act only while ghost text is shown, else they do what
--     the key does without this plugin: accept all, accept one word, dismiss.
--
-- LSP 3.18 InlineCompletionItem: `insertText` replaces `range` (default: empty at the cursor).
-- A range may start before the cursor (the text there must then begin the insertText: it was
-- typed already) and may end after it (e.g. the rest of the line, which the item replaces).
local M = {}

local METHOD = 'textDocument/inlineCompletion'
local ns = vim.api.nvim_create_namespace('lsp_llm_inline')

---@class lsp_llm.InlineOptions
M.defaults = {
  --- Show ghost text.
  enabled = true,
  --- Wait this long after the last keystroke before asking the server (ms).
  debounce_ms = 100,
  --- Highlight group of the ghost text (default: linked to Comment).
  hl_group = 'LspLlmGhostText',
  --- Insert-mode keys; false (or an empty list) leaves a key unmapped.
  keys = {
    accept = { '<Tab>' },
    accept_word = { '<C-Right>', '<M-Right>' },
    dismiss = { '<C-]>' },
  },
}

M.options = vim.deepcopy(M.defaults)

---@class lsp_llm.Ghost
---@field row integer       0-based row of the cursor when shown
---@field col integer       byte column of the cursor
---@field end_row integer   end of the replaced range (at or after the cursor)
---@field end_col integer
---@field text string       what accepting inserts at the cursor (the typed part of insertText removed)
---@field item table        the server's InlineCompletionItem

---@class lsp_llm.InlineState
---@field timer uv.uv_timer_t?
---@field request { client: vim.lsp.Client, id: integer }?
---@field ghost lsp_llm.Ghost?
---@field seen { tick: integer, row: integer, col: integer }?  buffer state last handled

---@type table<integer, lsp_llm.InlineState>
local states = {}

local function state(bufnr)
  states[bufnr] = states[bufnr] or {}
  return states[bufnr]
end

local function client_for(bufnr)
  for _, c in ipairs(vim.lsp.get_clients({ name = 'lsp_llm', bufnr = bufnr })) do
    if c.server_capabilities.inlineCompletionProvider then
      return c
    end
  end
end

--- The first word of a suggestion, as accept-by-word takes it: leading blanks plus one
--- identifier, or plus one run of other non-blank characters; a line break together with the
--- next line's indentation is a word of its own.
---@param text string
---@return string
function M.first_word(text)
  return text:match('^\r?\n[ \t]*')
    or text:match('^[ \t]*[%w_\128-\255]+')
    or text:match('^[ \t]*[^%w_\128-\255%s]+')
    or text:match('^[ \t]+')
    or text
end

local function cancel_request(s)
  if s.request then
    pcall(s.request.client.cancel_request, s.request.client, s.request.id)
    s.request = nil
  end
end

--- Remove the ghost text (the server is not told: nothing to tell).
function M.clear(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local s = state(bufnr)
  s.ghost = nil
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
end

--- Stop everything under way for the buffer: the debounce timer, the request, the ghost text.
local function reset(bufnr)
  local s = state(bufnr)
  if s.timer then
    s.timer:stop()
  end
  cancel_request(s)
  M.clear(bufnr)
end

local function render(bufnr, g)
  vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  local hl = M.options.hl_group
  local ts = vim.bo[bufnr].tabstop
  local lines = vim.split(g.text:gsub('\r\n', '\n'), '\n', { plain = true })
  -- virt_text shows a tab as one cell: expand tabs ourselves.
  local function chunk(line)
    return { { (line:gsub('\t', string.rep(' ', ts))), hl } }
  end
  local first = lines[1]
  local opts = { virt_text_pos = 'inline', hl_mode = 'combine', right_gravity = false }
  -- The item may replace the rest of the line (the tail after the cursor).
  local tail = ''
  if g.end_row == g.row and g.end_col > g.col then
    tail = vim.api.nvim_buf_get_text(bufnr, g.row, g.col, g.end_row, g.end_col, {})[1]
  end
  if tail ~= '' and #lines == 1 and first:sub(-#tail) == tail then
    -- One line ending with the tail (`foo)` over `)`): show only what it adds.
    first = first:sub(1, #first - #tail)
  elseif tail ~= '' then
    -- Otherwise draw the first line over the tail, padded to hide all of it.
    opts.virt_text_pos = 'overlay'
    first = first .. string.rep(' ', math.max(0, vim.fn.strdisplaywidth(tail) - vim.fn.strdisplaywidth(first)))
  end
  if first ~= '' then
    opts.virt_text = chunk(first)
  end
  if #lines > 1 then
    opts.virt_lines = vim.tbl_map(chunk, vim.list_slice(lines, 2))
  end
  vim.api.nvim_buf_set_extmark(bufnr, ns, g.row, g.col, opts)
end

--- Turn the server's first usable item into a ghost at the cursor, or nil.
---@return lsp_llm.Ghost?
local function ghost_from(result, bufnr, client, row, col)
  local items = result and (result.items or result) or {}
  for _, item in ipairs(items) do
    local text = item.insertText
    if type(text) == 'table' then -- a StringValue (snippet): show its text as it is
      text = text.value
    end
    if type(text) == 'string' and text ~= '' then
      local srow, scol, erow, ecol = row, col, row, col
      if item.range then
        local function bytepos(p)
          local line = vim.api.nvim_buf_get_lines(bufnr, p.line, p.line + 1, false)[1] or ''
          return p.line, vim.str_byteindex(line, client.offset_encoding, p.character, false)
        end
        srow, scol = bytepos(item.range.start)
        erow, ecol = bytepos(item.range['end'])
      end
      -- The range must contain the cursor; what it holds before the cursor was typed already.
      local starts_ok = srow < row or (srow == row and scol <= col)
      local ends_ok = erow > row or (erow == row and ecol >= col)
      if starts_ok and ends_ok then
        local typed = table.concat(vim.api.nvim_buf_get_text(bufnr, srow, scol, row, col, {}), '\n')
        if text:sub(1, #typed) == typed and #text > #typed then
          return { row = row, col = col, end_row = erow, end_col = ecol, text = text:sub(#typed + 1), item = item }
        end
      end
    end
  end
end

--- Ask the server for ghost text at the cursor now (the debounce timer calls this).
function M.request(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local s = state(bufnr)
  cancel_request(s)
  local client = client_for(bufnr)
  if not (M.options.enabled and client) or bufnr ~= vim.api.nvim_get_current_buf() then
    return
  end
  if not vim.api.nvim_get_mode().mode:match('^i') then
    return
  end
  local win = vim.api.nvim_get_current_win()
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = 2 } -- Automatic
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  local cursor = vim.api.nvim_win_get_cursor(win)
  local ok, id
  ok, id = client:request(METHOD, params, function(err, result)
    if s.request and s.request.id == id then
      s.request = nil
    end
    -- Stale: the buffer, the cursor or the mode changed since we asked.
    if err or not vim.api.nvim_buf_is_valid(bufnr) or vim.api.nvim_get_current_buf() ~= bufnr
      or vim.api.nvim_buf_get_changedtick(bufnr) ~= tick
      or not vim.deep_equal(vim.api.nvim_win_get_cursor(0), cursor)
      or not vim.api.nvim_get_mode().mode:match('^i')
    then
      return
    end
    local g = ghost_from(result, bufnr, client, cursor[1] - 1, cursor[2])
    s.ghost = g
    if g then
      render(bufnr, g)
    else
      M.clear(bufnr)
    end
  end, bufnr)
  if ok then
    s.request = { client = client, id = id }
  end
end

local function schedule(bufnr)
  local s = state(bufnr)
  s.timer = s.timer or assert(vim.uv.new_timer())
  s.timer:stop()
  s.timer:start(M.options.debounce_ms, 0, vim.schedule_wrap(function()
    if vim.api.nvim_buf_is_valid(bufnr) then
      M.request(bufnr)
    end
  end))
end

--- The ghost text shown in the buffer (0 = current), or nil.
---@return lsp_llm.Ghost?
function M.get(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  return state(bufnr).ghost
end

--- Is ghost text shown in the current buffer?
function M.visible()
  return M.get(0) ~= nil
end

-- The buffer's state (changedtick, cursor) now.
local function now(bufnr)
  local cur = vim.api.nvim_win_get_cursor(0)
  return { tick = vim.api.nvim_buf_get_changedtick(bufnr), row = cur[1] - 1, col = cur[2] }
end

-- Put `text` into the buffer at the cursor in place of [cursor, end), move the cursor after it.
local function put(bufnr, g, text, end_row, end_col)
  local lines = vim.split(text, '\r?\n')
  vim.api.nvim_buf_set_text(bufnr, g.row, g.col, end_row, end_col, lines)
  local row = g.row + #lines - 1
  local col = (#lines == 1 and g.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row + 1, col })
  return row, col
end

--- Accept the whole ghost text: its item's insertText replaces the item's range.
function M.accept()
  local bufnr = vim.api.nvim_get_current_buf()
  local g = M.get(bufnr)
  if not g then
    return
  end
  reset(bufnr)
  put(bufnr, g, g.text, g.end_row, g.end_col) -- the edit asks for what follows on from here
end

--- Accept the first word of the ghost text; the rest stays shown.
function M.accept_word()
  local bufnr = vim.api.nvim_get_current_buf()
  local g = M.get(bufnr)
  if not g then
    return
  end
  local word = M.first_word(g.text)
  local rest = g.text:sub(#word + 1)
  if rest == '' then
    return M.accept()
  end
  reset(bufnr)
  local row, col = put(bufnr, g, word, g.row, g.col)
  -- The replaced range moved with the inserted word.
  local end_row, end_col = g.end_row + (row - g.row), g.end_col
  if g.end_row == g.row then
    end_col = col + (g.end_col - g.col)
  end
  local ng = { row = row, col = col, end_row = end_row, end_col = end_col, text = rest, item = g.item }
  state(bufnr).ghost = ng
  state(bufnr).seen = now(bufnr) -- our own edit: keep showing the rest
  render(bufnr, ng)
end

--- Hide the ghost text; the next keystroke asks again.
function M.dismiss()
  local bufnr = vim.api.nvim_get_current_buf()
  reset(bufnr)
  state(bufnr).seen = now(bufnr) -- not before the next change
end

-- Insert-mode mapping: while ghost text is shown run `action`, else the key does what it does
-- without this plugin. An <expr> mapping may not change the buffer (textlock): it returns a
-- <Cmd> that does. <C-e> first closes the completion menu, if open, without inserting anything.
local function map(bufnr, keys, action, desc)
  if type(keys) == 'string' then
    keys = { keys }
  end
  for _, key in ipairs(keys or {}) do
    vim.keymap.set('i', key, function()
      if not M.visible() then
        return key
      end
      local close = vim.fn.pumvisible() == 1 and '<C-e>' or ''
      return close .. "<Cmd>lua require('lsp_llm.inline')." .. action .. '()<CR>'
    end, { buffer = bufnr, expr = true, desc = 'lsp-llm: ' .. desc })
  end
end

--- Start ghost text for a buffer (called on LspAttach of lsp-llm).
function M.attach(bufnr)
  local group = vim.api.nvim_create_augroup('lsp_llm_inline_' .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd({ 'TextChangedI', 'TextChangedP', 'CursorMovedI' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      -- Act only when the text or the cursor changed since the last time: not for the events
      -- that follow our own edit, a dismiss, or closing the menu (<C-e>).
      local s, cur = state(bufnr), now(bufnr)
      if vim.deep_equal(s.seen, cur) then
        return
      end
      s.seen = cur
      M.clear(bufnr)
      if M.options.enabled then
        schedule(bufnr)
      end
    end,
  })
  vim.api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      reset(bufnr)
    end,
  })
  vim.api.nvim_create_autocmd('BufWipeout', {
    group = group,
    buffer = bufnr,
    callback = function()
      reset(bufnr)
      if states[bufnr] and states[bufnr].timer then
        states[bufnr].timer:close()
      end
      states[bufnr] = nil
    end,
  })
  local keys = M.options.keys
  map(bufnr, keys.accept, 'accept', 'accept the ghost text')
  map(bufnr, keys.accept_word, 'accept_word', 'accept a word of the ghost text')
  map(bufnr, keys.dismiss, 'dismiss', 'dismiss the ghost text')
end

--- Switch ghost text on or off for every buffer.
function M.enable(on)
  M.options.enabled = on ~= false
  if not M.options.enabled then
    for bufnr in pairs(states) do
      reset(bufnr)
    end
  end
end

---@param opts? lsp_llm.InlineOptions
function M.setup(opts)
  M.options = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  -- A list option given in opts replaces the default list, it is not merged into it.
  for name, keys in pairs((opts or {}).keys or {}) do
    M.options.keys[name] = keys
  end
  vim.api.nvim_set_hl(0, 'LspLlmGhostText', { link = 'Comment', default = true })
end

return M
