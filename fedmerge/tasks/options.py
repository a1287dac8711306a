"""The checks a suite declares its options with (the suite API's name for :mod:`fedmerge.options`)."""

from fedmerge.options import (  # noqa: F401  (re-exported for users' suites)
    Check,
    Option,
    at_most,
    boolean,
    choice,
    fraction,
    list_of,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve,
    string,
    text,
)
