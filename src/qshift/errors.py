"""The one exception type for a user's mistake: the CLI prints it as one ``error:`` line and exits 2.

``UserError`` subclasses ``ValueError`` so library callers that catch ``ValueError`` keep working; raise it
(or a subclass) with a message that names the file or flag and says how to fix it."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a config): the message is the whole explanation."""


class NonFiniteError(FloatingPointError):
    """A non-finite value (NaN / inf) where a finite one is required: input embeddings, a loss, the parameters
    after an update, or the scores about to be returned.  The adapter state is left as before the batch."""
