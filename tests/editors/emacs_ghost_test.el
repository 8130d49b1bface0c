;;; emacs_ghost_test.el --- ghost text of OUR lsp-llm.el in eglot, batch mode  -*- lexical-binding: t; -*-
;; Run: emacs --batch -l emacs_ghost_test.el   with env LSP_LLM_REPO, LSP_LLM_CMD (JSON list),
;; LSP_LLM_FILE (file to edit), LSP_LLM_TYPED, LSP_LLM_GHOST_AFTER (type on a new line after this
;; line), LSP_LLM_OUT (JSON result file).
;; Keys go through `execute-kbd-macro', so the command loop, post-command-hook and the
;; keymaps run as for a user.  Batch Emacs is never idle (it reads no input), so idle
;; timers are run as ordinary timers: `lsp-llm-inline-delay' seconds after the command.
(require 'json)
(require 'cl-lib)

(defvar t-result (make-hash-table :test #'equal))
(defun t-put (k v) (puthash k v t-result))
(defun t-log (fmt &rest args) (princ (concat (apply #'format fmt args) "\n") #'external-debugging-output))
(defun t-wait (pred timeout what)
  (let ((deadline (+ (float-time) timeout)))
    (while (and (not (funcall pred)) (< (float-time) deadline))
      (accept-process-output nil 0.05))
    (or (funcall pred) (error "timed out after %ss waiting for %s" timeout what))))

(advice-add 'run-with-idle-timer :override #'run-with-timer)

(defun t-keys (keys)
  "Press KEYS (a `kbd' string)."
  (execute-kbd-macro (kbd keys)))

(defun t-type (text)
  "Type TEXT char by char like a user."
  (dolist (ch (string-to-list text))
    (execute-kbd-macro (vector ch))
    (sit-for 0.1)))

(defun t-open-line ()
  "From the file as on disk, a new line after line LSP_LLM_GHOST_AFTER (RET indents it).
Each phase types in the same place, so the (deterministic) server suggests the same there."
  (when (buffer-modified-p)
    (revert-buffer t t t))
  (goto-char (point-min))
  (forward-line (1- (string-to-number (getenv "LSP_LLM_GHOST_AFTER"))))
  (t-keys "C-e RET"))

(defun t-ghost ()
  "What is shown: the ghost text, its overlay and the buffer, as a hash table."
  (let ((h (make-hash-table :test #'equal))
        (ovs (cl-remove-if-not (lambda (o) (overlay-get o 'lsp-llm))
                               (overlays-in (point-min) (point-max)))))
    (puthash "text" (plist-get lsp-llm--ghost :text) h)
    (puthash "end" (and lsp-llm--ghost (marker-position (plist-get lsp-llm--ghost :end))) h)
    (puthash "overlays" (vconcat (mapcar (lambda (o)
                                           (let ((s (overlay-get o 'after-string)))
                                             (vector (overlay-start o) (substring-no-properties s)
                                                     (format "%s" (get-text-property 0 'face s)))))
                                         ovs))
             h)
    (puthash "keys" (and lsp-llm--ghost-keys-mode t) h)
    (puthash "point" (point) h)
    (puthash "buffer" (buffer-substring-no-properties (point-min) (point-max)) h)
    h))

(defun t-wait-ghost (what)
  "Wait for ghost text at point; return `t-ghost'."
  (let ((t0 (float-time)))
    (t-wait (lambda () (and lsp-llm--ghost (= (point) (plist-get lsp-llm--ghost :point)))) 60 what)
    (t-log "%s after %.2fs: %S" what (- (float-time) t0) (plist-get lsp-llm--ghost :text))
    (t-ghost)))

(defun t-capf-candidates ()
  "The candidates `completion-at-point' would offer here (without inserting any)."
  (let ((capf (run-hook-wrapped 'completion-at-point-functions
                                (lambda (f) (and (functionp f) (funcall f))))))
    (when capf
      (let ((input (buffer-substring-no-properties (nth 0 capf) (nth 1 capf))))
        (mapcar #'substring-no-properties (all-completions input (nth 2 capf)))))))

(condition-case err
    (progn
      (add-to-list 'load-path (expand-file-name "editors/emacs" (getenv "LSP_LLM_REPO")))
      (require 'eglot)
      (require 'lsp-llm)
      (setq lsp-llm-server-command (append (json-read-from-string (getenv "LSP_LLM_CMD")) nil)
            lsp-llm-items 5
            eglot-sync-connect 120
            eglot-connect-timeout 300
            ;; a busy 2-core machine: more than jsonrpc's 10 s for a request (capf, direct)
            jsonrpc-default-request-timeout 60)
      (find-file (getenv "LSP_LLM_FILE"))
      (lsp-llm-eglot)
      (t-wait (lambda () (and (eglot-current-server) (jsonrpc-running-p (eglot-current-server))))
              120 "eglot to connect")
      (t-put "inline_mode" lsp-llm-inline-mode)
      (let ((typed (getenv "LSP_LLM_TYPED")))
        ;; 1. Ghost text appears; the popup items are there beside it; TAB accepts it whole.
        (t-open-line)
        (t-type typed)
        (let ((g (t-wait-ghost "ghost text")))
          (t-put "accept_before" g)
          (t-put "direct" (jsonrpc-request (eglot-current-server) :textDocument/inlineCompletion
                                           (append (eglot--TextDocumentPositionParams)
                                                   (list :context (list :triggerKind 1)))))
          (t-put "capf" (vconcat (t-capf-candidates)))
          (t-put "ghost_after_capf" (plist-get lsp-llm--ghost :text))
          (t-keys "TAB")
          (t-put "accept_after" (t-ghost)))
        ;; 2. C-g dismisses it: the buffer stays, and it does not come back by itself.
        (t-open-line)
        (t-type typed)
        (t-put "dismiss_before" (t-wait-ghost "ghost text to dismiss"))
        (t-keys "C-g")
        (sit-for 1.0)
        (t-put "dismiss_after" (t-ghost))
        ;; 3. M-f accepts one word; the rest stays shown; then TAB the rest.
        (t-open-line)
        (t-type typed)
        (t-put "word_before" (t-wait-ghost "ghost text to accept by word"))
        (t-keys "M-f")
        (t-put "word_after" (t-ghost))
        (when lsp-llm--ghost
          (t-keys "TAB")
          (t-put "word_rest" (t-ghost)))
        ;; 4. Switched off: capf without lsp-llm's items, then no ghost text.
        (setq lsp-llm-capf-enabled nil)
        (lsp-llm-apply-options)
        (t-put "capf_off" (vconcat (t-capf-candidates)))
        (setq lsp-llm-inline-enabled nil)
        (lsp-llm-apply-options)
        (t-open-line)
        (t-type typed)
        (sit-for 2.0)
        (t-put "inline_off" (t-ghost)))
      (t-put "ok" t))
  (error
   (t-put "ok" :json-false)
   (t-put "error" (error-message-string err))
   (t-log "ERROR: %S" err)))

(ignore-errors
  (with-current-buffer (jsonrpc-stderr-buffer (eglot-current-server))
    (t-put "stderr" (buffer-string))))
(ignore-errors
  (with-current-buffer (jsonrpc-events-buffer (eglot-current-server))
    (t-put "events_tail" (buffer-substring-no-properties (max (point-min) (- (point-max) 6000)) (point-max)))))
(with-temp-file (getenv "LSP_LLM_OUT")
  (insert (json-encode t-result)))
(ignore-errors (let ((eglot-autoshutdown t)) (eglot-shutdown (eglot-current-server) nil 5)))
(kill-emacs 0)
