"""The common base of LoRA Lab's exceptions: what the CLI and the nodes report as one line, not a traceback."""


class LoRALabError(Exception):
    """A problem LoRA Lab found and can explain; each subclass is also the builtin error callers may catch."""
