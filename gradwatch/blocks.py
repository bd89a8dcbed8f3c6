"""The reference ResNet blocks, under their documented short name: :mod:`gradwatch.reference.blocks`."""

from .reference.blocks import *  # noqa: F401,F403 - the public path of the reference nets
from .reference.blocks import __all__  # noqa: F401
