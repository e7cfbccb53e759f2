"""The error for a request Vitrail cannot serve as asked: a model URI, alias or option that does not fit.

Bad pixels and files raise ``domains.DomainInputError``; a broken dataset raises
``tasks.dataset.DatasetError``. This is the third kind of input error: the files are fine but the
request names something that does not exist or does not match (an alias nobody holds yet, a model of
another domain). Flows report all three as one sentence, without a traceback.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be served as given; the message says what to change."""
