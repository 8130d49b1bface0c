;;; lsp-llm.el --- Local-LLM code completion through the lsp-llm language server  -*- lexical-binding: t; -*-

;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1"))
;; Keywords: languages, tools, completion
;; URL: https://github.com/lsp-llm/lsp-llm

;;; Commentary:

;; lsp-llm is a language server that completes code with a small local LLM.
;; This file connects it to Emacs:
;;
;; * eglot (built into Emacs 29+, `elpa-eglot' on Debian's Emacs 28):
;;   `lsp-llm' is registered in `eglot-server-programs' for `lsp-llm-modes'
;;   (appended, so a language's own server keeps priority unless
;;   `lsp-llm-eglot-prefer' is non-nil).  M-x lsp-llm-eglot starts it for the
;;   current buffer whatever else is registered.  eglot manages a buffer with
;;   ONE server; see the README for running it beside pylsp & co.
;;
;; * lsp-mode: a client with `:add-on? t' is registered once lsp-mode is
;;   loaded, so lsp-llm runs beside pyright/pylsp/... in the same buffer.
;;
;; Completions arrive through `completion-at-point' (and so company/corfu).
;; With eglot, ghost text (`lsp-llm-inline-mode') shows a suggestion at
;; point as you type: TAB accepts it, M-f a word of it, C-g hides it.
;;
;; Settings (`lsp-llm-model', `lsp-llm-items', ...) are sent as
;; initializationOptions, and again with M-x lsp-llm-send-settings.

;;; Code:

(require 'cl-lib)
(require 'subr-x)

(defgroup lsp-llm nil
  "Code completion from a local LLM (lsp-llm language server)."
  :group 'tools
  :prefix "lsp-llm-")

(defcustom lsp-llm-server-command nil
  "Command (a list of strings) that starts the lsp-llm server on stdio.
nil means: `lsp-llm' on `exec-path', else \"python3 -m lsp_llm\"."
  :type '(choice (const :tag "Automatic" nil) (repeat string)))

(defcustom lsp-llm-modes '(prog-mode text-mode conf-mode)
  "Major modes (and modes derived from them) that lsp-llm serves."
  :type '(repeat symbol))

(defcustom lsp-llm-eglot-prefer nil
  "Non-nil: put lsp-llm first in `eglot-server-programs'.
Then `eglot' starts lsp-llm (instead of the language's own server) in
`lsp-llm-modes'.  nil: lsp-llm is appended and only used where no
other server is registered, or through \\[lsp-llm-eglot]."
  :type 'boolean)

(defcustom lsp-llm-model nil
  "Path of a GGUF model file; nil uses the server's default model."
  :type '(choice (const :tag "Default model" nil) file))

(defcustom lsp-llm-n-ctx nil
  "Context size in tokens (server default 4096)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-threads nil
  "Number of CPU threads for the model (server default: automatic)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-max-sessions nil
  "Documents kept live in the model at once (server default 4)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-items nil
  "Number of word completion items (server default 5)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-line-tokens nil
  "Maximum tokens of the complete-to-end-of-line item (server default 12)."
  :type '(choice (const :tag "Default" nil) integer))

(defcustom lsp-llm-wait-for nil
  "\"top\": a request waits for the likeliest word item only (server default);
\"all\": every item, every time."
  :type '(choice (const :tag "Default" nil) (const "top") (const "all")))

(defcustom lsp-llm-log-level nil
  "Server log level: \"debug\", \"info\", \"warning\" or \"error\"."
  :type '(choice (const :tag "Default" nil)
                 (const "debug") (const "info") (const "warning") (const "error")))

(defun lsp-llm-command ()
  "The command list that starts the server."
  (or lsp-llm-server-command
      (if-let ((exe (executable-find "lsp-llm")))
          (list exe)
        (list (or (executable-find "python3") "python3") "-m" "lsp_llm"))))

(defun lsp-llm-settings ()
  "Server settings as a plist with the server's camelCase keys.
Settings left at nil (server default) are left out."
  (let (plist)
    (dolist (pair `((:model . ,lsp-llm-model)
                    (:nCtx . ,lsp-llm-n-ctx)
                    (:threads . ,lsp-llm-threads)
                    (:maxSessions . ,lsp-llm-max-sessions)
                    (:items . ,lsp-llm-items)
                    (:lineTokens . ,lsp-llm-line-tokens)
                    (:waitFor . ,lsp-llm-wait-for)
                    (:logLevel . ,lsp-llm-log-level)))
      (when (cdr pair)
        (setq plist (append plist (list (car pair)
                                        (if (eq (car pair) :model)
                                            (expand-file-name (cdr pair))
                                          (cdr pair)))))))
    plist))

(defun lsp-llm--settings-hash ()
  "`lsp-llm-settings' as a hash table (encodes as {} when empty)."
  (let ((h (make-hash-table :test #'equal)))
    (cl-loop for (k v) on (lsp-llm-settings) by #'cddr
             do (puthash (substring (symbol-name k) 1) v h))
    h))

;;;; eglot

(declare-function eglot-current-server "eglot")
(declare-function eglot--current-server-or-lose "eglot")
(declare-function jsonrpc-notify "jsonrpc")
(declare-function jsonrpc-request "jsonrpc")
(declare-function eglot "eglot")
(declare-function json-encode "json")
(defvar eglot-server-programs)

(defun lsp-llm-eglot-contact (&optional _interactive)
  "Contact for `eglot-server-programs': command plus initializationOptions."
  (append (lsp-llm-command)
          (list :initializationOptions (lsp-llm--settings-hash))))

(defun lsp-llm-eglot-entry ()
  "The `eglot-server-programs' entry for lsp-llm."
  (cons lsp-llm-modes #'lsp-llm-eglot-contact))

(defun lsp-llm-eglot-register ()
  "Register lsp-llm in `eglot-server-programs' (see `lsp-llm-eglot-prefer')."
  (setq eglot-server-programs
        (cl-remove-if (lambda (e) (eq (cdr-safe e) #'lsp-llm-eglot-contact))
                      eglot-server-programs))
  (if lsp-llm-eglot-prefer
      (push (lsp-llm-eglot-entry) eglot-server-programs)
    (setq eglot-server-programs
          (append eglot-server-programs (list (lsp-llm-eglot-entry))))))

;;;###autoload
(defun lsp-llm-eglot ()
  "Start (or reconnect) eglot with lsp-llm for the current buffer.
Works whatever other servers `eglot-server-programs' lists for this mode;
it replaces eglot's server for this major mode in this project."
  (interactive)
  (require 'eglot)
  (let ((eglot-server-programs
         (cons (cons major-mode #'lsp-llm-eglot-contact) eglot-server-programs))
        (current-prefix-arg nil))
    (call-interactively #'eglot)))

;;;###autoload
(defun lsp-llm-send-settings ()
  "Send the current lsp-llm settings to the running server(s).
eglot: workspace/didChangeConfiguration for this buffer's server.
lsp-mode: the lsp-llm workspaces."
  (interactive)
  (let ((settings (list :settings (list :lsp-llm (lsp-llm--settings-hash))))
        (sent nil))
    (when (and (featurep 'eglot) (eglot-current-server))
      (jsonrpc-notify (eglot-current-server) :workspace/didChangeConfiguration settings)
      (setq sent t))
    (when (and (featurep 'lsp-mode) (fboundp 'lsp-llm--lsp-mode-send-settings))
      (setq sent (or (lsp-llm--lsp-mode-send-settings settings) sent)))
    (message (if sent "lsp-llm: settings sent" "lsp-llm: no running server for this buffer"))))

;;;###autoload
(defun lsp-llm-stats (&optional all)
  "Show `lsp-llm.stats' for this buffer's document.
With prefix argument ALL, for every document."
  (interactive "P")
  (require 'eglot)
  (let* ((server (eglot--current-server-or-lose))
         (res (jsonrpc-request server :workspace/executeCommand
                               (list :command "lsp-llm.stats"
                                     :arguments (if all [] (vector (eglot--path-to-uri buffer-file-name)))))))
    (require 'json)
    (message "lsp-llm: %s" (json-encode res))
    res))

(declare-function eglot--path-to-uri "eglot")

(with-eval-after-load 'eglot
  (lsp-llm-eglot-register))

;;;; Ghost text: textDocument/inlineCompletion over eglot's connection
;;
;; eglot 1.9 has no inline completion, so lsp-llm asks for it itself: after a
;; command that changed the buffer and `lsp-llm-inline-delay' idle seconds,
;; it sends textDocument/inlineCompletion on the buffer's eglot connection
;; and shows the first item as an overlay at point (its `after-string', face
;; `lsp-llm-ghost').  While it is shown, `lsp-llm-ghost-map' is active: TAB
;; accepts it, M-f or C-<right> accepts one word, C-g dismisses it.  Any
;; other command that moves point or edits hides it.
;;
;; An item (LSP 3.18) is `insertText' replacing `range' (default: empty at
;; point).  The range may start before point (that text was typed already
;; and begins insertText) and end after it (the rest of the line, which the
;; item replaces).

(declare-function eglot--server-capable "eglot")
(declare-function eglot--server-info "eglot")
(declare-function eglot--TextDocumentPositionParams "eglot")
(declare-function eglot--signal-textDocument/didChange "eglot")
(declare-function eglot--range-region "eglot")
(declare-function eglot-completion-at-point "eglot")
(declare-function jsonrpc-async-request "jsonrpc")
(declare-function jsonrpc--async-request-1 "jsonrpc")
(defvar eglot-managed-mode-hook)

(defcustom lsp-llm-inline-enabled t
  "Non-nil: show lsp-llm's ghost text in buffers eglot manages with lsp-llm."
  :type 'boolean)

(defcustom lsp-llm-capf-enabled t
  "Non-nil: `completion-at-point' offers lsp-llm's items (eglot's capf).
nil: lsp-llm buffers get ghost text only."
  :type 'boolean)

(defcustom lsp-llm-inline-delay 0.15
  "Idle seconds after an edit before asking for ghost text."
  :type 'number)

(defface lsp-llm-ghost '((t :inherit shadow))
  "Face of lsp-llm's ghost text.")

(defvar lsp-llm-ghost-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "TAB") #'lsp-llm-inline-accept)
    (define-key map (kbd "<tab>") #'lsp-llm-inline-accept)
    (define-key map (kbd "M-f") #'lsp-llm-inline-accept-word)
    (define-key map (kbd "C-<right>") #'lsp-llm-inline-accept-word)
    (define-key map (kbd "C-g") #'lsp-llm-inline-dismiss)
    map)
  "Keys active while ghost text is shown.")

(defvar-local lsp-llm--ghost nil
  "The ghost text shown: plist (:overlay :text :end :tick :point :item).
:text is what accepting inserts at point, :end a marker at the end of the
range it replaces, :tick and :point the buffer state it was shown for.")

(defvar-local lsp-llm--request nil "Token of this buffer's newest request.")
(defvar-local lsp-llm--request-id nil "Its JSON-RPC id, if known (for $/cancelRequest).")
(defvar-local lsp-llm--last-tick nil "`buffer-chars-modified-tick' after the last command.")
(defvar lsp-llm--timer nil "The idle timer of the next request.")
(defvar lsp-llm--request-counter 0)
(defvar lsp-llm-inline-mode)            ; defined below

(define-minor-mode lsp-llm--ghost-keys-mode
  "On while ghost text is shown, for `lsp-llm-ghost-map'."
  :lighter nil
  :keymap lsp-llm-ghost-map)

(defun lsp-llm-first-word (text)
  "The first word of TEXT, as accept-by-word takes it.
Leading blanks plus one identifier, or plus one run of other non-blank
characters; a line break with the next line's indentation is a word."
  (if (string-match (concat "\\`\\(?:\r?\n[ \t]*"
                            "\\|[ \t]*[[:alnum:]_]+"
                            "\\|[ \t]*[^[:alnum:]_[:space:]]+"
                            "\\|[ \t]+\\)")
                    text)
      (match-string 0 text)
    text))

(defun lsp-llm--clear ()
  "Hide the ghost text."
  (when lsp-llm--ghost
    (let ((ov (plist-get lsp-llm--ghost :overlay)))
      (when (overlay-get ov 'lsp-llm-hide) (delete-overlay (overlay-get ov 'lsp-llm-hide)))
      (delete-overlay ov))
    (set-marker (plist-get lsp-llm--ghost :end) nil)
    (setq lsp-llm--ghost nil))
  (when lsp-llm--ghost-keys-mode (lsp-llm--ghost-keys-mode -1)))

(defun lsp-llm--show (text end item)
  "Show TEXT as ghost text at point; accepting it replaces up to END."
  (lsp-llm--clear)
  (let* ((tail (buffer-substring-no-properties (point) end))
         ;; A one-line item that replaces the rest of the line and ends with
         ;; it (`foo)' over `)'): show only what it adds.
         (suffix (and (not (string-empty-p tail))
                      (not (string-match-p "\n" text))
                      (string-suffix-p tail text)))
         (shown (if suffix (substring text 0 (- (length text) (length tail))) text))
         (ov (make-overlay (point) (point) nil t nil))
         (str (propertize shown 'face 'lsp-llm-ghost)))
    ;; Any other item that replaces text after point: hide that text meanwhile.
    (unless (or suffix (string-empty-p tail))
      (let ((hide (make-overlay (point) end nil t nil)))
        (overlay-put hide 'invisible t)
        (overlay-put ov 'lsp-llm-hide hide)))
    (unless (string-empty-p str)
      ;; Keep the cursor before the ghost text, not after it.
      (put-text-property 0 1 'cursor t str))
    (overlay-put ov 'after-string str)
    (overlay-put ov 'lsp-llm t)
    (setq lsp-llm--ghost (list :overlay ov :text text
                               :end (copy-marker end t)
                               :tick (buffer-chars-modified-tick)
                               :point (point) :item item))
    (lsp-llm--ghost-keys-mode 1)))

(defun lsp-llm--usable-item (result)
  "The first item of RESULT (an InlineCompletionList or item array) to show.
Returns (TEXT END ITEM): what to insert at point, and where the replaced
range ends; nil if no item fits point."
  (let ((items (if (and (listp result) (plist-member result :items))
                   (plist-get result :items)
                 result)))
    (cl-loop
     for item across (if (vectorp items) items (vconcat items))
     for text = (let ((it (plist-get item :insertText)))
                  (if (stringp it) it (plist-get it :value))) ; StringValue
     for range = (plist-get item :range)
     for region = (if range (eglot--range-region range) (cons (point) (point)))
     when (and (stringp text)
               (<= (car region) (point) (cdr region)))
     do (let ((typed (buffer-substring-no-properties (car region) (point))))
          (when (and (string-prefix-p typed text) (> (length text) (length typed)))
            (cl-return (list (substring text (length typed)) (cdr region) item)))))))

(defun lsp-llm--eglot-server ()
  "This buffer's eglot server if it is lsp-llm (it serves inline completion)."
  (when (and (fboundp 'eglot-current-server) (eglot-current-server)
             (eglot--server-capable :inlineCompletionProvider))
    (eglot-current-server)))

(defun lsp-llm--send (server method params success)
  "Send request METHOD with PARAMS to SERVER; call SUCCESS with the result.
Returns the request id when jsonrpc tells it (for $/cancelRequest).  The
timeout is long: the first request may wait for the model to load, and
a stale answer is dropped anyway."
  (let ((args (list :success-fn success :error-fn #'ignore
                    :timeout-fn #'ignore :timeout 120)))
    (if (fboundp 'jsonrpc--async-request-1)
        ;; jsonrpc's internal variant returns (ID TIMER); the public one nil.
        (car (apply #'jsonrpc--async-request-1 server method params args))
      (apply #'jsonrpc-async-request server method params args)
      nil)))

(defun lsp-llm-inline-request ()
  "Ask the server for ghost text at point now."
  (interactive)
  (let ((server (lsp-llm--eglot-server)))
    (when server
      ;; Cancel the request still under way; its answer would be stale.
      (when lsp-llm--request-id
        (jsonrpc-notify server :$/cancelRequest (list :id lsp-llm--request-id)))
      ;; eglot sends edits on its own idle timer: flush them first.
      (eglot--signal-textDocument/didChange)
      (let ((buf (current-buffer))
            (tick (buffer-chars-modified-tick))
            (pt (point))
            (token (cl-incf lsp-llm--request-counter)))
        (setq lsp-llm--request token
              lsp-llm--request-id
              (lsp-llm--send
               server :textDocument/inlineCompletion
               (append (eglot--TextDocumentPositionParams)
                       (list :context (list :triggerKind 2))) ; Automatic
               (lambda (result)
                 (when (buffer-live-p buf)
                   (with-current-buffer buf
                     ;; Drop it if a newer request went out, or the buffer or
                     ;; point changed since we asked.
                     (when (and (eql lsp-llm--request token)
                                (= tick (buffer-chars-modified-tick))
                                (= pt (point)))
                       (setq lsp-llm--request nil lsp-llm--request-id nil)
                       (let ((usable (lsp-llm--usable-item result)))
                         (if usable
                             (apply #'lsp-llm--show usable)
                           (lsp-llm--clear)))))))))))))

(defun lsp-llm--schedule ()
  "Ask for ghost text after `lsp-llm-inline-delay' idle seconds."
  (when (timerp lsp-llm--timer) (cancel-timer lsp-llm--timer))
  (let ((buf (current-buffer)))
    (setq lsp-llm--timer
          (run-with-idle-timer
           lsp-llm-inline-delay nil
           (lambda ()
             (setq lsp-llm--timer nil)
             (when (and (buffer-live-p buf) (eq buf (current-buffer)))
               (with-current-buffer buf
                 (when lsp-llm-inline-mode (lsp-llm-inline-request)))))))))

(defun lsp-llm--post-command ()
  "Hide stale ghost text; ask again after a command that edited the buffer."
  (when (and lsp-llm--ghost
             (not (and (= (point) (plist-get lsp-llm--ghost :point))
                       (= (buffer-chars-modified-tick) (plist-get lsp-llm--ghost :tick)))))
    (lsp-llm--clear))
  (let ((tick (buffer-chars-modified-tick)))
    (unless (or (eql tick lsp-llm--last-tick) lsp-llm--ghost)
      (lsp-llm--schedule))
    (setq lsp-llm--last-tick tick)))

(defun lsp-llm-inline-accept ()
  "Insert the whole ghost text."
  (interactive)
  (let ((g lsp-llm--ghost))
    (when g
      (let ((text (plist-get g :text)) (end (marker-position (plist-get g :end))))
        (lsp-llm--clear)
        (delete-region (point) end)
        (insert text)))))

(defun lsp-llm-inline-accept-word ()
  "Insert the first word of the ghost text; the rest stays shown."
  (interactive)
  (let ((g lsp-llm--ghost))
    (when g
      (let* ((text (plist-get g :text))
             (word (lsp-llm-first-word text))
             (rest (substring text (length word)))
             (end (plist-get g :end)))
        (if (string-empty-p rest)
            (lsp-llm-inline-accept)
          (insert word)                 ; END is a marker: it moves along
          (lsp-llm--show rest (marker-position end) (plist-get g :item)))))))

(defun lsp-llm-inline-dismiss ()
  "Hide the ghost text; the next edit asks again."
  (interactive)
  (lsp-llm--clear))

;;;###autoload
(define-minor-mode lsp-llm-inline-mode
  "Ghost text from lsp-llm as you type (needs eglot connected to lsp-llm).
Turned on by itself in eglot buffers served by lsp-llm when
`lsp-llm-inline-enabled' is non-nil."
  :lighter nil
  (if lsp-llm-inline-mode
      (progn
        (setq lsp-llm--last-tick (buffer-chars-modified-tick))
        (add-hook 'post-command-hook #'lsp-llm--post-command nil t))
    (remove-hook 'post-command-hook #'lsp-llm--post-command t)
    (lsp-llm--clear)))

(defun lsp-llm-apply-options ()
  "Apply `lsp-llm-inline-enabled' and `lsp-llm-capf-enabled' to this buffer.
Runs by itself when eglot starts managing a buffer."
  (interactive)
  (let ((ours (and (bound-and-true-p eglot--managed-mode) (lsp-llm--eglot-server))))
    (lsp-llm-inline-mode (if (and ours lsp-llm-inline-enabled) 1 -1))
    (when ours
      (if lsp-llm-capf-enabled
          (add-hook 'completion-at-point-functions #'eglot-completion-at-point nil t)
        (remove-hook 'completion-at-point-functions #'eglot-completion-at-point t)))))

(with-eval-after-load 'eglot
  (add-hook 'eglot-managed-mode-hook #'lsp-llm-apply-options))

;;;; lsp-mode (add-on client: runs beside the language's own server)

(declare-function lsp-register-client "lsp-mode")
(declare-function make-lsp-client "lsp-mode")
(declare-function lsp-stdio-connection "lsp-mode")
(declare-function lsp-workspaces "lsp-mode")
(declare-function lsp--workspace-client "lsp-mode")
(declare-function lsp--client-server-id "lsp-mode")
(declare-function lsp--workspace-root "lsp-mode")
(declare-function lsp-notify "lsp-mode")
(defvar lsp--cur-workspace)

(defun lsp-llm--lsp-mode-activate-p (_file-name mode)
  "lsp-mode activation function: MODE derives from one of `lsp-llm-modes'."
  (cl-some (lambda (m) (provided-mode-derived-p mode m)) lsp-llm-modes))

(defun lsp-llm--lsp-mode-send-settings (settings)
  "Send SETTINGS (didChangeConfiguration params) to lsp-mode's lsp-llm workspaces."
  (let ((sent nil))
    (dolist (ws (and (bound-and-true-p lsp-mode) (lsp-workspaces)))
      (when (eq (lsp--client-server-id (lsp--workspace-client ws)) 'lsp-llm)
        (let ((lsp--cur-workspace ws))
          (lsp-notify "workspace/didChangeConfiguration" settings))
        (setq sent t)))
    sent))

(with-eval-after-load 'lsp-mode
  (lsp-register-client
   (make-lsp-client
    :new-connection (lsp-stdio-connection #'lsp-llm-command)
    :activation-fn #'lsp-llm--lsp-mode-activate-p
    :server-id 'lsp-llm
    :add-on? t
    :priority -5
    :initialization-options #'lsp-llm--settings-hash
    :initialized-fn (lambda (workspace)
                      (let ((lsp--cur-workspace workspace))
                        (lsp-notify "workspace/didChangeConfiguration"
                                    (list :settings (list :lsp-llm (lsp-llm--settings-hash)))))))))

(provide 'lsp-llm)
;;; lsp-llm.el ends here
