"""The one exception minisv raises for bad input.

Every user-facing problem (a missing file, an unknown model, a corrupt checkpoint, a prompt longer than the
context, ...) is a MinisvError whose message is one line saying what was wrong and what to do. The scripts
print it as `error: ...` and exit with status 2; anything else that escapes is a bug and keeps its traceback.
"""


class MinisvError(Exception):
    pass
