"""Every command's options, as typed dataclasses: their fields are the command's flags and
YAML keys (see `options.py`), their docstrings the help, their defaults the only defaults.

These modules import neither torch nor transformers (checks that need torch import it when
they run), so that `hydralora --help` and `hydralora COMMAND --help` start at once; the code
that carries out a command imports them, never the reverse. `hydralora train`'s options are
`train.config.TrainConfig`, light for the same reason.
"""
