"""Errors raised by peft_d2. Each message names the config key, file or module path at fault."""


class PeftConfigError(ValueError):
    """A MODEL.PEFT value, or a method/target combination, is invalid."""


class PeftCheckpointError(ValueError):
    """An adapter checkpoint cannot be read or does not fit the model."""
