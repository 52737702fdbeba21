"""One module per balancing method, and what a method written outside the library uses:
:func:`check_number` validates a numeric option as every built-in method does (a
``ConfigurationError`` naming the option)."""

from gradbalance._checks import check_number

__all__ = ["check_number"]
