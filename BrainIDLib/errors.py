"""One exception type for every problem a user can fix, so front ends print one clear line."""


class BrainIDError(Exception):
    """A problem with the user's input, weights or machine, with a message that says what to do."""


class Cancelled(BrainIDError):
    """The user cancelled a running job (the `cancel` callback returned True)."""
