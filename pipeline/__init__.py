"""TokenCompose reproduction pipeline: the library behind the DVC stages in ``stages/``."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
