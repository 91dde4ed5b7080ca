"""How every `python -m raydino.X` ends: the same exit statuses, and a user's mistake reported as one
line on stderr that names the program and what is wrong, never a traceback and never a credential.

The recipes catch `USER_ERRORS` around their work and hand them to `user_error`.  Anything else
(a bug, an interrupted run) keeps its traceback.
"""

from __future__ import annotations

import sys

from raydino.data.storage import StorageError, redact

EXIT_OK = 0
EXIT_TRAINING_FAILED = 1  # the work failed (Ray Train gave up after run.max_failures, every trial of a search failed)
EXIT_BAD_INPUT = 2  # config, data, storage or cluster cannot work: nothing was done
EXIT_NON_FINITE = 3  # the loss became NaN/inf: stopped, the last good checkpoint is kept
# ConfigError (config.py) and DataError (data/labelled.py) are ValueErrors; StorageError is an
# OSError (a URI that cannot be read or written, a missing bucket, a refused permission).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, StorageError)


def user_error(prog: str, error: BaseException | str, code: int = EXIT_BAD_INPUT) -> int:
    """Print `PROG: error: MESSAGE` (credentials redacted) to stderr; return the exit status."""
    print(f"{prog}: error: {redact(str(error))}", file=sys.stderr)
    return code
