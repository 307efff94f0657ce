"""Exact strings of the V4 control tokens and DSML markup (encoding spec §1, §3.7).

The bars are U+FF5C and the word separators U+2581; they are written as escapes here because an ASCII
`|` look-alike is the classic bug.  Ids are deliberately absent: they are looked up from whichever
`tokenizer.json` is loaded (the official one or a tiny test one), never hard-coded.
"""

BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
PAD = "<\uff5c\u2581pad\u2581\uff5c>"
USER = "<\uff5cUser\uff5c>"
ASSISTANT = "<\uff5cAssistant\uff5c>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DSML = "\uff5cDSML\uff5c"
LATEST_REMINDER = "<\uff5clatest_reminder\uff5c>"

# Quick-instruction task name -> the token that announces the task's output.
TASK_TOKENS = {
    "action": "<\uff5caction\uff5c>",
    "query": "<\uff5cquery\uff5c>",
    "authority": "<\uff5cauthority\uff5c>",
    "domain": "<\uff5cdomain\uff5c>",
    "title": "<\uff5ctitle\uff5c>",
    "read_url": "<\uff5cread_url\uff5c>",
}

# Every token string the encoder may emit as a structural (control) token.
CONTROL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, DSML, LATEST_REMINDER,
                  *TASK_TOKENS.values())

# Strings that must never be treated as structure when they occur inside client text (spec §6.3)
# and that the strict parser refuses inside content/reasoning (spec §5.2 step 5).
FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_OPEN, THINK_CLOSE, DSML)

# DSML markup pieces, as written by the model and by the encoder for history turns.
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
TOOL_CALLS_MARKER = f"\n\n<{DSML}tool_calls"   # what the strict parser looks for after content
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"
