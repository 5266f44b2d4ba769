"""Former home of batch diagnosis, now the package `pipeline.inference.diagnosis`; these names
stay importable from here."""

from pipeline.inference.diagnosis import *  # noqa: F403 - the names this module has always had
from pipeline.inference.diagnosis import __all__  # noqa: F401
